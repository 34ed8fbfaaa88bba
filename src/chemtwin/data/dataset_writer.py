"""Writing the chemtwin dataset file (its layout: ``chemtwin.data.dataset``): ``DatasetWriter``
appends batches of spectra under a temporary name and renames the file into place when it is
complete, so a killed writer never leaves a file that looks finished; ``write_star_columns``
gives files derived row by row from a dataset (labels, latents) the dataset's star columns."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from chemtwin import __version__
from chemtwin.core.files import check_free_space, close_after_failure, create_hdf5, prepare_output, publish, temporary_path
from chemtwin.core.hdf5_seal import seal
from chemtwin.data.dataset import LAYOUT_VERSION
from chemtwin.errors import InputError

DEFAULT_CHUNK_ROWS = 64


def write_star_columns(f: h5py.File, group=None, star_id=None) -> None:
    """``group`` and ``star_id`` in the dataset's layout, for files derived row by row from a
    dataset (labels, latents), so that their stars can be matched with the dataset's."""
    if group is not None:
        f["group"] = np.asarray(group, dtype=np.int64)
    if star_id is not None:
        f.create_dataset("star_id", data=np.asarray(star_id, dtype=object), dtype=h5py.string_dtype())


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
        text_columns: tuple[str, ...] = (),
        with_true_labels: bool = False,
    ):
        self.text_columns = tuple(text_columns)
        self.with_true_labels = with_true_labels
        self.path = prepare_output(path, overwrite)
        self.overwrite = overwrite
        wavelength = np.asarray(wavelength, dtype=np.float64)
        self.n_pixels = wavelength.size
        self.n_labels = len(label_names)
        if expected_rows:
            check_free_space(self.path, expected_rows * (8 * self.n_pixels + 4 * self.n_labels + 8),
                             f"{expected_rows} spectra")
        self.tmp = temporary_path(self.path)
        self.n_rows = 0
        self._file = None
        rows = max(1, min(chunk_rows, expected_rows or chunk_rows))
        try:  # a failure (a full disk, SIGTERM) before the first append leaves no file either
            self._file = create_hdf5(self.tmp)
            self._create_layout(wavelength, label_names, attrs, with_star_id, rows)
        except BaseException:
            self.abort()
            raise

    def _create_layout(self, wavelength, label_names, attrs, with_star_id: bool, rows: int) -> None:
        f = self._file
        for name in ("flux", "ivar"):
            f.create_dataset(
                name, shape=(0, self.n_pixels), maxshape=(None, self.n_pixels), dtype="f4",
                chunks=(rows, self.n_pixels),
            )
        f.create_dataset("wavelength", data=wavelength)
        for name in ("labels",) + (("true_labels",) if self.with_true_labels else ()):
            labels = f.create_dataset(
                name, shape=(0, self.n_labels), maxshape=(None, self.n_labels), dtype="f4",
                chunks=(max(rows, 1024), max(self.n_labels, 1)),
            )
            labels.attrs["names"] = np.array(list(label_names), dtype=h5py.string_dtype())
        f.create_dataset("group", shape=(0,), maxshape=(None,), dtype="i8", chunks=(max(rows, 4096),))
        if with_star_id:
            f.create_dataset("star_id", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,))
        for name in self.text_columns:  # optional str columns, e.g. telescope and field
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(4096,))
        # Held open until close: a dataset handle dropped mid-file flushes its chunk cache in a
        # destructor, where a full disk is only a printed warning and the writing goes on.
        self._columns = {name: f[name] for name in ("flux", "ivar", "labels", "true_labels", "group", "star_id",
                                                    *self.text_columns) if name in f}
        f.attrs["chemtwin_version"] = __version__
        f.attrs["layout_version"] = LAYOUT_VERSION
        for key, value in (attrs or {}).items():
            f.attrs[key] = value

    def append(self, flux, ivar, labels, group, star_id=None, text: dict | None = None, true_labels=None) -> None:
        flux = np.asarray(flux, dtype=np.float32)
        n = flux.shape[0]
        if flux.shape != (n, self.n_pixels) or np.shape(ivar) != flux.shape:
            raise InputError(f"batch flux {flux.shape} / ivar {np.shape(ivar)} do not match {self.n_pixels} pixels")
        if np.shape(labels) != (n, self.n_labels) or np.shape(group) != (n,):
            raise InputError("batch labels/group do not match the batch size")
        columns = {"flux": flux, "ivar": ivar, "labels": labels, "group": group}
        if self.with_true_labels:
            if np.shape(true_labels) != (n, self.n_labels):
                raise InputError("this dataset stores true_labels: give one row per star")
            columns["true_labels"] = true_labels
        if "star_id" in self._columns:
            if star_id is None or len(star_id) != n:
                raise InputError("this dataset stores star_id: give one per row")
            columns["star_id"] = np.asarray(star_id, dtype=object)
        for name in self.text_columns:
            values = (text or {}).get(name)
            if values is None or len(values) != n:
                raise InputError(f"this dataset stores {name}: give one per row")
            columns[name] = np.asarray(values, dtype=object)
        stop = self.n_rows + n
        for name, values in columns.items():
            self._columns[name].resize(stop, axis=0)
            self._columns[name][self.n_rows : stop] = values
        self.n_rows = stop

    def close(self) -> Path:
        """Finish the file and move it to its final name."""
        try:
            seal(self._file)
            self._file.flush()  # the last writes: a full disk may fail only now (see close_after_failure)
            self._file.close()
        except BaseException:
            self.abort()
            raise
        publish(self.tmp, self.path, self.overwrite)
        return self.path

    def abort(self) -> None:
        if self._file is not None:
            close_after_failure(self._file)
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
