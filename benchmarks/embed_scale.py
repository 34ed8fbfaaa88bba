"""Embedding at survey scale: `chemtwin embed` on 200,000 spectra from one HDF5 file, in bounded memory.

    python benchmarks/embed_scale.py                      # 200,000 spectra
    python benchmarks/embed_scale.py --quick              # 20,000 spectra
    python benchmarks/embed_scale.py --data out/train_protocol/train_25000.h5 --quick --json out/embed_scale_quick.json

The dataset: an existing file is reused rather than regenerated.  ``--data FILE`` (or,
by default, ``out/train_protocol/train_25000.h5`` when it exists) with exactly N rows is
embedded as it is; with more rows, its first N rows are copied (streamed) once into
``--work/data_N.h5``; with fewer, ``--work/data_N.h5`` is generated once with
``chemtwin.data.generate.generate_dataset`` (SNR 100, seed 0).  A file already in
``--work`` with N rows is always reused.

The model: ``--model MODEL_DIR``, or a throwaway model of the default architecture
(``fast`` preset, 20-d latent) trained for ``--train-seconds`` on the first 2,000 rows
(its weights do not change the cost of embedding), kept in ``--work/model``.

What is measured: ``chemtwin -q embed MODEL DATA --out LATENTS`` runs in a child process
(exactly the command users run), which reports its own peak RSS (``VmHWM``) when it
ends; wall time, spectra/s, and peak RSS against the size of the file.  A second child
only imports chemtwin and loads the model: its peak RSS is the fixed cost, and the
difference is the streaming working set (one batch of flux and ivar plus HDF5 chunk
caches), which does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import log, print_or_write_json

import h5py

from chemtwin.data.dataset import open_dataset

from chemtwin.data.dataset_writer import DatasetWriter

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "out" / "train_protocol" / "train_25000.h5"
TRAIN_ROWS = 2000
# Runs `chemtwin` in the child and prints its peak RSS (KiB) as the last line.  VmHWM, not
# ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss across fork + exec.
CHILD = (
    "import json, resource, sys\n"
    "from chemtwin.cli import main\n"
    "if sys.argv[1] == '--load-only':\n"
    "    from chemtwin.tagging.estimator import ChemTwin\n"
    "    ChemTwin.load(sys.argv[2]); rc = 0\n"
    "else:\n"
    "    rc = main(sys.argv[1:])\n"
    "try:\n"
    "    peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])\n"
    "except OSError:\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'peak_rss_kib': peak}))\n"
)


def n_rows(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["flux"].shape[0])


def dataset_for(n: int, source: Path | None, work: Path, seed: int) -> tuple[Path, str]:
    """A dataset file of exactly ``n`` rows, reused when possible; (path, how it was made)."""
    if source is not None and source.is_file() and n_rows(source) == n:
        return source, f"given file {source}"
    target = work / f"data_{n}.h5"
    if target.is_file() and n_rows(target) == n:
        return target, f"reused {target}"
    t0 = time.perf_counter()
    if source is not None and source.is_file() and n_rows(source) > n:
        with open_dataset(source) as ds:
            attrs = {k: v for k, v in ds.attrs.items() if k not in ("chemtwin_version", "layout_version")}
            attrs["subset_of"] = f"{source} rows 0..{n - 1}"
            with DatasetWriter(target, ds.wavelength, ds.label_names, attrs=attrs, expected_rows=n) as w:
                for b in ds.iter_batches(4096, 0, n):
                    w.append(b.flux, b.ivar, b.labels, b.group)
        how = f"first {n:,} rows of {source} copied to {target}"
    else:
        from chemtwin.data.generate import generate_dataset

        generate_dataset(target, n_groups=n // 2, group_size=2, snr=100.0, seed=seed, progress=True)
        how = f"generated {target} (SNR 100, seed {seed})"
    log(f"{how} in {time.perf_counter() - t0:.1f} s")
    return target, how


def model_for(data: Path, model: Path | None, work: Path, seconds: float) -> Path:
    if model is not None:
        return model
    target = work / "model"
    if (target / "model.safetensors").is_file():
        return target
    from chemtwin.tagging import ChemTwin
    from chemtwin.tagging.training_data import ArraySource

    with open_dataset(data) as ds:
        b = ds.read(0, min(TRAIN_ROWS, ds.n_stars))
        # the data's wavelengths go into the model, so that embed recognises the grid
        train = ArraySource(b.flux, b.ivar, b.labels, ds.label_names, b.group, wavelength=ds.wavelength)
    t0 = time.perf_counter()
    ChemTwin(time_limit=seconds, val_fraction=0.0, device="cpu").fit(train, out_dir=target, overwrite=True, progress=False)
    log(f"trained a throwaway default-architecture model in {time.perf_counter() - t0:.1f} s -> {target}")
    return target


def child(args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    n = 20_000 if args.quick else args.n
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = Path(args.data) if args.data else (DEFAULT_SOURCE if DEFAULT_SOURCE.is_file() else None)
    data, how = dataset_for(n, source, work, args.seed)
    model = model_for(data, Path(args.model) if args.model else None, work, args.train_seconds)
    latents = work / f"latents_{n}.h5"
    wall, emb = child(["-q", "embed", str(model), str(data), "--out", str(latents), "--overwrite",
                       "--batch-size", str(args.batch_size)])
    _, base = child(["--load-only", str(model)])
    with h5py.File(latents, "r") as f:
        z = f["z"][:]
    with h5py.File(data, "r") as f:
        n_pixels = int(f["flux"].shape[1])
    size_mib = data.stat().st_size / 2**20
    peak, fixed = emb["peak_rss_kib"] / 1024, base["peak_rss_kib"] / 1024
    result = {
        "n_spectra": n, "data": str(data), "data_origin": how, "file_size_mib": round(size_mib, 1),
        "n_pixels": n_pixels, "model": str(model), "latent_dim": int(z.shape[1]),
        "batch_size": args.batch_size, "embed_wall_s": round(wall, 2), "spectra_per_s": round(n / wall, 1),
        "peak_rss_mib": round(peak, 1), "fixed_rss_mib": round(fixed, 1),
        "streaming_rss_mib": round(peak - fixed, 1), "peak_rss_over_file_size": round(peak / size_mib, 4),
        "latents_finite": bool(np.isfinite(z).all()), "latents_rows": int(z.shape[0]),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }
    log(f"embedded {n:,} spectra ({size_mib:,.0f} MiB file) in {wall:.1f} s ({n / wall:,.0f} spectra/s, "
        f"including start-up); peak RSS {peak:,.0f} MiB = {100 * peak / size_mib:.1f}% of the file "
        f"({fixed:,.0f} MiB imports + model, {peak - fixed:,.0f} MiB streaming)")
    if not args.keep_latents:
        latents.unlink()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20,000 spectra instead of --n")
    p.add_argument("--n", type=int, default=200_000, help="spectra to embed (default 200,000)")
    p.add_argument("--data", default=None, help=f"dataset to reuse (default {DEFAULT_SOURCE.relative_to(ROOT)} if present)")
    p.add_argument("--model", default=None, help="trained model folder (default: a throwaway one, see above)")
    p.add_argument("--work", default=str(ROOT / "out" / "embed_scale"), help="folder for made datasets, model, latents")
    p.add_argument("--train-seconds", type=float, default=15.0, help="training time of the throwaway model (default 15)")
    p.add_argument("--batch-size", type=int, default=1024, help="embed --batch-size (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of a generated dataset")
    p.add_argument("--keep-latents", action="store_true", help="keep the latent file in --work")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    print_or_write_json(run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
