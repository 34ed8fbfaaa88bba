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

import errno
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path

import h5py
import numpy as np

from chemtwin.core.hdf5_seal import check_seal, seal
from chemtwin.errors import InputError


def temporary_path(path: Path) -> Path:
    """Name a file is written under before the atomic rename to ``path``.  Temporary files of
    ``path`` left by a process that no longer runs (killed with SIGKILL, power cut) are deleted."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if left_by_ended_process(pid):
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def scratch_path(path: Path, tag: str) -> Path:
    """A private intermediate file next to ``path`` (``.NAME.TAG-PID.h5``, deleted by its user when
    done).  Those of processes that no longer run, and their temporary files, are deleted."""
    path = Path(path)
    prefix = f".{path.name}.{tag}-"
    for stale in [*path.parent.glob(f"{glob_escape(prefix)}*"), *path.parent.glob(f".{glob_escape(prefix)}*")]:
        pid = stale.name.split(f"{tag}-", 1)[1].split(".", 1)[0]
        if left_by_ended_process(pid):
            stale.unlink(missing_ok=True)
    return path.with_name(f"{prefix}{os.getpid()}.h5")


def left_by_ended_process(pid: str) -> bool:
    """Whether a file named with the process id ``pid`` (text from its name) was left by another
    process that no longer runs: the file is then stale and safe to delete."""
    return pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid))


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # somebody else's process, or not ours to judge: leave its file alone
    return True


@contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """The temporary path to write ``path``'s content to: renamed onto ``path`` when the block
    succeeds and deleted when it fails, so that no reader ever sees a half-written file.
    Without ``overwrite`` the file is published only if ``path`` still does not exist."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path, overwrite)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` onto ``path``.  Without ``overwrite``, a hard link that fails
    when ``path`` exists: another run that wrote the same output since prepare_output looked is
    then refused, not silently replaced (the last rename would win)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path} was written by another run meanwhile; pass overwrite=True to replace it",
                         "overwrite") from None
    except OSError:  # a file system without hard links: the plain rename
        os.replace(tmp, path)
        return
    tmp.unlink()


def close_after_failure(f: h5py.File) -> None:
    """Close an HDF5 file whose writing already failed (a full disk), so that the caller can delete it.

    libhdf5 retries its dirty metadata on every close, and a close that fails leaves h5py's ids
    half-closed: the interpreter's exit then segfaults.  The file's descriptor is pointed at
    /dev/null first: those last writes succeed into nothing, and the close frees everything (the
    file is deleted anyway).  For the same reason writers ``flush()`` before their final
    ``close()``: a full disk then fails the flush, which leaves the ids intact for this close."""
    if not f.id.valid:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, f.id.get_vfd_handle())
        finally:
            os.close(null)
    except (OSError, RuntimeError, TypeError, ValueError):
        pass  # not a plain file descriptor (another driver): close as it is
    try:
        f.close()
    except (OSError, RuntimeError):
        pass


@contextmanager
def destructor_write_errors() -> Iterator[None]:
    """Raise, at the end of the block, the first write error that h5py met in a destructor.

    A dataset handle that goes out of scope writes its last bytes while it is freed, where an
    error (a full disk) is only printed ("Exception ignored in ... __dealloc__") and the writing
    goes on: the file would then be renamed as if whole.  Such errors are caught here instead."""
    caught: list[BaseException] = []
    previous = sys.unraisablehook

    def hook(unraisable):
        if "h5py" in str(unraisable.object) and isinstance(unraisable.exc_value, (OSError, RuntimeError)):
            caught.append(unraisable.exc_value)
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
    if caught:
        raise caught[0]


def create_hdf5(tmp: Path) -> h5py.File:
    """A new HDF5 file for writing, without a sieve buffer: raw data then reaches the disk in the
    write call, which raises on a full disk, rather than when a dataset handle is freed, which
    only prints (see destructor_write_errors)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    return h5py.File(h5py.h5f.create(os.fsencode(tmp), h5py.h5f.ACC_TRUNC, fapl=fapl))


@contextmanager
def new_hdf5(tmp: Path) -> Iterator[h5py.File]:
    """``h5py.File(tmp, "w")`` that, when the block, a destructor's write or the final close fails,
    closes with ``close_after_failure`` (the caller's atomic_output then deletes ``tmp``)."""
    f = create_hdf5(tmp)
    try:
        with destructor_write_errors():
            yield f
            seal(f)
            f.flush()  # the last writes: a full disk may fail only now (see close_after_failure)
        f.close()
    except BaseException:
        close_after_failure(f)
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
    if not folder and path.exists() and not path.is_dir() and not path.is_file():
        raise InputError(f"{path} is not a regular file (a device, FIFO or socket); not replaced")
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is not a folder")
    if not folder and path.is_dir():
        raise InputError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable")
    check_free_space(path / "_" if folder else path)
    return path


# Below this, no chemtwin output fits (HDF5 metadata, a checkpoint, a PNG, a JSON): a full disk is
# refused before any work rather than met half-way through a write, where libhdf5 may not recover.
MIN_FREE_BYTES = 1 << 20


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.3g} MB"


def check_free_space(path: str | os.PathLike, n_bytes: float = 0.0, what: str = "this output") -> None:
    """InputError, before any work, when ``what`` (about ``n_bytes``, plus MIN_FREE_BYTES) cannot
    fit where ``path`` goes: the free space of its file system and the file-size limit (ulimit -f)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    need = n_bytes + MIN_FREE_BYTES
    free = shutil.disk_usage(folder).free
    if need > free:
        raise InputError(f"{path}: {what} needs about {_size(need)}, {folder} has {_size(free)} free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and need > limit:
        raise InputError(f"{path}: {what} needs about {_size(need)}, the file-size limit (ulimit -f) is {_size(limit)}")


_DISK_FULL = {errno.ENOSPC: "No space left on device", errno.EFBIG: "File too large",
              errno.EDQUOT: "Disk quota exceeded"}


def disk_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` when it is the machine refusing a write (full disk, file-size
    limit, quota), however the library that wrote wrapped it (h5py's RuntimeError, safetensors'
    SafetensorError, ...): None otherwise."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return exc
    text = str(exc)
    for code, words in _DISK_FULL.items():
        if words in text or f"errno = {code}," in text:
            named = re.search(r"filename = '([^']+)'", text)  # libhdf5 names the file in its message
            return OSError(code, words, getattr(exc, "filename", None) or (named and named.group(1)))
    return None


def open_hdf5(path: Path, layout_version: int | None = None) -> h5py.File:
    """``path`` opened read-only; InputError when it is missing, not an HDF5 file, (given the
    ``layout_version`` this chemtwin reads) written in a newer layout, or when an attribute
    differs from the seal its writer recorded (``core.hdf5_seal``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__})") from None
    try:
        found = f.attrs.get("layout_version", 0)
        if layout_version is not None and (not isinstance(found, (int, np.integer)) or found > layout_version):
            raise InputError(f"{path}: layout version {found} is newer than this chemtwin reads ({layout_version})")
        check_seal(f, path)
    except InputError:
        f.close()
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        f.close()
        raise InputError(f"{path}: unreadable file attributes (damaged file? {exc.__class__.__name__})") from None
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
        from astropy.utils.exceptions import AstropyUserWarning

        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        # Header cards are parsed lazily, inside the block too: astropy's warnings about damaged
        # cards stay quiet while the file is open (what cannot be parsed raises, and is reported).
        self._quiet = warnings.catch_warnings()
        self._quiet.__enter__()
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        warnings.filterwarnings("ignore", category=AstropyUserWarning, module=r"astropy\.io\.fits")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*truncated.*")
                self.hdus = fits.open(self.path, memmap=self.memmap)
                len(self.hdus)  # read every header now, so truncation shows here
        except InputError:
            self._quiet.__exit__(None, None, None)
            raise
        except Exception as exc:  # astropy raises OSError, ValueError, warnings-as-errors, ...
            self._quiet.__exit__(None, None, None)
            raise InputError(f"{self.path}: not a readable FITS file ({describe_error(exc, 120)})") from None
        return self.hdus

    def __exit__(self, exc_type, exc, tb):
        from astropy.io.fits.verify import VerifyError

        if self.hdus is not None:
            self.hdus.close()
        self._quiet.__exit__(None, None, None)
        # astropy parses headers and reads data lazily: a broken card or a short data block
        # shows only when the block touches it.
        if isinstance(exc, (VerifyError, OSError)) and not isinstance(exc, InputError):
            raise InputError(f"{self.path}: not a readable FITS file ({describe_error(exc, 120)})") from None
