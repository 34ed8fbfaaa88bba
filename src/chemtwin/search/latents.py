"""The latent file (``chemtwin embed`` output): its layout, read in chunks and written here only.

Layout of ``LATENTS.h5`` (``LAYOUT_VERSION`` 1, attribute ``layout_version``; docs/search.md):

* ``z``        float32 (N, d): one latent vector per star (required)
* ``group``    int (N,): twin-group id, >= 0 for stars of a known group, -1 unknown (optional)
* ``labels``   float (N, L) with attribute ``names`` (optional; not used for search)
* ``star_id``  str (N,): a unique name per star, e.g. APOGEE_ID (optional)
* ``row``      int64 (N,): the dataset row of each latent (``chemtwin embed`` writes it; optional)
* ``file``     str (N,): the spectrum file of each latent (embedding FITS files; optional)
* ``telescope``, ``field``  str (N,): TELESCOPE / FIELD of each star's spectrum, "" unknown (optional)
* ``flags``    int16 (N,): out-of-depth bitmask of ``chemtwin.tagging.depth`` (1 conditioning labels
  outside the training range, 2 latent far from the training latents, 4 poor reconstruction;
  0 = none; optional: files written before it have none, read as "not checked")
* ``latent_distance``, ``recon_chi2``  float32 (N,): the statistics behind bits 2 and 4 (NaN =
  not measured: the model folder has no reference)
* ``table`` + ``table.__table_column_meta__``: the same stars as an astropy table (APOGEE_ID,
  Z, labels with units, FLAGS, ...; ``latent_table``), so that ``astropy.table.Table.read(path)``
  opens the file (``chemtwin embed`` writes it; optional, never read by chemtwin)
* ``twin_metric/centre``, ``twin_metric/whitening``: the metric a ``chemtwin whiten`` output is in
* attributes: ``model``, ``data``, ``condition``, ``latent_dim``, ``model_kind`` (embed),
  ``flag_bits`` and ``depth`` (JSON: the bits, the thresholds used, the counts), ...

Every column but ``z`` is optional and readers of files without it go on (layout version 1
throughout: the columns added since are optional).

This module is the one that reads and writes it (``LatentWriter``, ``write_latents``).

Without ``star_id`` a star is named by its row number ("0", "1", ...).
``chemtwin embed --workers/--scheduler`` writes a folder of such files plus
``manifest.json`` instead (docs/distributed.md); ``open_latents`` reads both alike,
shard by shard.
Every reader here raises :class:`chemtwin.errors.InputError` with a one-line message for
a missing file, a file that is not HDF5, a missing/mis-shaped ``z`` or non-finite values
(naming the first bad row).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from astropy.table import Table

from chemtwin.core.files import (
    atomic_output,
    check_dataset,
    check_free_space,
    close_after_failure,
    create_hdf5,
    describe_error,
    destructor_write_errors,
    open_hdf5,
    prepare_output,
    read_hdf5,
)
from chemtwin.core.hdf5_seal import seal
from chemtwin.data.dataset_writer import write_star_columns
from chemtwin.data.shard_folder import ShardSet
from chemtwin.errors import InputError
from chemtwin.search.tables import label_unit, star_columns, write_hdf5_table

DEFAULT_CHUNK_ROWS = 65_536
DEPTH_COLUMNS = ("flags", "latent_distance", "recon_chi2")  # per star; files derived row by row keep them
LAYOUT_VERSION = 1  # the attribute layout_version of the files written here


def check_finite(z: np.ndarray, source: str, row0: int = 0) -> None:
    """Raise InputError naming the first row of ``z`` holding NaN or inf."""
    bad = ~np.isfinite(z)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise InputError(f"{source}: latent row {row0 + row} holds NaN or inf")


class _Latents:
    """Chunked reading shared by a latent file and a folder of latent shards (on top of ``read``)."""

    def __len__(self) -> int:
        return self.n_stars

    def iter_chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, check: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, z[start:start+chunk_rows])`` over all latents."""
        for a in range(0, self.n_stars, chunk_rows):
            yield a, self.read(a, a + chunk_rows, check=check)

    def sample(self, n: int, seed: int = 0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
        """About ``n`` rows drawn uniformly without replacement, read chunk by chunk."""
        if n >= self.n_stars:
            return self.read()
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.n_stars, size=n, replace=False))
        parts = []
        for a in range(0, self.n_stars, chunk_rows):
            sel = rows[(rows >= a) & (rows < a + chunk_rows)]
            if sel.size:
                parts.append(self.read(a, a + chunk_rows)[sel - a])
        return np.concatenate(parts)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LatentFile(_Latents):
    """Lazy read-only view of a latent file; ``z`` is read in chunks when asked for."""

    def __init__(self, path: str | os.PathLike, key: str = "z"):
        self.path = Path(path)
        self.key = key
        self._file = open_hdf5(self.path, LAYOUT_VERSION)
        f = self._file
        try:
            if key not in f:
                raise InputError(f"{self.path}: no latent array '{key}' (expected the layout `chemtwin embed` writes)")
            z = check_dataset(f, key, self.path, "fiu")
            for name, kind in (("group", "iu"), ("star_id", "U"), ("row", "iu")):
                if name in f:
                    check_dataset(f, name, self.path, kind)
            if z.ndim != 2 or z.shape[1] < 1:
                raise InputError(f"{self.path}: '{key}' must be 2-D (stars, dims), got shape {z.shape}")
            if not np.issubdtype(z.dtype, np.number):
                raise InputError(f"{self.path}: '{key}' is not numeric ({z.dtype})")
            self.n_stars, self.dim = int(z.shape[0]), int(z.shape[1])
            for name in ("group", "star_id"):
                if name in f and f[name].shape != (self.n_stars,):
                    raise InputError(f"{self.path}: '{name}' has shape {f[name].shape}, expected ({self.n_stars},)")
        except InputError:
            f.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            f.close()
            raise InputError(f"{self.path}: unreadable latent file (damaged? {exc.__class__.__name__})") from None

    @property
    def has_group(self) -> bool:
        return "group" in self._file

    @property
    def has_star_id(self) -> bool:
        return "star_id" in self._file

    @property
    def group(self) -> np.ndarray | None:
        if not self.has_group:
            return None
        return read_hdf5(self._file, "group", slice(None), self.path).astype(np.int64)

    def star_id(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Star ids of rows [start, stop) as a str array, or None when the file has none."""
        if not self.has_star_id:
            return None
        return read_hdf5(self._file, "star_id", slice(start, stop), self.path)

    def read(self, start: int = 0, stop: int | None = None, check: bool = True) -> np.ndarray:
        """Rows [start, stop) of the latents as C-contiguous float32."""
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        try:
            z = np.ascontiguousarray(self._file[self.key][start:stop], dtype=np.float32)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise InputError(f"{self.path}: latent array {self.key} is unreadable (damaged file? "
                             f"{exc.__class__.__name__})") from None
        if check:
            check_finite(z, str(self.path), start)
        return z

    @property
    def rows(self) -> np.ndarray | None:
        """The dataset row of every latent (``chemtwin embed`` writes it), or None."""
        return self._file["row"][:].astype(np.int64) if isinstance(self._file.get("row"), h5py.Dataset) else None

    def column(self, name: str) -> np.ndarray | None:
        """A whole optional per-star column (``flags``, ``recon_chi2``, ``telescope``, ...), or None."""
        return _column(self._file, name, self.path, self.n_stars)

    def table(self) -> Table:
        """The stars of this file as an astropy table (``latent_table``)."""
        return latent_table(self._file, self.path)

    @property
    def attrs(self) -> dict:
        try:
            return dict(self._file.attrs)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise InputError(f"{self.path}: unreadable file attributes ({describe_error(exc)})") from None

    def close(self) -> None:
        self._file.close()


class ShardedLatents(ShardSet, _Latents):
    """A folder of latent shards + manifest.json read as one latent file (shards opened
    when first read, at most ``OPEN_SHARDS`` at a time)."""

    kind = "latents"

    def __init__(self, folder: str | os.PathLike, key: str = "z"):
        self.key = key
        self._init_shards(folder)
        first = self._shard(0)
        self.dim, self.has_group, self.has_star_id = first.dim, first.has_group, first.has_star_id

    def _open_shard(self, path: Path) -> LatentFile:
        return LatentFile(path, self.key)

    def _check(self, k: int, lf: LatentFile) -> None:
        name, first = self.shard_names[k], self._first
        if lf.n_stars != self._shard_rows(k):
            raise InputError(f"{self.path}: shard {name} holds {lf.n_stars} latents, the manifest says {self._shard_rows(k)}")
        if (lf.dim, lf.has_group, lf.has_star_id) != (first.dim, first.has_group, first.has_star_id):
            raise InputError(f"{self.path}: shard {name} differs from shard {self.shard_names[0]} (dimension, groups or star ids)")

    def _each(self, get) -> list:
        return [get(self._shard(k)) for k in range(len(self.shard_names))]

    @property
    def group(self) -> np.ndarray | None:
        return np.concatenate(self._each(lambda lf: lf.group)) if self.has_group else None

    @property
    def rows(self) -> np.ndarray | None:
        parts = self._each(lambda lf: lf.rows)
        return None if any(p is None for p in parts) else np.concatenate(parts)

    @property
    def attrs(self) -> dict:
        return dict(self._first.attrs, shards=len(self.shard_names))

    def column(self, name: str) -> np.ndarray | None:
        """An optional per-star column over all shards (None unless every shard has it)."""
        parts = self._each(lambda lf: lf.column(name))
        return None if any(p is None for p in parts) else np.concatenate(parts)

    def star_id(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        if not self.has_star_id:
            return None
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        parts = [self._shard(k).star_id(a, b) for k, a, b in self._spans(start, stop)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=str)

    def read(self, start: int = 0, stop: int | None = None, check: bool = True) -> np.ndarray:
        stop = self.n_stars if stop is None else min(stop, self.n_stars)
        parts = [self._shard(k).read(a, b, check=False) for k, a, b in self._spans(start, stop)]
        z = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        if check:
            check_finite(z, str(self.path), start)
        return z


def open_latents(path: str | os.PathLike, key: str = "z") -> LatentFile | ShardedLatents:
    """Open a latent file or a folder of latent shards lazily; InputError for anything else."""
    return ShardedLatents(path, key=key) if Path(path).is_dir() else LatentFile(path, key=key)


class LatentWriter:
    """A latent file in the layout above, written as it goes (``z`` grows with each ``append``)
    under a temporary name and renamed into place by ``finish`` (nothing is left on error).

    >>> with LatentWriter("z.h5", dim=20) as w:
    ...     w.append(z_chunk)
    ...     w.finish(row=rows, group=group, star_id=ids, attrs={...})
    """

    def __init__(self, path, dim: int, expected_rows: int | None = None, overwrite: bool = False):
        self.path = prepare_output(path, overwrite)
        if expected_rows:
            check_free_space(self.path, expected_rows * (4 * dim + 64), f"latents of {expected_rows} stars")
        self._output = atomic_output(self.path, overwrite)
        self._tmp = self._output.__enter__()
        self._file, self.n_rows = None, 0
        rows = min(max(expected_rows or 0, 1), DEFAULT_CHUNK_ROWS)
        try:  # a failure (a full disk, SIGTERM) before the first append leaves no file either
            self._file = create_hdf5(self._tmp)
            self._z = self._file.create_dataset("z", shape=(0, dim), maxshape=(None, dim), dtype="f4",
                                                chunks=(rows, dim))
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def append(self, z) -> None:
        z = np.asarray(z, dtype=np.float32)
        self._z.resize(self.n_rows + len(z), axis=0)
        self._z[self.n_rows :] = z
        self.n_rows += len(z)

    def finish(self, *, row=None, group=None, star_id=None, labels=None, label_names=None, files=None,
               attrs=None, arrays=None, table: bool = False) -> Path:
        """The per-star columns (``row``, ``group``, ``star_id``, ``labels`` + names, source ``files``),
        extra ``arrays`` {name: values} (``flags``, ``telescope``, ...) and file ``attrs``; with
        ``table`` the astropy table of it all (``latent_table``); then the rename."""
        with destructor_write_errors():
            f = self._file
            if row is not None:
                f.create_dataset("row", data=np.asarray(row, dtype=np.int64))
            write_star_columns(f, group, star_id)
            if labels is not None:
                ds = f.create_dataset("labels", data=np.asarray(labels, dtype=np.float32))
                ds.attrs["names"] = np.array(list(label_names or []), dtype=h5py.string_dtype())
            if files is not None:
                f.create_dataset("file", data=np.asarray(files, dtype=object), dtype=h5py.string_dtype())
            for name, values in (arrays or {}).items():
                values = np.asarray(values)
                if values.dtype.kind in "UOS":  # text: UTF-8 strings, as star_id
                    f.create_dataset(name, data=values.astype(object), dtype=h5py.string_dtype())
                else:
                    f[name] = values
            f.attrs.update(attrs or {})
            f.attrs["layout_version"] = LAYOUT_VERSION
            if table:
                write_hdf5_table(latent_table(f, self.path), f)
            seal(f)
            f.flush()  # the last writes: a full disk may fail only now (then __exit__ cleans up)
        f.close()
        self._output.__exit__(None, None, None)
        return self.path

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._file is not None:
                close_after_failure(self._file)
            self._output.__exit__(exc_type, exc, tb)


def write_latents(path, z, group=None, star_id=None, labels=None, label_names=None, attrs=None, overwrite=False, row=None,
                  arrays=None, table: bool = False):
    """Write a whole latent file at once (sharded embedding, tests and benchmarks)."""
    z = np.asarray(z, dtype=np.float32)
    with LatentWriter(path, z.shape[1], len(z), overwrite) as w:
        w.append(z)
        return w.finish(row=row, group=group, star_id=star_id, labels=labels, label_names=label_names, attrs=attrs,
                        arrays=arrays, table=table)


def _column(f: h5py.File, name: str, path, n: int) -> np.ndarray | None:
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        return None
    if obj.shape[:1] != (n,):
        raise InputError(f"{path}: '{name}' has shape {obj.shape}, expected ({n}, ...)")
    try:
        return obj.asstr()[:].astype(str) if h5py.check_string_dtype(obj.dtype) else obj[:]
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: '{name}' is unreadable ({describe_error(exc)})") from None


_DESCRIPTIONS = {
    "ROW": "row of the star in the embedded dataset", "GROUP": "known twin group (-1 = none)",
    "Z": "latent vector (chemistry)", "FLAGS": "out-of-depth bitmask: 1 conditioning labels outside the training "
    "range, 2 latent far from the training latents, 4 poor reconstruction (0 = in depth)",
    "LATENT_DISTANCE": "Mahalanobis distance of Z under the training latents (NaN = not measured)",
    "RECON_CHI2": "reconstruction chi2 per pixel of the decoded spectrum (NaN = not measured)",
    "FILE": "the spectrum file",
}


def latent_table(f: h5py.File, path="latents") -> Table:
    """The stars of an open latent file as an astropy table: APOGEE_ID, TELESCOPE, FIELD (when
    known), ROW, GROUP, Z (a vector column), one column per label with its unit, FLAGS,
    LATENT_DISTANCE, RECON_CHI2, FILE (each when the file has it); the file's attributes as meta."""
    z = f["z"][:]
    n = len(z)
    col = lambda name: _column(f, name, path, n)  # noqa: E731
    t = Table()
    for name, key in (("ROW", "row"), ("GROUP", "group")):
        if (values := col(key)) is not None:
            t[name] = values.astype(np.int64)
    t["Z"] = z.astype(np.float32)
    labels = col("labels")
    if labels is not None and labels.ndim == 2:
        names = [str(x) for x in f["labels"].attrs.get("names", [])]
        names = names if len(names) == labels.shape[1] else [f"LABEL_{i}" for i in range(labels.shape[1])]
        for i, name in enumerate(names):
            t[name] = labels[:, i].astype(np.float32)
            t[name].unit = label_unit(name)
            t[name].description = "label of the input (NaN = unknown)"
    for name, key in (("FLAGS", "flags"), ("LATENT_DISTANCE", "latent_distance"), ("RECON_CHI2", "recon_chi2"),
                      ("FILE", "file")):
        if (values := col(key)) is not None:
            t[name] = values
    for name in t.colnames:
        if name in _DESCRIPTIONS:
            t[name].description = _DESCRIPTIONS[name]
    star_id = col("star_id")
    star_columns(t, star_id if star_id is not None else np.arange(n).astype(str), col("telescope"), col("field"))
    t.meta.update({"extname": "LATENTS", **{str(k): v for k, v in f.attrs.items()}})
    return t
