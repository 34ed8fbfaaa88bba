"""Datasets emulated by a Payne emulator instead of the embedded synthesizer (``chemtwin generate --emulator``).

Twin groups drawn inside the emulator's label box (``emulator_population``), emulated, with
the noise, chunking and seeding (``[seed, chunk]``) of ``chemtwin.data.generate``.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from chemtwin.core.files import prepare_output
from chemtwin.core.grids import identify_grid
from chemtwin.data.augment import check_snr
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.generate import CHUNK_STARS, add_noise
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import PayneEmulator, emulator_population


def generate_emulator_dataset(
    path: str | os.PathLike,
    emulator: PayneEmulator,
    n_groups: int,
    group_size: int = 2,
    snr: float = float("inf"),
    seed: int = 0,
    *,
    chemical_labels: Sequence[str] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    wavelength: np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Write ``n_groups`` groups of ``group_size`` twins emulated by ``emulator`` to a dataset.

    Labels come from :func:`emulator_population`; chunking, seeding (``[seed, chunk]``) and
    noise follow :func:`chemtwin.data.generate.generate_dataset`.  ``wavelength`` is needed
    when the emulator stores none.
    """
    if n_groups < 1:
        raise InputError(f"n_groups must be >= 1, got {n_groups}", "n_groups")
    if group_size < 1:
        raise InputError(f"group_size must be >= 1, got {group_size}", "group_size")
    check_snr(snr, "snr", allow_inf=True, option="snr")
    prepare_output(path, overwrite)
    wavelength = emulator.wavelength if wavelength is None else np.asarray(wavelength, dtype=np.float64)
    if wavelength is None or wavelength.size != emulator.n_pixels:
        raise InputError(
            f"{emulator.source}: the emulator stores no wavelength grid and none of {emulator.n_pixels} pixels was given"
        )
    chemical = emulator.chemical_label_names() if chemical_labels is None else list(chemical_labels)
    emulator_population(emulator, [], 0, chemical_labels=chemical, ranges=ranges)  # validate before writing
    groups_per_chunk = max(1, CHUNK_STARS // group_size)
    attrs = {
        "generator": "payne-emulator", "emulator": str(emulator.source), "seed": seed, "snr": snr,
        "grid": identify_grid(wavelength) or "custom", "group_size": group_size,
        "chemical_labels": " ".join(chemical),
    }
    with DatasetWriter(path, wavelength, emulator.label_names, attrs=attrs, overwrite=overwrite,
                       expected_rows=n_groups * group_size) as writer, \
            tqdm(total=n_groups * group_size, unit="spectra", disable=not progress, desc="generate") as bar:
        for chunk in range(math.ceil(n_groups / groups_per_chunk)):
            rng = np.random.default_rng([seed, chunk])
            first = chunk * groups_per_chunk
            count = min(groups_per_chunk, n_groups - first)
            labels, group = emulator_population(
                emulator, np.full(count, group_size), rng, chemical_labels=chemical, ranges=ranges
            )
            flux, ivar = add_noise(emulator.predict(labels).astype(np.float32), snr, rng)
            writer.append(flux, ivar, labels.astype(np.float32), group + first)
            bar.update(len(labels))
    return str(path)
