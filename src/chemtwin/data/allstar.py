"""allStar-style catalogues (FITS binary tables): labels of stars looked up by APOGEE_ID.

DR17's allStar holds one row per star and telescope/field; missing values are NaN (-9999 in
DR13-DR16) and ASPCAPFLAG bit 23 (STAR_BAD) marks a star whose ASPCAP fit failed (docs/apogee.md).

Selecting stars for training (docs/workflow.md): ``QualityCuts`` (SNR, STARFLAG/ASPCAPFLAG
bits, TEFF/LOGG ranges) and ``select_rows`` (the cuts, then one row per APOGEE_ID by the
duplicate rule of ``resolve_duplicates``); the spectrum files to ingest, as a ``Selection``:
``select_mirror`` (the catalogue's stars in the DR17 layout of a local mirror) and
``select_files`` (given files, one per APOGEE_ID).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chemtwin.core.files import describe_error, open_fits
from chemtwin.data.apogee import DR17_LAYOUT, dr17_path, file_facts
from chemtwin.errors import InputError
from chemtwin.spectral_models.labels import LABEL_NAMES

log = logging.getLogger(__name__)

# ASPCAPFLAG bit 23 = STAR_BAD: ASPCAP's labels for that star are not to be trusted.
ASPCAPFLAG_STAR_BAD = 1 << 23
# Catalogue sentinel for "no value" in DR13-DR16 allStar files (DR17 uses NaN).
MISSING_SENTINEL = -9999.0
REQUIRED_LABELS = ("TEFF", "LOGG")
# DR17 telescopes (allStar TELESCOPE; the folder under .../stars/ and .../synspec_rev1/).
DR17_TELESCOPES = ("apo25m", "lco25m", "apo1m")
# APOGEE_STARFLAG bits the APOGEE pipeline itself classes as BAD (apogee package, getstarflags):
# BAD_PIXELS (0), VERY_BRIGHT_NEIGHBOR (3), BAD_RV_COMBINATION (18).
STARFLAG_BAD_BITS = (0, 3, 18)
STARFLAG_BAD = sum(1 << b for b in STARFLAG_BAD_BITS)


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
    snr: np.ndarray | None = None         # allStar SNR (None: no SNR column)
    starflag: np.ndarray | None = None    # allStar STARFLAG (None: no column)
    aspcapflag: np.ndarray | None = None  # allStar ASPCAPFLAG (None: no column)
    telescope: np.ndarray | None = None   # allStar TELESCOPE, str (None: no column)
    fields: np.ndarray | None = None      # allStar FIELD, str (None: no column)

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
            snr_column = np.asarray(data[upper["SNR"]], dtype=np.float64) if "SNR" in upper else None
            snr = snr_column if snr_column is not None else np.zeros(ids.size)
            starflag = _int_column(data, upper, "STARFLAG", path)
            aspcapflag = _int_column(data, upper, "ASPCAPFLAG", path)
            telescope = _decode(data[upper["TELESCOPE"]]) if "TELESCOPE" in upper else None
            fields = _decode(data[upper["FIELD"]]) if "FIELD" in upper else None
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
    return Catalog(str(path), ids, tuple(label_names), labels, flagged, index, snr=snr_column, starflag=starflag,
                   aspcapflag=aspcapflag, telescope=telescope, fields=fields)


def _int_column(data, upper: dict, name: str, path) -> np.ndarray | None:
    if name not in upper:
        return None
    column = np.asarray(data[upper[name]])
    if column.ndim != 1 or column.dtype.kind not in "iu":
        raise InputError(f"catalogue {path}: column {name} is not an integer bitmask column")
    return column.astype(np.int64)


def check_telescope(telescope: str | None) -> str | None:
    """``telescope`` if it is a DR17 telescope (or None); InputError otherwise."""
    if telescope is not None and telescope not in DR17_TELESCOPES:
        raise InputError(f"unknown telescope {telescope!r}; DR17 telescopes are {', '.join(DR17_TELESCOPES)}")
    return telescope


def resolve_duplicates(ids, snr, prefer=None) -> np.ndarray:
    """Indices (sorted) of one entry per id: the entry with the highest SNR (NaN counts as
    lowest); among equal SNR the lowest ``prefer`` (e.g. 0 for apStar, 1 for aspcapStar), then
    the first.  The duplicate rule of docs/workflow.md, for allStar rows and spectrum files."""
    ids = np.asarray(ids).astype(str)
    snr = np.asarray(snr, dtype=np.float64)
    snr = np.where(np.isfinite(snr), snr, -np.inf)
    prefer = np.zeros(ids.size, np.int64) if prefer is None else np.asarray(prefer, np.int64)
    order = np.lexsort((np.arange(ids.size), prefer, -snr, ids))
    first = np.r_[True, ids[order][1:] != ids[order][:-1]] if order.size else np.zeros(0, bool)
    return np.sort(order[first])


@dataclass
class QualityCuts:
    """Which allStar rows are good enough to train on (defaults in docs/workflow.md).

    ``min_snr``: allStar SNR > min_snr (70); ``starflag_mask``: no STARFLAG bit of it set (the
    pipeline's BAD bits 0, 3, 18); ``aspcapflag_mask``: no ASPCAPFLAG bit of it set (STAR_BAD,
    bit 23); ``teff``, ``logg``: inside these ranges (the red-giant training prior,
    ``chemtwin.data.population.RedGiantPrior``: 4000-5500 K, 1.0-3.5).  A cut whose column
    the catalogue lacks is not applied, with a warning.  None switches one cut off."""

    min_snr: float | None = 70.0
    starflag_mask: int | None = STARFLAG_BAD
    aspcapflag_mask: int | None = ASPCAPFLAG_STAR_BAD
    teff: tuple[float, float] | None = (4000.0, 5500.0)
    logg: tuple[float, float] | None = (1.0, 3.5)

    def reasons(self, catalog: Catalog) -> list[str | None]:
        """For every catalogue row, why it fails the cuts (None: it passes)."""
        n = len(catalog)
        why: list[str | None] = [None] * n

        def mark(bad, text) -> None:
            for row in np.flatnonzero(bad):
                if why[row] is None:
                    why[row] = text(row)

        def missing(column: str, cut: str) -> None:
            log.warning("catalogue %s has no %s column: the %s cut is not applied", catalog.path, column, cut)

        if self.min_snr is not None:
            if catalog.snr is None:
                missing("SNR", "SNR")
            else:
                snr = catalog.snr
                mark(~(snr > self.min_snr), lambda r: f"SNR {snr[r]:.1f} is not above {self.min_snr:g}")
        for column, mask, values in (("STARFLAG", self.starflag_mask, catalog.starflag),
                                     ("ASPCAPFLAG", self.aspcapflag_mask, catalog.aspcapflag)):
            if mask:
                if values is None:
                    missing(column, column)
                else:
                    mark((values & mask) != 0, lambda r, c=column, v=values, m=mask: f"{c} has bit(s) {_bits(v[r] & m)} set")
        for name, bounds in (("TEFF", self.teff), ("LOGG", self.logg)):
            if bounds is not None:
                values = catalog.labels[:, catalog.label_names.index(name)]
                mark(~((values >= bounds[0]) & (values <= bounds[1])),
                     lambda r, v=values, b=bounds, nm=name: f"{nm} {v[r]:g} is outside {b[0]:g}-{b[1]:g}")
        return why


def _bits(value: int) -> str:
    return ",".join(str(b) for b in range(64) if int(value) >> b & 1)


def _reasons(catalog: Catalog, cuts: QualityCuts | None, telescope: str | None) -> list:
    """Why each catalogue row is left out (None: kept): the cuts, no TEFF/LOGG, another telescope."""
    check_telescope(telescope)
    if telescope is not None and catalog.telescope is None:
        raise InputError(f"catalogue {catalog.path}: has no TELESCOPE column (needed for a telescope choice)")
    why = cuts.reasons(catalog) if cuts is not None else [None] * len(catalog)
    for k in range(2):
        for row in np.flatnonzero(~np.isfinite(catalog.labels[:, k])):
            why[row] = why[row] or f"no {catalog.label_names[k]}"
    if telescope is not None:
        for row in np.flatnonzero(catalog.telescope != telescope):
            why[row] = why[row] or f"observed with {catalog.telescope[row]}, not {telescope}"
    return why


def _select(catalog: Catalog, why: list):
    """``(rows, rejected, n_duplicate_rows)`` of ``select_rows`` from the reasons ``why``."""
    candidates = np.flatnonzero(np.array([w is None for w in why], bool))
    snr = catalog.snr if catalog.snr is not None else np.zeros(len(catalog))
    rows = candidates[resolve_duplicates(catalog.ids[candidates], snr[candidates])]
    kept = set(catalog.ids[rows].tolist())
    rejected, seen = [], set()
    for row in range(len(catalog)):
        star = str(catalog.ids[row])
        if star not in kept and star not in seen and why[row] is not None:
            seen.add(star)
            rejected.append((star, why[row]))
    return rows, rejected, int(candidates.size - rows.size)


def select_rows(catalog: Catalog, cuts: QualityCuts | None, telescope: str | None = None):
    """The catalogue rows to ingest: ``(rows, rejected)``.  ``rows`` holds one row per APOGEE_ID
    that passes ``cuts`` (None: no cuts) and has TEFF and LOGG, chosen by ``resolve_duplicates``
    (only ``telescope``'s rows with one); ``rejected`` is ``[(apogee_id, reason)]`` of stars
    left out, one entry per star."""
    rows, rejected, _ = _select(catalog, _reasons(catalog, cuts, telescope))
    return rows, rejected


# ---------------------------------------------------------------------- what to ingest
# On equal SNR: apStar (normalized by chemtwin like every file) before aspcapStar before apVisit.
KIND_PREFERENCE = {"apStar": 0, "aspcapStar": 1, "apVisit": 2}


@dataclass
class Selection:
    """Which spectrum files to read and where each one's labels come from (picklable, for Dask).

    ``row_of_file``: {file: catalogue row} (from a mirror: the row chosen for the star);
    ``row_of_id``: {APOGEE_ID: row} of the stars that pass the quality cuts (files with cuts);
    ``rejected``: {APOGEE_ID: why} of stars the cuts or the telescope choice left out;
    ``sources``: {file: (TELESCOPE, FIELD)}; ``dropped``: [(file, why)] of duplicates not read;
    ``id_of_file``: {file: APOGEE_ID} where known before reading; ``duplicate_rows``: catalogue
    rows passing the cuts that lost to another row of their star (their files are not looked at)."""

    files: list
    row_of_file: dict
    row_of_id: dict | None
    rejected: dict
    sources: dict
    dropped: list
    id_of_file: dict = field(default_factory=dict)
    duplicate_rows: int = 0

    def subset(self, files: list, rename: dict | None = None) -> Selection:
        """The part a shard of ``files`` needs (paths renamed by ``rename``), not the whole catalogue's."""
        rename = rename or {}
        ids = {self.id_of_file.get(f) for f in files} - {None}
        row_of_id = None if self.row_of_id is None else {i: self.row_of_id[i] for i in ids if i in self.row_of_id}
        return Selection([rename.get(f, f) for f in files],
                         {rename.get(f, f): self.row_of_file[f] for f in files if f in self.row_of_file}, row_of_id,
                         {i: self.rejected[i] for i in ids if i in self.rejected},
                         {rename.get(f, f): self.sources[f] for f in files if f in self.sources}, [],
                         {rename.get(f, f): self.id_of_file[f] for f in files if f in self.id_of_file})

    def labels_of(self, catalog: Catalog, keep_flagged: bool = False):
        """``labels_of(spectrum)``: the chosen catalogue row's labels, else the star's by APOGEE_ID;
        InputError for a star the cuts left out, or a file holding another star than its row's."""

        def labels_of(spectrum) -> np.ndarray:
            star = spectrum.apogee_id.strip()
            row = self.row_of_file.get(spectrum.path)
            if row is not None:
                if star != catalog.ids[row]:
                    raise InputError(f"{spectrum.path}: holds APOGEE_ID {star!r}, but its catalogue row is {catalog.ids[row]!r}")
                return catalog.labels[row]
            if star in self.rejected:
                raise InputError(f"APOGEE_ID {star!r} is left out: {self.rejected[star]}")
            if self.row_of_id is not None and star in self.row_of_id:
                return catalog.labels[self.row_of_id[star]]
            return catalog.lookup(star, keep_flagged=keep_flagged)

        return labels_of


def select_mirror(catalog: Catalog, root: str | os.PathLike, spectra: str = "apStar", telescope: str | None = None,
                  cuts: QualityCuts | None = None) -> Selection:
    """The catalogue's stars (``cuts``, one row each by ``select_rows``) at their DR17 paths under
    the mirror ``root`` (``chemtwin.data.apogee.dr17_path``; ``spectra``: apStar or aspcapStar)."""
    if not Path(root).is_dir():
        raise InputError(f"mirror root {root}: no such folder")
    if spectra not in DR17_LAYOUT:
        raise InputError(f"unknown DR17 spectrum kind {spectra!r}; choose {' or '.join(DR17_LAYOUT)}")
    missing = [c for c, v in (("TELESCOPE", catalog.telescope), ("FIELD", catalog.fields)) if v is None]
    if missing:
        raise InputError(f"catalogue {catalog.path}: has no {' or '.join(missing)} column (needed with a mirror root)")
    rows, rejected, n_duplicates = _select(catalog, _reasons(catalog, cuts, telescope))
    if not rows.size:
        reasons = Counter(why.split(" ")[0] for _, why in rejected)
        raise InputError(f"no star of catalogue {catalog.path} passes the quality cuts"
                         f" ({', '.join(f'{k}: {n}' for k, n in reasons.most_common())}); nothing written")
    paths = [str(dr17_path(root, catalog.telescope[r], catalog.fields[r], catalog.ids[r], spectra)) for r in rows]
    return Selection(paths, {p: int(r) for p, r in zip(paths, rows)}, None, dict(rejected),
                     {p: (str(catalog.telescope[r]), str(catalog.fields[r])) for p, r in zip(paths, rows)}, [],
                     {p: str(catalog.ids[r]) for p, r in zip(paths, rows)}, n_duplicates)


def select_files(catalog: Catalog, files: list, telescope: str | None = None, cuts: QualityCuts | None = None) -> Selection:
    """Spectrum ``files``, one per APOGEE_ID (``resolve_duplicates`` on the header SNR, only
    ``telescope``'s with one), reading headers only; the ``cuts`` judged by APOGEE_ID.  A file's
    TELESCOPE and FIELD: its DR17 path, else its header, else the star's catalogue row.  Files
    whose header cannot be read or names no star are kept: reading them reports why."""
    check_telescope(telescope)
    row_of_id, rejected = None, {}
    if cuts is not None:
        rows, out = select_rows(catalog, cuts)
        row_of_id = {str(catalog.ids[r]): int(r) for r in rows}
        rejected = dict(out)
    facts, unread = [], []
    for path in files:
        try:
            f = file_facts(path)
        except Exception:
            unread.append(path)
            continue
        (facts if f.apogee_id else unread).append(f if f.apogee_id else path)  # no ID: no duplicate of anything
    for f in facts:
        row = catalog.row_of(f.apogee_id)
        if row is not None:
            if not f.telescope and catalog.telescope is not None:
                f.telescope = str(catalog.telescope[row])
            if not f.field and catalog.fields is not None:
                f.field = str(catalog.fields[row])
    dropped = []
    if telescope is not None:
        dropped += [(f.path, f"not from {telescope} (telescope {f.telescope or 'unknown'})")
                    for f in facts if f.telescope != telescope]
        facts = [f for f in facts if f.telescope == telescope]
    keep = resolve_duplicates([f.apogee_id for f in facts], [f.snr for f in facts],
                              [KIND_PREFERENCE.get(f.kind, 3) for f in facts])
    chosen = {facts[k].apogee_id: facts[k] for k in keep}
    for f in facts:
        kept = chosen[f.apogee_id]
        if kept is not f:
            dropped.append((f.path, f"APOGEE_ID {f.apogee_id} also in {kept.path} (SNR {kept.snr:.1f} vs {f.snr:.1f}, "
                                    f"{kept.kind} vs {f.kind}): kept that one"))
    kept_paths = {f.path for f in chosen.values()} | set(unread)
    return Selection([p for p in files if p in kept_paths], {}, row_of_id, rejected,
                     {f.path: (f.telescope, f.field) for f in chosen.values()}, dropped,
                     {f.path: f.apogee_id for f in chosen.values()})
