"""A folder of shards: HDF5 files plus ``manifest.json``, read as one row range.

The manifest (written last, atomically, by the sharded writers in ``chemtwin.data.shards``):
``format`` "chemtwin-shards", ``format_version``, ``kind`` ("dataset" or "latents"),
``layout_version`` (``FOLDER_LAYOUT_VERSION``), the shards in row order with their ``path``
(relative to the folder), ``rows``, ``bytes`` and ``sha256``, and a ``header`` (the pixel
grid's hash for datasets).  Shared by sharded datasets (``chemtwin.data.dataset``) and
sharded latents (``chemtwin.search.latents``); docs/distributed.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chemtwin import __version__
from chemtwin.core.files import file_sha256, write_json
from chemtwin.errors import InputError

FOLDER_LAYOUT_VERSION = 1
MANIFEST_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_FORMAT = "chemtwin-shards"
OPEN_SHARDS = 32  # shard files held open at once (a folder may hold thousands)


def grid_hash(wavelength: np.ndarray) -> str:
    """sha256 of the float64 wavelength grid: shards of one dataset share it exactly."""
    return hashlib.sha256(np.ascontiguousarray(wavelength, dtype="<f8").tobytes()).hexdigest()


def new_manifest(kind: str, shards: list[dict], **fields) -> dict:
    """A manifest of ``kind`` listing ``shards`` (dicts with path, rows, bytes, sha256), with this
    module's format stamps and ``fields`` (the writer's header, plan, row count, ...)."""
    return {"format": SHARDS_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "kind": kind,
            "layout_version": FOLDER_LAYOUT_VERSION, "chemtwin_version": __version__, **fields,
            "shards": [{key: s[key] for key in ("path", "rows", "bytes", "sha256")} for s in shards]}


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    """Write ``folder/manifest.json`` atomically: a reader sees no manifest or a whole one."""
    return write_json(Path(folder) / MANIFEST, manifest, indent=1)


def read_manifest(folder: str | os.PathLike, kind: str) -> dict:
    """The manifest of a shard folder of ``kind`` ('dataset' or 'latents'), its shards checked
    to exist with the recorded sizes (cheap; ``ShardSet`` compares a shard's checksum when it first reads it)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder}: a folder without {MANIFEST}, so not a sharded {kind} "
                         f"(an unfinished sharded run leaves none: rerun the command that wrote it)")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        version = manifest.get("layout_version", FOLDER_LAYOUT_VERSION)
        ok = (manifest.get("format") == SHARDS_FORMAT and isinstance(shards, list)
              and isinstance(version, int) and not isinstance(version, bool)
              and all(isinstance(s["path"], str) and isinstance(s["rows"], int) and s["rows"] >= 0
                      and isinstance(s["sha256"], str) and isinstance(s.get("bytes", 0), int) for s in shards))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc.__class__.__name__})") from None
    if not ok:
        raise InputError(f"{path}: not a chemtwin shard manifest")
    if manifest.get("kind") != kind:
        raise InputError(f"{folder}: holds {manifest.get('kind')!r} shards, not a {kind}")
    if manifest.get("layout_version", FOLDER_LAYOUT_VERSION) > FOLDER_LAYOUT_VERSION:
        raise InputError(f"{folder}: layout version {manifest['layout_version']} is newer than this chemtwin reads ({FOLDER_LAYOUT_VERSION})")
    if not shards:
        raise InputError(f"{path}: lists no shards")
    inside = folder.resolve()
    for s in shards:
        shard = folder / s["path"]
        # A shard is a file of this folder: no absolute path, no "..", no link leading out of it.
        if Path(s["path"]).is_absolute() or ".." in Path(s["path"]).parts or not shard.resolve().is_relative_to(inside):
            raise InputError(f"{folder}: shard {s['path']} (listed in {MANIFEST}) lies outside the folder")
        if not shard.is_file():
            raise InputError(f"{folder}: shard {s['path']} (listed in {MANIFEST}) is missing")
        if "bytes" in s and shard.stat().st_size != s["bytes"]:
            raise InputError(f"{folder}: shard {s['path']} has {shard.stat().st_size} bytes, {MANIFEST} says "
                             f"{s['bytes']} (truncated or replaced)")
    for key, what in (("path", "listed twice"), ("sha256", "a copy of another shard (the same checksum)")):
        values = [s[key] for s in shards]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            name = next(s["path"] for s in reversed(shards) if s[key] == twice[0])
            raise InputError(f"{folder}: shard {name} is {what} in {MANIFEST}; every row must be read once")
    return manifest


class ShardSet:
    """A manifest's shards as one row range: offsets, a small cache of open shards (each checked
    by ``_check`` when first opened) and validation.  Shared by sharded datasets and latents."""

    kind = ""

    def _init_shards(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder)
        self.manifest = read_manifest(self.path, self.kind)
        self.shard_names = [s["path"] for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum([int(s["rows"]) for s in self.manifest["shards"]])]).astype(np.int64)
        self.n_stars = int(self.offsets[-1])
        self._open: OrderedDict = OrderedDict()
        self._first = None  # shard 0, once open: what every other shard is checked against
        self._verified: set[int] = set()

    def _open_shard(self, path: Path):
        raise NotImplementedError

    def _check(self, k: int, shard) -> None:
        raise NotImplementedError

    def _shard_rows(self, k: int) -> int:
        return int(self.offsets[k + 1] - self.offsets[k])

    def _shard(self, k: int):
        shard = self._open.get(k)
        if shard is not None:
            self._open.move_to_end(k)
            return shard
        if k not in self._verified:  # each shard's bytes checked against the manifest once, when first read
            path, expected = self.path / self.shard_names[k], self.manifest["shards"][k]["sha256"]
            if file_sha256(path) != expected:
                raise InputError(f"{self.path}: shard {self.shard_names[k]} does not match its checksum in {MANIFEST} "
                                 "(corrupt or modified)")
            self._verified.add(k)
        try:
            shard = self._open_shard(self.path / self.shard_names[k])
        except InputError as exc:
            raise InputError(f"{self.path}: shard {self.shard_names[k]}: {str(exc).split(': ', 1)[-1]}") from None
        if self._first is None:
            self._first = shard
        self._check(k, shard)
        self._open[k] = shard
        if len(self._open) > OPEN_SHARDS:
            evicted = self._open.popitem(last=False)[1]
            if evicted is not self._first:
                evicted.close()
        return shard

    def _spans(self, start: int, stop: int):
        """(shard, local start, local stop) covering global rows [start, stop)."""
        first = max(int(np.searchsorted(self.offsets, start, side="right")) - 1, 0)
        for k in range(first, len(self.shard_names)):
            a, b = self.offsets[k], self.offsets[k + 1]
            if a >= stop:
                break
            if b > start:
                yield k, int(max(start, a) - a), int(min(stop, b) - a)

    def validate(self, progress: bool = False) -> None:
        """Checksum, open and check every shard; InputError naming the first bad one."""
        for k in tqdm(range(len(self.shard_names)), desc="checksums", unit="shard", disable=not progress, leave=False):
            self._shard(k)

    def close(self) -> None:
        for shard in {id(s): s for s in [*self._open.values(), self._first] if s is not None}.values():
            shard.close()
        self._open.clear()
        self._first = None
