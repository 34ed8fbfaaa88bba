"""The oracle's Jacobian cache: one Gram matrix J^T diag(w) J per star, keyed by a digest of the
star's labels and relative ivar pattern, valid for one synthesizer (``synthesizer_fingerprint``).

HDF5 (``CACHE_FORMAT``): root attributes ``format``, ``synthesizer`` (the fingerprint), ``grid``,
``label_names``, ``description``; datasets ``digest`` (n, 16) uint8 and ``gram`` (n, L, L).
A cache made for another synthesizer or unreadable is ignored (and rewritten), never trusted.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from chemtwin.core.files import check_free_space, new_hdf5, temporary_path
from chemtwin.errors import InputError
from chemtwin.spectral_models import linelist, lines
from chemtwin.spectral_models.labels import LABEL_NAMES

log = logging.getLogger(__name__)
CACHE_FORMAT = "chemtwin-oracle-gram-v1"


@functools.lru_cache(maxsize=4)
def synthesizer_fingerprint(grid: str) -> str:
    """Digest of what the Jacobian depends on besides the labels: grid, synthesizer source, line list."""
    h = hashlib.sha256()
    h.update(grid.encode())
    for module in (lines, linelist):
        h.update(inspect.getsource(module).encode())
    data = Path(linelist.__file__).parent / "data"
    for path in sorted(data.glob("*.csv")):
        h.update(path.read_bytes())
    return h.hexdigest()


def star_digests(labels: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(n, 16) uint8: blake2b of each star's labels (float32, as stored) and relative ivar pattern."""
    lab = np.ascontiguousarray(labels, dtype=np.float32)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.empty((len(lab), 16), np.uint8)
    for n in range(len(lab)):
        h = hashlib.blake2b(lab[n].tobytes(), digest_size=16)
        h.update(w[n].tobytes())
        out[n] = np.frombuffer(h.digest(), np.uint8)
    return out


def read_cache(path: Path, fingerprint: str) -> dict[bytes, np.ndarray]:
    """digest -> Gram matrix from a cache file; empty (with a log line) when absent or mismatched."""
    if path.exists() and not path.is_file():
        raise InputError(f"{path} is not a regular file (a device, FIFO, socket or folder); name another file")
    if not path.is_file():
        return {}
    # A file that is not a cache of ours is somebody's data named by mistake: refused, never
    # overwritten.  Our own cache made for another synthesizer is rebuilt.
    foreign = InputError(f"{path} exists and is not a chemtwin Jacobian cache; name another file (this one is left "
                         "as it is)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CACHE_FORMAT:
                raise foreign
            if f.attrs.get("synthesizer") != fingerprint:
                log.info("%s: made for another synthesizer: recomputing", path)
                return {}
            digest, gram = f["digest"][:], f["gram"][:]
    except (OSError, KeyError, RuntimeError) as exc:
        raise InputError(f"{path} exists and is not a readable chemtwin Jacobian cache ({exc.__class__.__name__}); "
                         "name another file (this one is left as it is)") from None
    return {d.tobytes(): g for d, g in zip(digest, gram)}


def write_cache(path: Path, fingerprint: str, grid: str, digest: np.ndarray, gram: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, gram.nbytes + digest.nbytes, f"a Jacobian cache of {len(gram)} stars")
    tmp = temporary_path(path)
    try:
        with new_hdf5(tmp) as f:
            f.attrs["format"] = CACHE_FORMAT
            f.attrs["synthesizer"] = fingerprint
            f.attrs["grid"] = grid
            f.attrs["description"] = ("per star: Gram matrix J^T diag(ivar / max finite ivar) J of the embedded "
                                      "synthesizer (labels in LABEL_NAMES order), keyed by a digest of the labels "
                                      "and relative ivar pattern; see chemtwin.tagging.oracle")
            f.attrs["label_names"] = list(LABEL_NAMES)
            f.create_dataset("digest", data=digest)
            f.create_dataset("gram", data=gram)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
