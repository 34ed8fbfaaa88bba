"""The twin index folder: ``index.faiss`` (FAISS's own format), ``meta.json`` and ``ids.npz``.

``meta.json``: ``format`` "chemtwin-twin-index", ``format_version`` (``FORMAT_VERSION``), metric,
kind, dim, n, the index parameters, whether star ids / groups are stored, the source latent file,
the chemtwin / FAISS versions and (from format_version 2) the ``sha256`` of index.faiss and ids.npz,
checked at load: a flipped byte in the index changes neighbours without making FAISS fail.  ``ids.npz`` (read with ``allow_pickle=False``): ``star_id``
(UTF-8 bytes) and ``group`` when known.  The folder is written into a temporary sibling and
renamed into place, so a reader never sees half of it (docs/search.md).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import faiss
import numpy as np

from chemtwin import __version__
from chemtwin.core.files import file_sha256, json_text, prepare_output
from chemtwin.errors import InputError

FORMAT = "chemtwin-twin-index"
FORMAT_VERSION = 2
INDEX_FILE, META_FILE, IDS_FILE = "index.faiss", "meta.json", "ids.npz"
METRICS = {"l1": faiss.METRIC_L1, "l2": faiss.METRIC_L2}


def meta(index) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metric": index.metric,
        "kind": index.kind,
        "dim": index.dim,
        "n": index.ntotal,
        "params": {"M": index.M, "ef_construction": index.ef_construction, "ef_search": index.ef_search,
                   "nlist": index.nlist, "nprobe": index.nprobe},
        "has_star_id": bool(index._star_id is not None),
        "has_group": bool(index._group is not None),
        "source": index.source,
        "chemtwin_version": __version__,
        "faiss_version": getattr(faiss, "__version__", "unknown"),
    }

def prepare_index_folder(folder, overwrite: bool = False) -> Path:
    """Check, before any work, that ``folder`` may be written: new, or (with ``overwrite``) an index
    folder of ours.  A folder holding anything else is refused, since saving replaces it whole."""
    folder = prepare_output(folder, overwrite, folder=True)
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in (INDEX_FILE, META_FILE, IDS_FILE))
        if foreign:
            raise InputError(f"{folder} holds files that are not a chemtwin index ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); not replaced: write the index elsewhere")
    return folder


def save(index, folder, overwrite: bool = False) -> Path:
    """Write ``folder/`` = index.faiss + meta.json + ids.npz of ``index``, atomically.

    Everything is written into a temporary sibling folder first, which is then
    renamed into place; an existing folder needs ``overwrite=True``.
    """
    index._finish()
    if index._index is None:
        raise InputError("cannot save an untrained, empty IVF index")
    folder = prepare_index_folder(folder, overwrite)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        faiss.write_index(index._index, str(tmp / INDEX_FILE))
        arrays = {}
        if index._star_id is not None:
            arrays["star_id"] = np.char.encode(index._star_id, "utf-8")
        if index._group is not None:
            arrays["group"] = index._group
        np.savez(tmp / IDS_FILE, **arrays)
        checksums = {name: file_sha256(tmp / name) for name in (INDEX_FILE, IDS_FILE)}
        (tmp / META_FILE).write_text(json_text({**index.meta(), "sha256": checksums}) + "\n")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder

def load(cls, folder):
    """A ``cls`` (TwinIndex) read from a folder written by :func:`save`; InputError if missing or corrupt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such index folder")
    for name in (INDEX_FILE, META_FILE, IDS_FILE):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: not a chemtwin index (missing {name})")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError("wrong format tag")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise InputError(f"{folder}: index format_version {meta['format_version']} is newer than this chemtwin reads "
                             f"({FORMAT_VERSION}); upgrade chemtwin")
        metric, kind, dim, n = meta["metric"], meta["kind"], int(meta["dim"]), int(meta["n"])
        params = meta["params"]
        if not isinstance(params, dict):
            raise TypeError("params is not a mapping")
        checksums = meta.get("sha256")
        if int(meta.get("format_version", 0)) >= 2 and not (isinstance(checksums, dict)
                                                     and all(isinstance(checksums.get(k), str) for k in (INDEX_FILE, IDS_FILE))):
            raise KeyError("sha256")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{folder}/{META_FILE}: corrupt index metadata ({exc.__class__.__name__})") from None
    for name in (INDEX_FILE, IDS_FILE) if checksums else ():
        if file_sha256(folder / name) != checksums[name]:
            raise InputError(f"{folder}/{name}: sha256 differs from meta.json (damaged or replaced); rebuild the index")
    try:
        raw = faiss.read_index(str(folder / INDEX_FILE))
    except RuntimeError:
        raise InputError(f"{folder}/{INDEX_FILE}: corrupt or unreadable FAISS index") from None
    if raw.d != dim or raw.ntotal != n or raw.metric_type != METRICS.get(metric):
        raise InputError(f"{folder}: index.faiss (d={raw.d}, n={raw.ntotal}) disagrees with meta.json (d={dim}, n={n}, metric={metric})")
    faiss_kind = {"flat": faiss.IndexFlat, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}.get(kind)
    if faiss_kind is None or not isinstance(raw, faiss_kind):
        raise InputError(f"{folder}: index.faiss is a {type(raw).__name__}, meta.json says kind {kind!r}")
    try:
        with np.load(folder / IDS_FILE, allow_pickle=False) as npz:
            star_id = npz["star_id"] if "star_id" in npz.files else None
            group = npz["group"] if "group" in npz.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{folder}/{IDS_FILE}: corrupt ({exc.__class__.__name__})") from None
    for name, arr in (("star_id", star_id), ("group", group)):
        if arr is not None and arr.shape != (n,):
            raise InputError(f"{folder}/{IDS_FILE}: {name} has {arr.shape}, expected ({n},)")
    if group is not None and group.dtype.kind not in "iu":
        raise InputError(f"{folder}/{IDS_FILE}: group has dtype {group.dtype}, expected integers")
    if bool(meta.get("has_star_id")) != (star_id is not None) or bool(meta.get("has_group")) != (group is not None):
        raise InputError(f"{folder}: meta.json and {IDS_FILE} disagree on which star ids / groups are stored")
    known = {k: params[k] for k in ("M", "ef_construction", "ef_search", "nlist", "nprobe") if params.get(k) is not None}
    index = cls(dim, metric, kind, _faiss_index=raw, **known)
    try:
        index._star_id = None if star_id is None else (np.char.decode(star_id, "utf-8") if star_id.dtype.kind == "S"
                                                        else star_id.astype(str))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InputError(f"{folder}/{IDS_FILE}: unreadable star ids ({exc.__class__.__name__})") from None
    index._group = None if group is None else group.astype(np.int64)
    index._has_ids, index._has_group = star_id is not None, group is not None
    index.source = meta.get("source")
    index._dirty = True
    try:
        index._finish()
    except InputError as exc:
        raise InputError(f"{folder}: {exc}") from None
    return index
