"""A checksum of every HDF5 attribute chemtwin writes, checked when the file is read.

HDF5 checksums neither attribute values nor the global heap that holds variable-length strings,
so one flipped byte there (a label name, the SNR, the generator) changes what a file says with
nothing to notice it: reads succeed.  Shard folders have their sha256 in the manifest; a lone
file has this seal instead.

The seal is the root attribute ``attribute_seal``: JSON ``{"OBJECT:NAME": "DIGEST", ...}`` with a
short sha256 of each attribute's value, for every attribute present when the writer finished.
Values are compared as what they mean, not how they are stored: text is text whether stored as
fixed-length bytes or variable-length UTF-8, integers are integers of any width, floats are
compared as float64 (a float32 attribute read back is the same float64).  A user may add
attributes of their own (not covered); changing or deleting a covered one is refused, naming it.
Files without a seal (written before it existed, or by another program) are read as they are.
"""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np

from chemtwin.errors import InputError

SEAL = "attribute_seal"


def _canonical(value) -> bytes:
    """The bytes an attribute value is hashed as: its shape and its elements as text."""
    a = np.asarray(value)
    if a.dtype.kind in "SUO":
        items = [x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else str(x) for x in a.ravel().tolist()]
    elif a.dtype.kind in "iub":
        items = [str(int(x)) for x in a.ravel().tolist()]
    elif a.dtype.kind == "f":
        items = [float(x).hex() for x in a.ravel().tolist()]
    else:
        items = [a.dtype.str, a.tobytes().hex()]
    return json.dumps([list(a.shape), items]).encode()


def _digest(value) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()[:16]


def _attributes(f: h5py.File) -> dict:
    """{"OBJECT:NAME": value} over the root and every group and dataset, the seal itself left out."""
    found = {f"/:{k}": v for k, v in f.attrs.items() if k != SEAL}

    def visit(name, obj):
        for k, v in obj.attrs.items():
            found[f"/{name}:{k}"] = v

    f.visititems(visit)
    return found


def seal(f: h5py.File) -> None:
    """Record the digest of every attribute now in ``f`` (the writer's last step before closing)."""
    f.attrs[SEAL] = json.dumps({key: _digest(value) for key, value in sorted(_attributes(f).items())})


def check_seal(f: h5py.File, path) -> None:
    """InputError naming ``path`` and the attribute when a sealed attribute is missing or differs."""
    if SEAL not in f.attrs:
        return
    try:
        recorded = json.loads(f.attrs[SEAL])
        if not isinstance(recorded, dict):
            raise ValueError
    except (ValueError, TypeError):
        raise InputError(f"{path}: the attribute seal is damaged (damaged file?)") from None
    present = _attributes(f)
    for key, digest in recorded.items():
        where, _, name = str(key).rpartition(":")
        if where != "/" and not isinstance(f.get(where, getlink=True), h5py.HardLink):
            continue  # an object gone or replaced by a link: the reader's dataset checks name it more plainly
        if key not in present:
            raise InputError(f"{path}: attribute {name!r} of {where} is missing (damaged or edited file)")
        if _digest(present[key]) != digest:
            raise InputError(f"{path}: attribute {name!r} of {where} differs from what chemtwin wrote "
                             "(damaged or edited file)")
