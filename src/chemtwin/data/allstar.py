"""allStar-style catalogues (FITS binary tables): labels of stars looked up by APOGEE_ID.

DR17's allStar holds one row per star and telescope/field; missing values are NaN (-9999 in
DR13-DR16) and ASPCAPFLAG bit 23 (STAR_BAD) marks a star whose ASPCAP fit failed (docs/apogee.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemtwin.core.files import describe_error, open_fits
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import LABEL_NAMES

# ASPCAPFLAG bit 23 = STAR_BAD: ASPCAP's labels for that star are not to be trusted.
ASPCAPFLAG_STAR_BAD = 1 << 23
# Catalogue sentinel for "no value" in DR13-DR16 allStar files (DR17 uses NaN).
MISSING_SENTINEL = -9999.0
REQUIRED_LABELS = ("TEFF", "LOGG")


@dataclass
class Catalog:
    """Labels of stars from an allStar-style table, looked up by APOGEE_ID.

    ``labels`` (N, L) float64 with NaN for missing values; ``flagged`` marks rows whose
    ASPCAPFLAG has STAR_BAD set (False when the table has no ASPCAPFLAG).
    """

    path: str
    ids: np.ndarray
    label_names: tuple[str, ...]
    labels: np.ndarray
    flagged: np.ndarray
    _index: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return int(self.ids.size)

    def row_of(self, apogee_id: str) -> int | None:
        return self._index.get(apogee_id.strip())

    def lookup(self, apogee_id: str, keep_flagged: bool = False) -> np.ndarray:
        """Label row of ``apogee_id``; InputError when absent, flagged or without TEFF/LOGG."""
        if not apogee_id.strip():
            raise InputError("the spectrum's header names no APOGEE ID (APOGEE_ID / OBJID)")
        row = self.row_of(apogee_id)
        if row is None:
            raise InputError(f"APOGEE_ID {apogee_id!r} is not in catalogue {self.path}")
        if self.flagged[row] and not keep_flagged:
            raise InputError(f"APOGEE_ID {apogee_id!r} is flagged STAR_BAD (ASPCAPFLAG bit 23) in {self.path}")
        values = self.labels[row]
        for name in REQUIRED_LABELS:
            if not np.isfinite(values[self.label_names.index(name)]):
                raise InputError(f"APOGEE_ID {apogee_id!r} has no {name} in catalogue {self.path}")
        return values


def _decode(values) -> np.ndarray:
    out = np.asarray(values)
    if out.dtype.kind == "S":
        out = np.char.decode(out, "ascii", errors="replace")
    return np.char.strip(out.astype(str))


def read_catalog(
    path: str | os.PathLike,
    label_names: list[str] | tuple[str, ...] | None = None,
    id_column: str = "APOGEE_ID",
) -> Catalog:
    """Read APOGEE_ID and label columns of an allStar-style FITS table.

    ``label_names``: columns to take (all must exist); default: TEFF, LOGG and every other
    chemtwin label (``chemtwin.spectral_models.labels.LABEL_NAMES``) the table has.  The
    first binary-table HDU with ``id_column`` is used.  Values of -9999 and non-finite values
    become NaN.  When an APOGEE_ID occurs more than once (DR17 lists some stars once per
    telescope/field), the row not flagged STAR_BAD with the highest SNR (if there is an SNR
    column) wins.
    """

    if not Path(path).is_file():
        raise InputError(f"catalogue {path}: no such file")
    with open_fits(path, memmap=True) as hdus:
        table = None
        for hdu in hdus:
            columns = getattr(hdu, "columns", None)
            if columns is not None and id_column in [c.upper() for c in columns.names]:
                table = hdu
                break
        if table is None:
            raise InputError(f"catalogue {path}: no FITS binary table with an {id_column} column")
        upper = {c.upper(): c for c in table.columns.names}
        for name in REQUIRED_LABELS:
            if name not in upper:
                raise InputError(f"catalogue {path}: has no {name} column (a catalogue needs {', '.join(REQUIRED_LABELS)})")
        if label_names is None:
            label_names = list(REQUIRED_LABELS) + [n for n in LABEL_NAMES if n in upper and n not in REQUIRED_LABELS]
        else:
            label_names = [n.strip().upper() for n in label_names]
            missing = [n for n in label_names if n not in upper]
            if missing:
                raise InputError(f"catalogue {path}: has no column(s) {', '.join(missing)}")
        try:
            data = table.data
            ids = _decode(data[upper[id_column]])
            labels = np.empty((ids.size, len(label_names)), dtype=np.float64)
            for k, name in enumerate(label_names):
                column = np.asarray(data[upper[name]])
                if column.ndim != 1 or column.dtype.kind not in "fiu":
                    raise InputError(f"catalogue {path}: column {name} is not a numeric scalar column")
                labels[:, k] = column.astype(np.float64)
            flagged = np.zeros(ids.size, dtype=bool)
            if "ASPCAPFLAG" in upper:
                flags = np.asarray(data[upper["ASPCAPFLAG"]])
                if flags.ndim == 1 and flags.dtype.kind in "iu":
                    flagged = (flags.astype(np.int64) & ASPCAPFLAG_STAR_BAD) != 0
            snr = np.asarray(data[upper["SNR"]], dtype=np.float64) if "SNR" in upper else np.zeros(ids.size)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"catalogue {path}: unreadable table ({describe_error(exc, 120)})") from None
    labels[~np.isfinite(labels) | (labels <= MISSING_SENTINEL + 0.5)] = np.nan
    # Resolve duplicates: prefer unflagged, then highest SNR; a stable order keeps the first.
    snr = np.where(np.isfinite(snr), snr, -np.inf)
    order = np.lexsort((-snr, flagged, ids))
    index: dict[str, int] = {}
    for row in order:
        index.setdefault(str(ids[row]), int(row))
    return Catalog(str(path), ids, tuple(label_names), labels, flagged, index)
