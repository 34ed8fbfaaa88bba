"""The chemtwin dataset file: spectra, inverse variances, labels and twin groups in HDF5.

Layout (``LAYOUT_VERSION`` 1; see docs/dataset.md):

* ``flux``        float32 (N, P), continuum-normalized, chunked by rows
* ``ivar``        float32 (N, P), inverse variance; 0 marks a masked pixel
* ``wavelength``  float64 (P,), vacuum Angstrom
* ``labels``      float32 (N, L), attribute ``names`` (APOGEE allStar column names)
* ``group``       int64 (N,), stars with the same value >= 0 share chemistry; -1 unknown
* ``star_id``     optional variable-length str (N,), e.g. APOGEE_ID for real spectra
* root attributes ``generator``, ``chemtwin_version``, ``seed``, ``snr``, ``grid``,
  ``layout_version``

Files are written under a temporary name and renamed when complete, so a killed
writer never leaves a file that looks finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from chemtwin import __version__
from chemtwin.errors import InputError

LAYOUT_VERSION = 1
REQUIRED = ("flux", "ivar", "wavelength", "labels", "group")
DEFAULT_CHUNK_ROWS = 64


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


def temporary_path(path: Path) -> Path:
    """Name a file is written under before the atomic rename to ``path``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def prepare_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check that ``path`` may be written; raise InputError otherwise."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise InputError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable")
    return path


class DatasetWriter:
    """Append batches of spectra to a new dataset file; renamed into place on success.

    >>> with DatasetWriter("twins.h5", wavelength, names, attrs={...}) as w:
    ...     w.append(flux, ivar, labels, group)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        wavelength: np.ndarray,
        label_names: list[str] | tuple[str, ...],
        attrs: dict | None = None,
        overwrite: bool = False,
        with_star_id: bool = False,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        expected_rows: int | None = None,
    ):
        self.path = prepare_output(path, overwrite)
        self.tmp = temporary_path(self.path)
        wavelength = np.asarray(wavelength, dtype=np.float64)
        self.n_pixels = wavelength.size
        self.n_labels = len(label_names)
        self.n_rows = 0
        self._file = h5py.File(self.tmp, "w")
        f = self._file
        rows = max(1, min(chunk_rows, expected_rows or chunk_rows))
        for name in ("flux", "ivar"):
            f.create_dataset(
                name, shape=(0, self.n_pixels), maxshape=(None, self.n_pixels), dtype="f4",
                chunks=(rows, self.n_pixels),
            )
        f.create_dataset("wavelength", data=wavelength)
        labels = f.create_dataset(
            "labels", shape=(0, self.n_labels), maxshape=(None, self.n_labels), dtype="f4",
            chunks=(max(rows, 1024), max(self.n_labels, 1)),
        )
        labels.attrs["names"] = np.array(list(label_names), dtype=h5py.string_dtype())
        f.create_dataset("group", shape=(0,), maxshape=(None,), dtype="i8", chunks=(max(rows, 4096),))
        if with_star_id:
            f.create_dataset("star_id", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,))
        f.attrs["chemtwin_version"] = __version__
        f.attrs["layout_version"] = LAYOUT_VERSION
        for key, value in (attrs or {}).items():
            f.attrs[key] = value

    def append(self, flux, ivar, labels, group, star_id=None) -> None:
        flux = np.asarray(flux, dtype=np.float32)
        n = flux.shape[0]
        if flux.shape != (n, self.n_pixels) or np.shape(ivar) != flux.shape:
            raise InputError(f"batch flux {flux.shape} / ivar {np.shape(ivar)} do not match {self.n_pixels} pixels")
        if np.shape(labels) != (n, self.n_labels) or np.shape(group) != (n,):
            raise InputError("batch labels/group do not match the batch size")
        f = self._file
        stop = self.n_rows + n
        for name, values in (("flux", flux), ("ivar", ivar), ("labels", labels), ("group", group)):
            f[name].resize(stop, axis=0)
            f[name][self.n_rows : stop] = values
        if "star_id" in f:
            if star_id is None or len(star_id) != n:
                raise InputError("this dataset stores star_id: give one per row")
            f["star_id"].resize(stop, axis=0)
            f["star_id"][self.n_rows : stop] = np.asarray(star_id, dtype=object)
        self.n_rows = stop

    def close(self) -> Path:
        """Finish the file and move it to its final name."""
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SpectraDataset:
    """Lazy, read-only view of a dataset file; rows are read only when asked for."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: not a readable HDF5 file ({exc.__class__.__name__})") from None
        f = self._file
        missing = [name for name in REQUIRED if name not in f]
        if missing:
            self._file.close()
            raise InputError(f"{self.path}: not a chemtwin dataset (missing {', '.join(missing)})")
        n, p = f["flux"].shape if f["flux"].ndim == 2 else (-1, -1)
        consistent = (
            f["ivar"].shape == (n, p)
            and f["wavelength"].shape == (p,)
            and f["labels"].ndim == 2
            and f["labels"].shape[0] == n
            and f["group"].shape == (n,)
            and "names" in f["labels"].attrs
            and len(f["labels"].attrs["names"]) == f["labels"].shape[1]
        )
        if not consistent:
            self._file.close()
            raise InputError(f"{self.path}: corrupt chemtwin dataset (array shapes disagree)")
        self.n_stars, self.n_pixels = int(n), int(p)
        self.label_names = [str(x.decode() if isinstance(x, bytes) else x) for x in f["labels"].attrs["names"]]
        self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}

    def __len__(self) -> int:
        return self.n_stars

    @property
    def wavelength(self) -> np.ndarray:
        return self._file["wavelength"][:]

    @property
    def group(self) -> np.ndarray:
        return self._file["group"][:]

    @property
    def star_id(self) -> np.ndarray | None:
        if "star_id" not in self._file:
            return None
        return self._file["star_id"].asstr()[:]

    def labels(self, names: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """All rows of the named label columns (all labels when ``names`` is None)."""
        values = self._file["labels"][:]
        if names is None:
            return values
        return values[:, self.label_columns(names)]

    def label_columns(self, names) -> list[int]:
        missing = [n for n in names if n not in self.label_names]
        if missing:
            raise InputError(f"{self.path}: dataset has no label(s) {', '.join(missing)}")
        return [self.label_names.index(n) for n in names]

    def read(self, start: int = 0, stop: int | None = None) -> Batch:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        f = self._file
        return Batch(
            start=start,
            flux=f["flux"][start:stop],
            ivar=f["ivar"][start:stop],
            labels=f["labels"][start:stop],
            group=f["group"][start:stop],
        )

    def take(self, rows: np.ndarray) -> Batch:
        """Arbitrary rows (sorted internally, returned in the order asked)."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        sorted_rows = rows[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        f = self._file
        parts = [f[name][sorted_rows][inverse] for name in ("flux", "ivar", "labels", "group")]
        return Batch(-1, *parts)

    def iter_batches(self, batch_size: int = 1024, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        for a in range(start, stop, batch_size):
            yield self.read(a, min(a + batch_size, stop))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SpectraDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_dataset(path: str | os.PathLike) -> SpectraDataset:
    """Open a chemtwin dataset lazily; raises InputError for anything that is not one."""
    return SpectraDataset(path)
