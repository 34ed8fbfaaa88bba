"""The chemtwin dataset file: spectra, inverse variances, labels and twin groups in HDF5.

Layout (``LAYOUT_VERSION`` 1; see docs/dataset.md):

* ``flux``        float32 (N, P), continuum-normalized, chunked by rows
* ``ivar``        float32 (N, P), inverse variance; 0 marks a masked pixel
* ``wavelength``  float64 (P,), vacuum Angstrom
* ``labels``      float32 (N, L), attribute ``names`` (APOGEE allStar column names): the labels
                  a method is given (for real spectra: the survey's)
* ``true_labels`` optional float32 (N, L), same names: the truth, where ``labels`` carry errors
                  (``generate`` with ``label_errors``); only scoring and the oracle read it
* ``group``       int64 (N,), stars with the same value >= 0 share chemistry; -1 unknown
* ``star_id``     optional variable-length str (N,), e.g. APOGEE_ID for real spectra
* ``telescope``, ``field``  optional str (N,): allStar's TELESCOPE and FIELD (``chemtwin ingest``)
* root attributes ``generator``, ``chemtwin_version``, ``seed``, ``snr``, ``grid``,
  ``layout_version``

``chemtwin.data.dataset_writer`` writes it (under a temporary name, renamed when complete, so
a killed writer never leaves a file that looks finished); this module reads it.

A dataset may also be a **folder of shards**: HDF5 files of this layout plus
``manifest.json`` (``chemtwin.data.shard_folder`` owns that format), written last by the
sharded writers (``chemtwin.data.shards``).
``open_dataset`` opens either; ``ShardedDataset`` reads the shards as one dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemtwin.core.files import check_dataset, describe_error, json_safe, open_hdf5, read_hdf5
from chemtwin.data.shard_folder import MANIFEST, ShardSet, grid_hash
from chemtwin.data.spectra import check_spectra
from chemtwin.errors import InputError

LAYOUT_VERSION = 1
REQUIRED = ("flux", "ivar", "wavelength", "labels", "group")


@dataclass
class Batch:
    """Rows [start, stop) of a dataset, as NumPy arrays."""

    start: int
    flux: np.ndarray
    ivar: np.ndarray
    labels: np.ndarray
    group: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + len(self.flux)


def label_columns(source, names, role: str = "label") -> list[int]:
    """Columns of the labels ``names`` in anything with ``label_names`` and ``path`` (a dataset,
    arrays, a catalogue); InputError naming the unknown ones (as ``role``s: "condition label")."""
    have = list(source.label_names)
    missing = [n for n in names if n not in have]
    if missing:
        raise InputError(f"{source.path}: unknown {role}(s) {', '.join(missing)}; the data has labels "
                         f"{', '.join(have) or 'none'}")
    return [have.index(n) for n in names]


class BaseDataset:
    """What every dataset view shares; subclasses give ``column``, ``read``, ``take`` and
    the attributes ``path``, ``n_stars``, ``n_pixels``, ``label_names``, ``attrs``, ``wavelength``."""

    has_star_id = False
    has_true_labels = False

    def __len__(self) -> int:
        return self.n_stars

    @property
    def group(self) -> np.ndarray:
        return self.column("group")

    @property
    def star_id(self) -> np.ndarray | None:
        return self.column("star_id") if self.has_star_id else None

    def labels(self, names: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """All rows of the named label columns (all labels when ``names`` is None)."""
        values = self.column("labels")
        if names is None:
            return values
        return values[:, self.label_columns(names)]

    def true_labels(self, names: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """The true values of the named labels: ``true_labels`` where the file has them (its
        ``labels`` carry survey-like errors), else ``labels``.  For scoring only."""
        if not self.has_true_labels:
            return self.labels(names)
        values = self.column("true_labels")
        return values if names is None else values[:, self.label_columns(names)]

    def label_columns(self, names, role: str = "label") -> list[int]:
        return label_columns(self, names, role)

    def iter_batches(self, batch_size: int = 1024, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        for a in range(start, stop, batch_size):
            yield self.read(a, min(a + batch_size, stop))

    def rows(self, start: int, stop: int) -> RowRange:
        """Rows [start, stop) as a dataset of their own (nothing is read until asked)."""
        return RowRange(self, start, stop)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SpectraDataset(BaseDataset):
    """Lazy, read-only view of a dataset file; rows are read only when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open_hdf5(self.path, LAYOUT_VERSION)
        try:
            self._check_layout()
        except InputError:
            self._file.close()
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:  # libhdf5 meets damaged metadata
            self._file.close()
            raise InputError(f"{self.path}: damaged HDF5 structure ({describe_error(exc)})") from None
        except BaseException:
            self._file.close()
            raise
        try:
            self.label_names = [str(x.decode() if isinstance(x, bytes) else x) for x in self._file["labels"].attrs["names"]]
            self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._file.attrs.items()}
        except (UnicodeDecodeError, OSError, RuntimeError, KeyError, TypeError) as exc:
            self._file.close()
            raise InputError(f"{self.path}: unreadable label names or attributes ({exc.__class__.__name__})") from None

    def _check_layout(self) -> None:
        f = self._file
        missing = [name for name in REQUIRED if name not in f]
        if missing:
            raise InputError(f"{self.path}: not a chemtwin dataset (missing {', '.join(missing)})")
        optional = tuple(name for name in ("star_id", "true_labels") if name in f)
        for name in REQUIRED + optional:
            check_dataset(f, name, self.path, kind="U" if name == "star_id" else "iu" if name == "group" else "f")
        n, p = f["flux"].shape if f["flux"].ndim == 2 else (-1, -1)
        consistent = (
            f["ivar"].shape == (n, p)
            and f["wavelength"].shape == (p,)
            and f["labels"].ndim == 2
            and f["labels"].shape[0] == n
            and f["group"].shape == (n,)
            and ("star_id" not in f or f["star_id"].shape == (n,))
            and ("true_labels" not in f or f["true_labels"].shape == f["labels"].shape)
            and "names" in f["labels"].attrs
            and len(f["labels"].attrs["names"]) == f["labels"].shape[1]
        )
        if not consistent:
            raise InputError(f"{self.path}: corrupt chemtwin dataset (array shapes disagree)")
        self.n_stars, self.n_pixels = int(n), int(p)
        wavelength = self._read_array("wavelength", slice(None))
        if not (np.isfinite(wavelength).all() and (np.diff(wavelength) > 0).all()):
            raise InputError(f"{self.path}: the wavelength grid is not finite and increasing")

    def _read_array(self, name: str, rows):
        return read_hdf5(self._file, name, rows, self.path)

    @property
    def wavelength(self) -> np.ndarray:
        return self._read_array("wavelength", slice(None))

    @property
    def has_star_id(self) -> bool:
        return "star_id" in self._file

    @property
    def has_true_labels(self) -> bool:
        return "true_labels" in self._file

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one per-row array (flux, ivar, labels, group, star_id)."""
        return self._read_array(name, slice(start, stop))

    def read(self, start: int = 0, stop: int | None = None) -> Batch:
        """Rows [start, stop), checked against the spectrum contract (data/spectra.py): NaN or
        negative ivar and NaN/inf flux under ivar > 0 are InputErrors naming the row."""
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        rows = slice(start, stop)
        batch = Batch(start, *(self._read_array(name, rows) for name in _BATCH_FIELDS))
        check_spectra(batch.flux, batch.ivar, start, str(self.path))
        return batch

    def take(self, rows: np.ndarray) -> Batch:
        """Arbitrary rows (sorted internally, returned in the order asked)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        sorted_rows = rows[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        parts = [self._read_array(name, sorted_rows)[inverse] for name in _BATCH_FIELDS]
        check_spectra(parts[0], parts[1], 0, str(self.path))
        return Batch(-1, *parts)

    def close(self) -> None:
        self._file.close()


class RowRange(BaseDataset):
    """Rows [start, stop) of another dataset, with the same API and rows counted from 0."""

    def __init__(self, parent: BaseDataset, start: int, stop: int):
        if not 0 <= start <= stop <= parent.n_stars:
            raise InputError(f"{parent.path}: rows {start}-{stop} are outside its {parent.n_stars} rows")
        self.parent, self.start, self.stop = parent, int(start), int(stop)
        self.path = f"{parent.path} rows {start}-{stop}"
        self.n_stars, self.n_pixels = self.stop - self.start, parent.n_pixels
        self.label_names, self.attrs, self.has_star_id = parent.label_names, parent.attrs, parent.has_star_id
        self.has_true_labels = parent.has_true_labels

    @property
    def wavelength(self) -> np.ndarray:
        return self.parent.wavelength

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        return self.parent.column(name, self.start + start, self.start + stop)

    def read(self, start: int = 0, stop: int | None = None) -> Batch:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        b = self.parent.read(self.start + start, self.start + stop)
        return Batch(start, b.flux, b.ivar, b.labels, b.group)

    def take(self, rows: np.ndarray) -> Batch:
        return self.parent.take(np.asarray(rows, dtype=np.int64) + self.start)


# ---------------------------------------------------------------- sharded datasets


class ShardedDataset(ShardSet, BaseDataset):
    """A folder of dataset shards read as one dataset (same API as ``SpectraDataset``).

    Shards are opened when first read (at most ``OPEN_SHARDS`` at a time) and checked then
    against the manifest and the first shard: row count, pixel grid, label names.
    ``validate()`` checksums and opens them all (``chemtwin info``).
    """

    kind = "dataset"

    def __init__(self, folder: str | os.PathLike):
        self._init_shards(folder)
        first = self._shard(0)
        self.n_pixels, self.label_names, self.has_star_id = first.n_pixels, first.label_names, first.has_star_id
        self.has_true_labels = first.has_true_labels
        self.attrs = dict(first.attrs, shards=len(self.shard_names))

    def _open_shard(self, path: Path) -> SpectraDataset:
        return SpectraDataset(path)

    def _check(self, k: int, ds: SpectraDataset) -> None:
        name, m = self.shard_names[k], self.manifest
        if len(ds) != self._shard_rows(k):
            raise InputError(f"{self.path}: shard {name} holds {len(ds)} rows, {MANIFEST} says {self._shard_rows(k)}")
        if m.get("pixel_grid") and grid_hash(ds.wavelength) != m["pixel_grid"]:
            raise InputError(f"{self.path}: shard {name} has another pixel grid ({ds.n_pixels} px) than {MANIFEST} "
                             f"records ({m.get('n_pixels', '?')} px); shards of one dataset must share one grid")
        first = self._first
        if (ds.label_names != first.label_names or ds.has_star_id != first.has_star_id
                or ds.has_true_labels != first.has_true_labels):
            raise InputError(f"{self.path}: shard {name} has other labels or star ids than shard {self.shard_names[0]}")

    @property
    def wavelength(self) -> np.ndarray:
        return self._first.wavelength

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        parts = [self._shard(k).column(name, a, b) for k, a, b in self._spans(start, stop)]
        return np.concatenate(parts) if parts else self._first.column(name, 0, 0)

    def read(self, start: int = 0, stop: int | None = None) -> Batch:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        parts = [self._shard(k).read(a, b) for k, a, b in self._spans(start, stop)] or [self._first.read(0, 0)]
        return Batch(start, *(_concat([getattr(p, f) for p in parts]) for f in _BATCH_FIELDS))

    def take(self, rows: np.ndarray) -> Batch:
        """Arbitrary rows (read shard by shard, returned in the order asked)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_stars):
            raise InputError(f"{self.path}: row {int(rows[(rows < 0) | (rows >= self.n_stars)][0])} is outside its {self.n_stars} rows")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        parts = [self._shard(k).take(sorted_rows[shard_of == k] - self.offsets[k]) for k in np.unique(shard_of)]
        parts = parts or [self._first.read(0, 0)]
        out = []
        for f in _BATCH_FIELDS:
            values = _concat([getattr(p, f) for p in parts])
            arr = np.empty_like(values)
            arr[order] = values
            out.append(arr)
        return Batch(-1, *out)


_BATCH_FIELDS = ("flux", "ivar", "labels", "group")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def dataset_info(ds) -> dict:
    """Identifier of a dataset for results: absolute path, size and file attributes."""
    path = str(getattr(ds, "path", "<arrays>"))
    return json_safe({
        "path": os.path.abspath(path) if path != "<arrays>" else path,
        "n_stars": int(ds.n_stars),
        "attrs": dict(getattr(ds, "attrs", {}) or {}),
    })


def open_dataset(path: str | os.PathLike) -> SpectraDataset | ShardedDataset:
    """Open a chemtwin dataset (a file or a folder of shards) lazily; InputError for anything else."""
    return ShardedDataset(path) if Path(path).is_dir() else SpectraDataset(path)
