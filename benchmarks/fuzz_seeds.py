"""Valid seed inputs of the fuzz campaign (benchmarks/fuzz_campaign.py), built once.

Everything is small (tens of stars on the 7,214-pixel ASPCAP grid, a model with a 4-d
latent and one hidden layer of 32) so that a command on them takes a second or two, and
everything is made by chemtwin's own writers so that a seed is exactly what a user has.
Run in a subprocess of the campaign (``python benchmarks/fuzz_seeds.py SEED_DIR``): the
campaign's parent process must not start torch's thread pools before it forks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "apogee"
# The APOGEE_IDs of the four DR17 fixtures (tests/test_ingest.py).
FIXTURE_IDS = ["2M17335483-2753043", "2M19485057+5005279", "2M01183798+8403419", "2M00242666+5341178"]
SEED_FORMAT = 3  # bump when the seeds change: a campaign folder with older seeds rebuilds them


def _cli(*argv: str) -> None:
    from chemtwin.cli import main

    rc = main(["-q", *argv])
    if rc != 0:
        raise RuntimeError(f"seed step failed with exit {rc}: chemtwin {' '.join(argv)}")


def build(seed_dir: Path) -> dict:
    """Write every seed into ``seed_dir``; returns the seed index (name -> path, plus facts)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from astropy.table import Table

    from chemtwin.data.generate import generate_dataset, generate_sharded
    from chemtwin.tagging import ChemTwin

    d = Path(seed_dir)
    d.mkdir(parents=True, exist_ok=True)
    s: dict[str, str] = {}

    def path(name: str) -> Path:
        s[name.split(".")[0].replace("/", "_")] = str(d / name)
        return d / name

    # Datasets: 40 stars to evaluate on (`evaluate` needs 30 for its leakage probe), 60 to train
    # on, 400 single stars for The Cannon's 210 quadratic terms in 19 labels (the synthesizer, SNR 100).
    generate_dataset(path("data.h5"), n_groups=20, snr=100, seed=1, progress=False, threads=1)
    generate_dataset(path("train.h5"), n_groups=30, snr=100, seed=2, progress=False, threads=1)
    generate_dataset(path("train_big.h5"), n_groups=400, group_size=1, snr=100, seed=4, progress=False, threads=1)
    generate_dataset(path("noiseless.h5"), n_groups=6, seed=3, progress=False, threads=1)
    # A shard folder of 40 stars (3 shards), written in-process by the sharded writer.
    generate_sharded(path("shards"), n_groups=20, snr=100, seed=1, client=None, shard_stars=16, chunk_stars=16,
                     progress=False)
    # A small model (seconds to train) and its latents.
    ChemTwin(epochs=2, latent_dim=4, batch_size=16, decoder_hidden=(32,), adversary_hidden=(16,), val_fraction=0.0,
             device="cpu", seed=0).fit(str(d / "train.h5"), out_dir=path("model"), progress=False)
    _cli("embed", s["model"], s["data"], "--out", str(path("latents.h5")))
    _cli("embed", s["model"], s["train"], "--out", str(path("train_latents.h5")))
    _cli("index", s["latents"], "--out", str(path("index")))
    _cli("index", s["train_latents"], "--out", str(path("index_hnsw")), "--kind", "hnsw", "--M", "8")
    _cli("index", s["train_latents"], "--out", str(path("index_ivf")), "--kind", "ivf", "--nlist", "4", "--nprobe", "2")
    _cli("embed", s["model"], s["data"], "--out", str(path("latent_shards")), "--workers", "1", "--shard-size", "16",
         "--batch-size", "16")
    # Baselines: a Cannon model, a small Payne emulator, their label files.
    _cli("cannon", "train", s["train"], "--labels", "TEFF,LOGG,FE_H", "--out", str(path("cannon.npz")), "--threads", "1")
    _cli("cannon", "test", s["cannon"], s["data"], "--out", str(path("cannon_labels.h5")), "--threads", "1")
    _cli("payne", "train", s["train"], "--labels", "TEFF", "LOGG", "FE_H", "--hidden", "8", "--epochs", "3",
         "--out", str(path("emulator.npz")), "--threads", "1")
    # Pixel masks for `cannon train --pixel-mask` (keep every other pixel).
    n_pixels = 7214
    np.save(path("mask.npy"), np.arange(n_pixels) % 2 == 0)
    # An allStar-style catalogue of the four fixtures and a file list of them.
    Table({
        "APOGEE_ID": FIXTURE_IDS,
        "TEFF": np.array([3700.0, 4800.0, 4600.0, 4550.0], dtype="f4"),
        "LOGG": np.array([0.6, 2.5, 2.3, 2.9], dtype="f4"),
        "FE_H": np.array([-0.2, 0.1, -0.4, 0.05], dtype="f4"),
        "MG_FE": np.array([0.1, 0.2, 0.0, 0.1], dtype="f4"),
        "ASPCAPFLAG": np.zeros(4, dtype="i8"),
        "SNR": np.array([154.0, 137.0, 45.0, 90.0], dtype="f4"),
    }).write(path("catalog.fits"))
    fits_dir = d / "fits"
    fits_dir.mkdir(exist_ok=True)
    fixtures = sorted(FIXTURES.glob("*.fits")) if FIXTURES.is_dir() else []
    for f in fixtures:  # copies, so that a command can never touch the shared originals
        shutil.copy(f, fits_dir / f.name)
        os.chmod(fits_dir / f.name, 0o644)
    s["fits"] = str(fits_dir)
    s["apstar"] = str(fits_dir / "apStar-dr17-2M19485057+5005279.fits")
    s["apvisit"] = str(fits_dir / "apVisit-r13-5095-55844-128.fits")
    (d / "filelist.txt").write_text("".join(f"{fits_dir / f.name}\n" for f in fixtures))
    s["filelist"] = str(d / "filelist.txt")
    # A Jacobian cache of the oracle for data.h5.
    _cli("evaluate", s["data"], "--method", "oracle", "--jacobians", str(path("jacobians.h5")),
         "--json", str(d / "oracle.json"))
    index = {"format": SEED_FORMAT, "seeds": s, "fixtures": len(fixtures), "n_pixels": n_pixels}
    (d / "seeds.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def ensure(seed_dir: Path) -> dict:
    """The seed index, building the seeds in a fresh interpreter when missing or outdated."""
    index_path = Path(seed_dir) / "seeds.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        if index.get("format") == SEED_FORMAT:
            return index
    if Path(seed_dir).exists():
        shutil.rmtree(seed_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, __file__, str(seed_dir)], check=True, env=env)
    return json.loads(index_path.read_text())


if __name__ == "__main__":
    build(Path(sys.argv[1]))
