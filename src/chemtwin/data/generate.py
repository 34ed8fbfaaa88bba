"""Streaming generation of twin datasets with the embedded synthesizer.

Groups are generated in chunks; chunk k draws its labels and noise from
``numpy.random.default_rng([seed, k])``, so the same seed gives the same spectra whatever
computes the chunk: ``generate_sharded`` hands runs of chunks to Dask workers, one shard
file each, and its rows equal ``generate_dataset``'s bit for bit.
Memory stays flat: one chunk of spectra is held at a time.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chemtwin.core.files import check_free_space, prepare_output
from chemtwin.core.grids import get_grid
from chemtwin.core.threads import torch_threads
from chemtwin.data.augment import check_snr
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.label_errors import LabelErrors
from chemtwin.data.population import RedGiantPrior, twin_groups
from chemtwin.data.shard_folder import MANIFEST, grid_hash
from chemtwin.data.shards import run_shards, shard_ranges
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import LABEL_NAMES, check_in_range
from chemtwin.spectral_models.linelist import DEFAULT_LINELIST, LINELISTS, load_linelist
from chemtwin.spectral_models.lines import LineSynthesizer

CHUNK_STARS = 1024  # ~60 MB of flux per chunk: memory stays flat whatever N is
SYNTH_BATCH = 32  # small batches keep the oversampled arrays in cache (measured fastest)
# "Observed-like" spectra (mismatch): the synthesizer with wrong atomic data, LineList.perturbed.
# One fixed default seed, so that every mismatch file (training and validation sets alike)
# comes from the same "true" line list, as all real stars do.
MISMATCH_LOGGF_SIGMA = 0.1  # dex, per line
MISMATCH_DROP_FRACTION = 0.1
MISMATCH_SEED = 0


def mismatch_seed(mismatch) -> int | None:
    """Seed of the perturbed line list: None (clean) for False/None, MISMATCH_SEED for True."""
    if mismatch is None or mismatch is False:
        return None
    if mismatch is True:
        return MISMATCH_SEED
    if isinstance(mismatch, (int, np.integer)) and mismatch >= 0:
        return int(mismatch)
    raise InputError(f"mismatch must be True/False or a seed >= 0, got {mismatch!r}")


def make_synthesizer(grid: str = "aspcap", mismatch: int | None = None,
                     linelist: str = DEFAULT_LINELIST) -> LineSynthesizer:
    """The embedded synthesizer on one of the shipped line lists; with a mismatch seed, that
    list perturbed with that seed."""
    lines = load_linelist(linelist)
    if mismatch is not None:
        lines = lines.perturbed(MISMATCH_LOGGF_SIGMA, MISMATCH_DROP_FRACTION, seed=mismatch)
    return LineSynthesizer(grid=grid, linelist=lines)


def add_noise(flux: np.ndarray, snr: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise of sigma = 1/SNR per pixel; ivar = SNR^2 (inf for SNR = inf, no noise)."""
    if math.isinf(snr):
        return flux, np.full_like(flux, np.inf)
    noisy = flux + rng.standard_normal(flux.shape, dtype=np.float32) / np.float32(snr)
    return noisy, np.full_like(flux, snr**2)




def synthesize(synth: LineSynthesizer, labels: np.ndarray, threads: int = 2) -> np.ndarray:
    """Flux for many stars: small batches spread over ``threads`` threads (torch releases the GIL).

    Intra-op threading is turned off meanwhile: on small batches it costs more than it gains.
    """
    tensor = torch.as_tensor(labels, dtype=synth.dtype)
    batches = torch.split(tensor, SYNTH_BATCH)
    with torch_threads(1), torch.no_grad(), ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(synth, batches))
    return torch.cat(parts).numpy().astype(np.float32)


@dataclass(frozen=True)
class Plan:
    """What decides a generated dataset: chunk k holds groups [k*groups_per_chunk, ...)."""

    n_groups: int
    group_size: int
    snr: float
    seed: int
    grid: str
    prior: RedGiantPrior
    chunk_stars: int
    mismatch: int | None = None  # seed of the perturbed line list (mismatch_seed); None: the true one
    linelist: str = DEFAULT_LINELIST
    label_errors: LabelErrors | None = None  # TEFF/LOGG as a survey gives them; the truth in true_labels

    def __post_init__(self):
        if self.linelist not in LINELISTS:
            raise InputError(f"unknown line list {self.linelist!r}; choose from {', '.join(LINELISTS)}", "linelist")
        if self.n_groups < 1:
            raise InputError(f"n_groups must be >= 1, got {self.n_groups}", "n_groups")
        if self.group_size < 1:
            raise InputError(f"group_size must be >= 1, got {self.group_size}", "group_size")
        check_snr(self.snr, "snr", allow_inf=True, option="snr")

    @property
    def groups_per_chunk(self) -> int:
        return max(1, self.chunk_stars // self.group_size)

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_groups / self.groups_per_chunk)

    def chunk_rows(self, chunk: int) -> int:
        return min(self.groups_per_chunk, self.n_groups - chunk * self.groups_per_chunk) * self.group_size

    @property
    def attrs(self) -> dict:
        attrs = {"generator": "chemtwin.lines", "seed": self.seed, "snr": self.snr, "grid": self.grid,
                 "group_size": self.group_size, "prior": repr(self.prior), "linelist": self.linelist}
        if self.label_errors is not None:
            attrs["label_errors"] = self.label_errors.to_json()
        if self.mismatch is not None:
            attrs.update(generator="chemtwin.lines+mismatch", mismatch_seed=self.mismatch,
                         mismatch_loggf_sigma=MISMATCH_LOGGF_SIGMA, mismatch_drop_fraction=MISMATCH_DROP_FRACTION)
        return attrs

    def chunk(self, synth: LineSynthesizer, chunk: int, threads: int) -> dict:
        """The rows of chunk ``chunk`` (``DatasetWriter.append``'s arguments): its own generator,
        labels before noise, label errors last (the spectra do not depend on them)."""
        rng = np.random.default_rng([self.seed, chunk])
        first = chunk * self.groups_per_chunk
        count = min(self.groups_per_chunk, self.n_groups - first)
        labels, group = twin_groups(count, self.group_size, self.prior, rng, first_group=first)
        check_in_range(LABEL_NAMES, labels)
        flux, ivar = add_noise(synthesize(synth, labels, threads), self.snr, rng)
        rows = {"flux": flux, "ivar": ivar, "labels": labels.astype(np.float32), "group": group}
        if self.label_errors is not None:
            rows.update(labels=self.label_errors.apply(rows["labels"], LABEL_NAMES, rng), true_labels=rows["labels"])
        return rows


def generate_dataset(
    path: str | os.PathLike,
    n_groups: int,
    group_size: int = 2,
    snr: float = math.inf,
    seed: int = 0,
    grid: str = "aspcap",
    prior: RedGiantPrior | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    chunk_stars: int | None = None,
    mismatch: bool | int = False,
    linelist: str = DEFAULT_LINELIST,
    label_errors: LabelErrors | None = None,
) -> str:
    """Write ``n_groups`` groups of ``group_size`` chemical twins to a dataset file.

    ``chunk_stars`` (default ``CHUNK_STARS``) is part of the seed: keep it to reproduce a file.
    ``mismatch`` (True or a seed): "observed-like" spectra from a perturbed line list
    (:func:`make_synthesizer`); the labels are those of the clean file of the same seed.
    ``linelist``: the shipped line list (``chemtwin.spectral_models.linelist.LINELISTS``).
    ``label_errors``: the file's ``labels`` hold TEFF/LOGG as a survey gives them
    (``chemtwin.data.label_errors``) and ``true_labels`` the truth; the spectra are those of
    the file without errors of the same seed."""
    plan = Plan(n_groups, group_size, snr, seed, grid, prior or RedGiantPrior(), chunk_stars or CHUNK_STARS,
                mismatch_seed(mismatch), linelist, label_errors)
    prepare_output(path, overwrite)
    check_free_space(path, dataset_bytes(n_groups * group_size, grid), f"{n_groups * group_size} spectra")
    threads = threads or min(2, os.cpu_count() or 1)
    synth = make_synthesizer(grid, plan.mismatch, plan.linelist)
    with DatasetWriter(path, synth.wavelength, LABEL_NAMES, attrs=plan.attrs, overwrite=overwrite,
                       expected_rows=n_groups * group_size, with_true_labels=label_errors is not None) as writer, \
            tqdm(total=n_groups * group_size, unit="spectra", disable=not progress, desc="generate") as bar:
        for chunk in range(plan.n_chunks):
            rows = plan.chunk(synth, chunk, threads)
            writer.append(**rows)
            bar.update(len(rows["group"]))
    return str(path)


def dataset_bytes(n_stars: int, grid: str) -> int:
    """Size of a generated dataset on disk: float32 flux and ivar per pixel, labels, group (uncompressed)."""
    return n_stars * (8 * get_grid(grid).n_pixels + 4 * len(LABEL_NAMES) + 8)


@lru_cache(maxsize=4)
def _synthesizer(grid: str, mismatch: int | None = None, linelist: str = DEFAULT_LINELIST) -> LineSynthesizer:
    """One synthesizer per grid (and line list) and worker process, kept for the worker's next shards."""
    return make_synthesizer(grid, mismatch, linelist)


def generate_shard(spec: dict, path: str) -> dict:
    """Dask task: chunks [first, last) of ``spec["plan"]`` into the dataset file ``path``."""
    plan: Plan = spec["plan"]
    synth = _synthesizer(plan.grid, plan.mismatch, plan.linelist)
    first, last = spec["chunks"]
    rows = sum(plan.chunk_rows(c) for c in range(first, last))
    with torch_threads(spec["threads"]), DatasetWriter(path, synth.wavelength, LABEL_NAMES, attrs=plan.attrs,
                                                        overwrite=True, expected_rows=rows,
                                                        with_true_labels=plan.label_errors is not None) as writer:
        for chunk in range(first, last):
            writer.append(**plan.chunk(synth, chunk, spec["threads"]))
    return {"rows": writer.n_rows}


def generate_sharded(
    folder: str | os.PathLike,
    n_groups: int,
    group_size: int = 2,
    snr: float = math.inf,
    seed: int = 0,
    grid: str = "aspcap",
    prior: RedGiantPrior | None = None,
    client=None,
    shard_stars: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
    threads: int = 1,
    chunk_stars: int | None = None,
    mismatch: bool | int = False,
    linelist: str = DEFAULT_LINELIST,
    label_errors: LabelErrors | None = None,
) -> dict:
    """``generate_dataset`` as a folder of shards + manifest, one task per shard on the Dask
    ``client`` (in this process when None); the same rows for the same seed.  Shards hold whole
    chunks (``shard_stars`` is rounded to them).  Returns the manifest."""
    chunk_stars = chunk_stars or CHUNK_STARS
    plan = Plan(n_groups, group_size, snr, seed, grid, prior or RedGiantPrior(), chunk_stars, mismatch_seed(mismatch),
                linelist, label_errors)
    check_free_space(Path(folder) / MANIFEST, dataset_bytes(n_groups * group_size, grid), f"{n_groups * group_size} spectra")
    per_shard = max(1, round(shard_stars / (plan.groups_per_chunk * group_size)))
    specs = [{"plan": plan, "chunks": r, "threads": threads} for r in shard_ranges(plan.n_chunks, per_shard)]
    wavelength = _synthesizer(grid).wavelength
    manifest, _ = run_shards(
        folder, "dataset", {"command": "generate", **plan.attrs, "n_groups": n_groups, "chunk_stars": chunk_stars,
                            "chunks_per_shard": per_shard},
        specs, generate_shard, client, header={"pixel_grid": grid_hash(wavelength), "n_pixels": int(wavelength.size)},
        overwrite=overwrite, progress=progress, desc="generate")
    return manifest
