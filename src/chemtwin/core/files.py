"""Writing files safely, and the one JSON rule.

* ``atomic_output(path)``: write to a temporary name, rename when complete (a reader never
  sees a half-written file; a failed writer leaves nothing).
* ``prepare_output(path, overwrite)``: check that an output may be written, before any work.
* ``write_json(path, obj)``: every JSON file chemtwin writes.  The rule for numbers JSON has
  no spelling for: inf, -inf and NaN become the strings "inf", "-inf" and "nan"
  (``json_safe``), so that the file stays strict JSON and an SNR of inf reads back as what
  it was.  NumPy scalars and arrays become Python numbers and lists, paths and bytes strings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from chemtwin.errors import InputError


def temporary_path(path: Path) -> Path:
    """Name a file is written under before the atomic rename to ``path``.  Temporary files of
    ``path`` left by a process that no longer runs (killed with SIGKILL, power cut) are deleted."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # somebody else's process, or not ours to judge: leave its file alone
    return True


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """The temporary path to write ``path``'s content to: renamed onto ``path`` when the block
    succeeds and deleted when it fails, so that no reader ever sees a half-written file."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_output(path: str | os.PathLike, overwrite: bool, folder: bool = False, inputs=()) -> Path:
    """Check that ``path`` (a file, or a folder when ``folder``) may be written, and is none of the
    ``inputs`` the command reads; InputError otherwise."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass overwrite=True to replace it", "overwrite")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise InputError(f"{path} is also an input of this command; write the output elsewhere")
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    if not folder and path.is_dir():
        raise InputError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable")
    return path


def check_free_space(path: str | os.PathLike, n_bytes: float, what: str) -> None:
    """InputError, before any work, when ``what`` (about ``n_bytes``) cannot fit where ``path`` goes."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if n_bytes > free:
        raise InputError(f"{path}: {what} needs about {n_bytes / 1e9:.3g} GB, {folder} has {free / 1e9:.3g} GB free")


def open_hdf5(path: Path, layout_version: int | None = None) -> h5py.File:
    """``path`` opened read-only; InputError when it is missing, not an HDF5 file, or (given the
    ``layout_version`` this chemtwin reads) written in a newer layout."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__})") from None
    try:
        found = f.attrs.get("layout_version", 0)
    except (OSError, RuntimeError, KeyError, TypeError) as exc:
        f.close()
        raise InputError(f"{path}: unreadable file attributes (damaged file? {exc.__class__.__name__})") from None
    if layout_version is not None and (not isinstance(found, (int, np.integer)) or found > layout_version):
        f.close()
        raise InputError(f"{path}: layout version {found} is newer than this chemtwin reads ({layout_version})")
    return f


def check_dataset(f: h5py.File, name: str, path, kind: str = "") -> h5py.Dataset:
    """``f[name]`` as a dataset held in this file: InputError naming ``path`` when it is a group,
    a soft or external link, stored in another file (external storage, a virtual dataset), or
    (given ``kind``, numpy dtype kinds such as "f" or "iu"; "U" for strings) of another type."""
    try:
        link = f.get(name, getlink=True)
        node = f[name] if isinstance(link, h5py.HardLink) else None
        if node is not None and not isinstance(node, h5py.Dataset):
            raise InputError(f"{path}: {name} is a group, not a dataset")
        outside = node is None or bool(node.external) or node.is_virtual
        dtype = None if node is None else node.dtype
    except InputError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: dataset {name} is unreadable (damaged file? {exc.__class__.__name__})") from None
    if outside:
        raise InputError(f"{path}: dataset {name} is a link or stored outside the file; chemtwin reads only data "
                         "held in the file itself")
    if kind == "U":
        ok = h5py.check_string_dtype(dtype) is not None
    else:
        ok = not kind or dtype.kind in kind
    if not ok:
        raise InputError(f"{path}: dataset {name} has dtype {dtype}, expected "
                         + {"f": "floating point", "iu": "integers", "U": "strings"}.get(kind, kind))
    return node


def read_hdf5(f: h5py.File, name: str, rows, path) -> np.ndarray:
    """``f[name][rows]`` (strings decoded for string datasets); a damaged file (h5py's OSError,
    KeyError, RuntimeError, ...) is an InputError naming ``path`` and the dataset."""
    try:
        node = f[name]
        if h5py.check_string_dtype(node.dtype) is not None:
            return node.asstr()[rows].astype(str)
        return node[rows]
    except (OSError, KeyError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: dataset {name} is unreadable (damaged file? {exc.__class__.__name__})") from None


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def describe_error(exc: BaseException, width: int = 160) -> str:
    """First line of an exception, short enough for a one-line error."""
    text = str(exc).strip().splitlines()[0][:width] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def json_safe(value):
    """Plain JSON types: NumPy scalars/arrays to Python, bytes and paths to str, inf/nan to strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def json_text(obj, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (``json_safe`` first)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (``json_safe``) to ``path``, atomically, with a final newline."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json_text(obj, indent) + "\n")
    return path


class open_fits:  # noqa: N801 -- used like open(): `with open_fits(path) as hdus`
    """``astropy.io.fits.open`` that turns every way a file can be broken into one InputError line
    naming it (a context manager yielding the HDU list)."""

    def __init__(self, path: str | os.PathLike, memmap: bool = False):
        self.path = Path(path)
        self.memmap = memmap
        self.hdus = None

    def __enter__(self):
        from astropy.io import fits

        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                warnings.filterwarnings("error", message=".*truncated.*")
                self.hdus = fits.open(self.path, memmap=self.memmap)
                len(self.hdus)  # read every header now, so truncation shows here
        except InputError:
            raise
        except Exception as exc:  # astropy raises OSError, ValueError, warnings-as-errors, ...
            raise InputError(f"{self.path}: not a readable FITS file ({describe_error(exc, 120)})") from None
        return self.hdus

    def __exit__(self, exc_type, exc, tb):
        if self.hdus is not None:
            self.hdus.close()
