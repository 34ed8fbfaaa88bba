"""The corruptions of the fuzz campaign: named, deterministic edits of a copied seed input.

Each registry maps a mutation name to ``(function, tags)``.  ``function(path, ctx)`` edits the
copy at ``path`` in place (``ctx.rng`` is seeded from the case, ``ctx.case_dir`` holds the case's
files, ``ctx.seeds`` the seed paths); ``tags`` say what the corruption breaks, so that a case
expects refusal only from a command that needs that part (``fuzz_cases.expectation``):

* ``valid``  the input is still valid (a control): exit 0 expected
* ``masked`` the docs say this input is masked/skipped (docs/dataset.md, model.md, baselines.md):
             exit 0 expected, outputs finite or flagged
* ``any``    no demand but "no traceback, no hang, nothing half-written"
* anything else names the part that is broken (``structure``, ``flux``, ``labels_tl``, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

HUGE = 10**20  # "99999999999999999999" of the issue


@dataclass
class Ctx:
    seeds: dict
    case_dir: Path
    rng: np.random.Generator


# ------------------------------------------------------------------ helpers
def _replace(f: h5py.File, name: str, data=None, keep_attrs: bool = True, **kw) -> None:
    attrs = dict(f[name].attrs) if keep_attrs and name in f and isinstance(f[name], h5py.Dataset) else {}
    if name in f:
        del f[name]
    dset = f.create_dataset(name, data=data, **kw)
    for k, v in attrs.items():
        dset.attrs[k] = v


def _outside(ctx: Ctx, name: str) -> Path:
    """A path outside the input's folder (the case folder's ``elsewhere/``)."""
    d = ctx.case_dir / "elsewhere"
    d.mkdir(exist_ok=True)
    return d / name


def h5(fn):
    """A mutation that edits an HDF5 file opened read-write."""
    def run(path: Path, ctx: Ctx):
        with h5py.File(path, "r+") as f:
            fn(f, ctx)
    run.__name__ = fn.__name__
    return run


def _rewrite(path: Path, edit) -> None:
    """Copy every dataset and attribute of ``path`` into a fresh file, through ``edit(name, array) -> array``
    (None drops it): for edits that change sizes, which HDF5 cannot do in place."""
    tmp = path.with_name(path.name + ".rewrite")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        dst.attrs.update(dict(src.attrs))
        for name, obj in src.items():
            if not isinstance(obj, h5py.Dataset):
                continue
            value = edit(name, obj[()])
            if value is None:
                continue
            d = dst.create_dataset(name, data=value, dtype=obj.dtype if value.dtype == obj.dtype else None)
            d.attrs.update(dict(obj.attrs))
    os.replace(tmp, path)


def _raw_regions(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every dataset's raw data in an HDF5 file; the rest is metadata."""
    regions = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            dsid = obj.id
            if obj.chunks is None:
                off = dsid.get_offset()
                if off is not None:
                    regions.append((off, dsid.get_storage_size()))
            else:
                for i in range(dsid.get_num_chunks()):
                    info = dsid.get_chunk_info(i)
                    regions.append((info.byte_offset, info.size))
        f.visititems(visit)
    return sorted(regions)


def _byte_classes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of metadata bytes and of raw-data bytes of an HDF5 file."""
    size = path.stat().st_size
    is_data = np.zeros(size, bool)
    for off, n in _raw_regions(path):
        is_data[off : off + n] = True
    return np.flatnonzero(~is_data), np.flatnonzero(is_data)


UNCHANGED_MARK = "_content_unchanged"  # in the case folder: a byte flip that changed no value the file holds


def hdf5_content(path: Path) -> str | None:
    """sha256 of everything an HDF5 file says (each object's name, kind, shape, dtype, attributes and
    values); None when h5py cannot read it all."""
    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                digest.update(f"{name}|{type(obj).__name__}".encode())
                for key in sorted(obj.attrs):
                    digest.update(key.encode() + repr(obj.attrs[key]).encode())
                if isinstance(obj, h5py.Dataset):
                    digest.update(f"{obj.shape}{obj.dtype}".encode())
                    digest.update(np.ascontiguousarray(obj[()]).tobytes() if obj.dtype.kind != "O"
                                  else repr(obj[()].tolist()).encode())
            visit("/", f)
            f.visititems(visit)
    except Exception:  # noqa: BLE001 -- any failure to read means the flip changed what the file says
        return None
    return digest.hexdigest()


def flip_bytes(path: Path, offsets) -> None:
    data = bytearray(path.read_bytes())
    for o in offsets:
        data[int(o)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(0, size))


# ------------------------------------------------------------------ generic byte damage (any file)
def _bytes_mutations(kind: str) -> dict:
    """Truncations, flips and substitutions; ``kind`` 'hdf5' targets metadata vs raw data."""
    muts = {}

    def trunc_to(n):
        return lambda p, ctx: truncate(p, n)

    def trunc_frac(x):
        return lambda p, ctx: truncate(p, int(p.stat().st_size * x))

    for n in (0, 8, 100, 2048):
        muts[f"trunc-{n}"] = (trunc_to(n), {"structure"})
    for x in (0.25, 0.5, 0.9, 0.999):
        muts[f"trunc-{x:g}"] = (trunc_frac(x), {"structure"})
    muts["trunc-minus1"] = (lambda p, ctx: truncate(p, p.stat().st_size - 1), {"structure"})

    def flip(region: str, count: int):
        def run(p, ctx):
            if kind == "hdf5":
                meta, data = _byte_classes(p)
                pool = {"meta": meta, "data": data, "any": np.arange(p.stat().st_size)}[region]
            else:
                size = p.stat().st_size
                head = min(size, 2880 if kind == "fits" else 4096)
                pool = {"meta": np.arange(head), "data": np.arange(head, size), "any": np.arange(size)}[region]
            before = hdf5_content(p) if kind == "hdf5" else None
            flip_bytes(p, ctx.rng.choice(pool, size=min(count, pool.size), replace=False))
            if before is not None and hdf5_content(p) == before:
                # Free space, padding or unused B-tree slots: the file says exactly what it said, and no
                # reader can (or needs to) tell. The case then expects "any", and the record says why.
                (ctx.case_dir / UNCHANGED_MARK).write_text(str(p))
        return run

    for k in range(6):
        muts[f"flip-meta-{k}"] = (flip("meta", 1 + 3 * k), {"structure"} if kind != "fits" else {"any"})
    for k in range(2):
        muts[f"flip-data-{k}"] = (flip("data", 4), {"any"})  # undetectable without checksums
    muts["flip-any-64"] = (flip("any", 64), {"any"})

    def zero_block(where: str):
        def run(p, ctx):
            data = bytearray(p.read_bytes())
            a = 0 if where == "start" else len(data) // 2
            data[a : a + 4096] = bytes(min(4096, len(data) - a))
            p.write_bytes(bytes(data))
        return run

    muts["zero-first-4k"] = (zero_block("start"), {"structure"})
    muts["zero-middle-4k"] = (zero_block("middle"), {"any"})
    muts["append-garbage"] = (lambda p, ctx: p.write_bytes(p.read_bytes() + b"\x89garbage" * 512), {"any"})
    muts["text-file"] = (lambda p, ctx: p.write_text("this is not a data file\n"), {"structure"})
    muts["empty-dir"] = (lambda p, ctx: (p.unlink(), p.mkdir()), {"structure"})
    muts["png-file"] = (lambda p, ctx: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(1000)), {"structure"})
    def npz(p, ctx):
        with open(p, "wb") as fh:
            np.savez(fh, a=np.zeros(3))

    muts["npz-file"] = (npz, {"structure"})
    muts["random-bytes"] = (lambda p, ctx: p.write_bytes(ctx.rng.integers(0, 256, 65536, dtype=np.uint8).tobytes()),
                            {"structure"})
    return muts


HDF5_BYTES = _bytes_mutations("hdf5")
FITS_BYTES = _bytes_mutations("fits")
RAW_BYTES = _bytes_mutations("raw")


# ------------------------------------------------------------------ dataset structure
REQUIRED = ("flux", "ivar", "wavelength", "labels", "group")


def _dataset_structure() -> dict:
    m = {}
    for name in REQUIRED:
        m[f"{name}-missing"] = (h5(lambda f, ctx, n=name: f.__delitem__(n)), {"structure"})
        m[f"{name}-as-group"] = (h5(lambda f, ctx, n=name: (f.__delitem__(n), f.create_group(n))), {"structure"})
        m[f"{name}-as-scalar"] = (h5(lambda f, ctx, n=name: _replace(f, n, np.float32(1.0))), {"structure"})
        m[f"{name}-zero-size"] = (h5(lambda f, ctx, n=name: _replace(f, n, np.zeros((0,) * f[n].ndim, f[n].dtype))),
                                  {"structure"})

    def reshape(name, fn):
        return h5(lambda f, ctx: _replace(f, name, fn(f[name][()])))

    m["flux-1d"] = (reshape("flux", np.ravel), {"structure"})
    m["flux-3d"] = (reshape("flux", lambda a: a[:, :, None]), {"structure"})
    m["flux-transposed"] = (reshape("flux", lambda a: np.ascontiguousarray(a.T)), {"structure"})
    m["flux-one-pixel-short"] = (reshape("flux", lambda a: a[:, :-1]), {"structure"})
    m["flux-one-row-more"] = (reshape("flux", lambda a: np.vstack([a, a[:1]])), {"structure"})
    m["ivar-one-pixel-short"] = (reshape("ivar", lambda a: a[:, :-1]), {"structure"})
    m["ivar-1d"] = (reshape("ivar", np.ravel), {"structure"})
    m["wavelength-one-short"] = (reshape("wavelength", lambda a: a[:-1]), {"structure"})
    m["wavelength-2d"] = (reshape("wavelength", lambda a: a[None, :]), {"structure"})
    m["wavelength-str"] = (reshape("wavelength", lambda a: a.astype("S12")), {"structure"})
    m["labels-1d"] = (reshape("labels", lambda a: a[:, 0]), {"structure"})
    m["labels-one-row-short"] = (reshape("labels", lambda a: a[:-1]), {"structure"})
    m["labels-fixed-str"] = (reshape("labels", lambda a: a.astype("S12")), {"structure"})
    m["labels-vlen-str"] = (h5(lambda f, ctx: _replace(f, "labels", f["labels"][()].astype(str).astype(object),
                                                       dtype=h5py.string_dtype())), {"structure"})
    m["labels-int"] = (reshape("labels", lambda a: a.astype(np.int64)), {"any"})
    m["labels-f16"] = (reshape("labels", lambda a: a.astype(np.float16)), {"any"})
    m["labels-complex"] = (reshape("labels", lambda a: a.astype(np.complex64)), {"structure"})
    m["labels-bool"] = (reshape("labels", lambda a: a > 0), {"structure"})

    def names(fn):
        def run(f, ctx):
            n = [x.decode() if isinstance(x, bytes) else str(x) for x in f["labels"].attrs["names"]]
            value = fn(n)
            if value is None:
                del f["labels"].attrs["names"]
            else:
                f["labels"].attrs["names"] = value
        return h5(run)

    m["names-missing"] = (names(lambda n: None), {"structure"})
    m["names-one-short"] = (names(lambda n: np.array(n[:-1], dtype=h5py.string_dtype())), {"structure"})
    m["names-duplicate-teff"] = (names(lambda n: np.array(["TEFF"] + n[1:2] + ["TEFF"] + n[3:], dtype=h5py.string_dtype())),
                                 {"labels_tl"})
    m["names-int"] = (names(lambda n: np.arange(len(n))), {"structure"})
    m["names-no-teff"] = (names(lambda n: np.array(["T_EFF"] + n[1:], dtype=h5py.string_dtype())), {"labels_tl"})
    m["names-fixed-bytes"] = (names(lambda n: np.array(n, dtype="S8")), {"valid"})
    m["names-one-string"] = (names(lambda n: ",".join(n)), {"structure"})
    m["names-nonutf8"] = (names(lambda n: np.array([b"\xff\xfe" + x.encode() for x in n], dtype="S10")), {"structure"})

    m["group-float"] = (reshape("group", lambda a: a.astype(np.float64)), {"any"})
    m["group-float-nan"] = (reshape("group", lambda a: np.where(np.arange(a.size) == 3, np.nan, a.astype(float))),
                            {"group"})
    m["group-str"] = (reshape("group", lambda a: a.astype("S8")), {"structure"})
    m["group-2d"] = (reshape("group", lambda a: a[:, None]), {"structure"})
    m["group-one-short"] = (reshape("group", lambda a: a[:-1]), {"structure"})
    m["group-bool"] = (reshape("group", lambda a: a % 2 == 0), {"any"})
    m["group-huge-values"] = (reshape("group", lambda a: a + 2**62), {"any"})
    m["group-all-unknown"] = (reshape("group", lambda a: np.full_like(a, -1)), {"group"})
    m["group-all-one"] = (reshape("group", lambda a: np.zeros_like(a)), {"any"})

    m["flux-fixed-str"] = (reshape("flux", lambda a: a.astype("S12")), {"structure"})
    m["flux-int"] = (reshape("flux", lambda a: (a * 1000).astype(np.int32)), {"any"})
    m["flux-f16"] = (reshape("flux", lambda a: a.astype(np.float16)), {"any"})
    m["flux-f64"] = (reshape("flux", lambda a: a.astype(np.float64)), {"valid"})
    m["flux-complex"] = (reshape("flux", lambda a: a.astype(np.complex64)), {"structure"})
    m["flux-bool"] = (reshape("flux", lambda a: a > 0.9), {"structure"})
    m["ivar-fixed-str"] = (reshape("ivar", lambda a: a.astype("S12")), {"structure"})
    m["ivar-int"] = (reshape("ivar", lambda a: a.astype(np.int32)), {"any"})
    m["ivar-complex"] = (reshape("ivar", lambda a: a.astype(np.complex64)), {"structure"})

    def star_id(fn):
        def run(f, ctx):
            n = f["flux"].shape[0]
            if "star_id" in f:
                del f["star_id"]
            fn(f, n)
        return h5(run)

    m["star_id-valid"] = (star_id(lambda f, n: f.create_dataset("star_id", data=np.array([f"2M{i:08d}" for i in range(n)],
                                                                                         dtype=object),
                                                                dtype=h5py.string_dtype())), {"valid"})
    m["star_id-int"] = (star_id(lambda f, n: f.create_dataset("star_id", data=np.arange(n))), {"star_id"})
    m["star_id-one-short"] = (star_id(lambda f, n: f.create_dataset("star_id", data=np.array(["a"] * (n - 1), dtype=object),
                                                                    dtype=h5py.string_dtype())), {"star_id"})
    m["star_id-2d"] = (star_id(lambda f, n: f.create_dataset("star_id", data=np.array([["a"]] * n, dtype=object),
                                                             dtype=h5py.string_dtype())), {"star_id"})
    m["star_id-as-group"] = (star_id(lambda f, n: f.create_group("star_id")), {"star_id"})
    m["star_id-fixed-bytes"] = (star_id(lambda f, n: f.create_dataset("star_id", data=np.array([b"2M%06d" % i for i in range(n)]))),
                                {"any"})
    m["star_id-nonutf8"] = (star_id(lambda f, n: f.create_dataset(
        "star_id", data=np.array([b"\xff\xfe%d" % i for i in range(n)], dtype=object), dtype=h5py.vlen_dtype(bytes))),
        {"star_id"})

    def rows(k):
        def run(p, ctx):
            _rewrite(p, lambda name, a: a[:k] if name in ("flux", "ivar", "labels", "group", "star_id") else a)
        return run

    m["rows-zero"] = (rows(0), {"rows"})
    m["rows-one"] = (rows(1), {"any"})
    m["rows-three"] = (rows(3), {"any"})

    def attr(key, value):
        def run(f, ctx):
            if value is None:
                f.attrs.pop(key, None)
            else:
                f.attrs[key] = value
        return h5(run)

    m["layout-version-99"] = (attr("layout_version", 99), {"structure"})
    m["layout-version-str"] = (attr("layout_version", "one"), {"structure"})
    m["generator-missing"] = (attr("generator", None), {"generator"})
    m["generator-other"] = (attr("generator", "someone-else"), {"generator"})
    m["snr-str"] = (attr("snr", "abc"), {"any"})
    m["grid-bogus"] = (attr("grid", "bogus"), {"any"})
    m["attr-huge"] = (attr("notes", "x" * 2_000_000), {"valid"})

    # Links and external storage: the data is somewhere else than the file the user named.
    def external_link(name, missing=False):
        def run(p, ctx):
            other = _outside(ctx, f"{name}-source.h5")
            with h5py.File(p, "r") as f, h5py.File(other, "w") as g:
                g.create_dataset(name, data=f[name][()])
            if missing:
                other.unlink()
            with h5py.File(p, "r+") as f:
                attrs = dict(f[name].attrs)
                del f[name]
                f[name] = h5py.ExternalLink(str(other), f"/{name}")
                if attrs and not missing:
                    with h5py.File(other, "r+") as g:
                        g[name].attrs.update(attrs)
        return run

    def external_storage(name):
        def run(p, ctx):
            raw = _outside(ctx, f"{name}.raw")
            with h5py.File(p, "r+") as f:
                values = f[name][()]
                values.tofile(raw)
                attrs = dict(f[name].attrs)
                del f[name]
                d = f.create_dataset(name, shape=values.shape, dtype=values.dtype, external=[(str(raw), 0, values.nbytes)])
                d.attrs.update(attrs)
        return run

    m["flux-external-link"] = (external_link("flux"), {"structure"})
    m["labels-external-link"] = (external_link("labels"), {"structure"})
    m["flux-external-link-missing"] = (external_link("flux", missing=True), {"structure"})
    m["ivar-external-storage"] = (external_storage("ivar"), {"structure"})
    m["flux-external-storage"] = (external_storage("flux"), {"structure"})
    m["flux-soft-link-to-ivar"] = (h5(lambda f, ctx: (f.__delitem__("flux"), f.__setitem__("flux", h5py.SoftLink("/ivar")))),
                                   {"any"})
    m["flux-dangling-soft-link"] = (h5(lambda f, ctx: (f.__delitem__("flux"), f.__setitem__("flux", h5py.SoftLink("/nowhere")))),
                                    {"structure"})

    # Sizes that cannot be read into memory (chunked, never written: a tiny file).
    def huge(n_rows, n_pixels):
        def run(p, ctx):
            with h5py.File(p, "r+") as f:
                names_attr = f["labels"].attrs["names"]
                n_labels = f["labels"].shape[1]
                for name in REQUIRED:
                    del f[name]
                ch = (1, min(n_pixels, 65536))
                f.create_dataset("flux", shape=(n_rows, n_pixels), dtype="f4", chunks=ch, fillvalue=1.0)
                f.create_dataset("ivar", shape=(n_rows, n_pixels), dtype="f4", chunks=ch, fillvalue=1e4)
                f.create_dataset("wavelength", data=np.linspace(15100.0, 17000.0, n_pixels)) if n_pixels < 10**7 else \
                    f.create_dataset("wavelength", shape=(n_pixels,), dtype="f8", chunks=(65536,), fillvalue=16000.0)
                lab = f.create_dataset("labels", shape=(n_rows, n_labels), dtype="f4", chunks=(min(4096, n_rows), n_labels),
                                       fillvalue=4500.0)
                lab.attrs["names"] = names_attr
                f.create_dataset("group", shape=(n_rows,), dtype="i8", chunks=(min(65536, n_rows),), fillvalue=-1)
        return run

    m["rows-huge"] = (huge(10**9, 7214), {"any"})
    m["pixels-huge"] = (huge(40, 10**9), {"structure"})

    # Harmless additions: controls that must still work.
    m["control"] = (lambda p, ctx: None, {"valid"})
    m["extra-dataset"] = (h5(lambda f, ctx: f.create_dataset("notes", data=np.arange(10))), {"valid"})
    m["extra-group"] = (h5(lambda f, ctx: f.create_group("extra/nested")), {"valid"})
    m["flux-gzip-shuffle-fletcher32"] = (h5(lambda f, ctx: _replace(f, "flux", f["flux"][()], compression="gzip",
                                                                     shuffle=True, fletcher32=True, chunks=(8, 7214))),
                                         {"valid"})
    m["flux-tiny-chunks"] = (h5(lambda f, ctx: _replace(f, "flux", f["flux"][()], chunks=(1, 97))), {"valid"})
    return m


# ------------------------------------------------------------------ non-finite and degenerate values
def _values(name, fn):
    """Replace dataset ``name`` by ``fn(values, ctx, f)``."""
    def run(f, ctx):
        _replace(f, name, fn(f[name][()], ctx, f))
    return h5(run)


def _set(a, where, value):
    a = a.copy()
    a[where] = value
    return a


def _dataset_values() -> dict:
    m = {}
    m["flux-nan-all"] = (_values("flux", lambda a, c, f: np.full_like(a, np.nan)), {"flux"})
    m["flux-nan-one-row"] = (_values("flux", lambda a, c, f: _set(a, (5, slice(None)), np.nan)), {"flux"})
    m["flux-nan-one-pixel"] = (_values("flux", lambda a, c, f: _set(a, (5, 100), np.nan)), {"flux"})
    m["flux-inf-one-pixel"] = (_values("flux", lambda a, c, f: _set(a, (5, 100), np.inf)), {"flux"})
    m["flux-neginf-one-pixel"] = (_values("flux", lambda a, c, f: _set(a, (5, 100), -np.inf)), {"flux"})

    def nan_where_masked(f, ctx):
        mask = np.zeros(f["flux"].shape, bool)
        mask[:, ::10] = True
        _replace(f, "flux", np.where(mask, np.nan, f["flux"][()]).astype(np.float32))
        _replace(f, "ivar", np.where(mask, 0, f["ivar"][()]).astype(np.float32))

    m["flux-nan-where-ivar0"] = (h5(nan_where_masked), {"masked"})
    m["flux-huge-values"] = (_values("flux", lambda a, c, f: a * np.float32(1e30)), {"any"})
    m["flux-all-zero"] = (_values("flux", lambda a, c, f: np.zeros_like(a)), {"any"})
    m["flux-all-negative"] = (_values("flux", lambda a, c, f: -a), {"any"})
    m["flux-constant-one"] = (_values("flux", lambda a, c, f: np.ones_like(a)), {"any"})
    m["ivar-zero-all"] = (_values("ivar", lambda a, c, f: np.zeros_like(a)), {"ivar_all_zero"})
    m["ivar-zero-one-row"] = (_values("ivar", lambda a, c, f: _set(a, (7, slice(None)), 0)), {"masked"})
    m["ivar-zero-every-other-pixel"] = (_values("ivar", lambda a, c, f: _set(a, (slice(None), slice(None, None, 2)), 0)),
                                        {"masked"})
    m["ivar-zero-all-but-one-row"] = (_values("ivar", lambda a, c, f: _set(a, slice(1, None), 0)), {"any"})
    m["ivar-zero-half-rows"] = (_values("ivar", lambda a, c, f: _set(a, np.arange(len(a)) % 4 < 2, 0)), {"masked"})  # whole twin pairs masked: the rest keep their twins
    m["ivar-nan-one-pixel"] = (_values("ivar", lambda a, c, f: _set(a, (5, 100), np.nan)), {"ivar"})
    m["ivar-nan-all"] = (_values("ivar", lambda a, c, f: np.full_like(a, np.nan)), {"ivar"})
    m["ivar-negative-one-pixel"] = (_values("ivar", lambda a, c, f: _set(a, (5, 100), -1.0)), {"ivar"})
    m["ivar-neginf-one-pixel"] = (_values("ivar", lambda a, c, f: _set(a, (5, 100), -np.inf)), {"ivar"})
    m["ivar-inf-one-pixel"] = (_values("ivar", lambda a, c, f: _set(a, (5, 100), np.inf)), {"any"})
    m["ivar-inf-all"] = (_values("ivar", lambda a, c, f: np.full_like(a, np.inf)), {"any"})
    m["ivar-huge"] = (_values("ivar", lambda a, c, f: np.full_like(a, 3e38)), {"any"})
    m["ivar-tiny"] = (_values("ivar", lambda a, c, f: np.full_like(a, 1e-38)), {"any"})

    def label(col, value, rows=slice(None)):
        def fn(a, c, f):
            names = [x.decode() if isinstance(x, bytes) else str(x) for x in f["labels"].attrs["names"]]
            return _set(a, (rows, names.index(col)), value)
        return fn

    m["teff-nan-one-row"] = (_values("labels", label("TEFF", np.nan, 4)), {"labels_tl"})
    m["teff-nan-all"] = (_values("labels", label("TEFF", np.nan)), {"labels_tl"})
    m["logg-inf-one-row"] = (_values("labels", label("LOGG", np.inf, 4)), {"labels_tl"})
    m["teff-out-of-range"] = (_values("labels", label("TEFF", 1e6, 4)), {"labels_range"})
    m["teff-constant"] = (_values("labels", label("TEFF", 4500.0)), {"any"})
    m["fe_h-nan-one-row"] = (_values("labels", label("FE_H", np.nan, 4)), {"labels_chem"})
    m["mg_fe-nan-all"] = (_values("labels", label("MG_FE", np.nan)), {"labels_all"})
    m["labels-nan-all"] = (_values("labels", lambda a, c, f: np.full_like(a, np.nan)), {"labels_tl", "labels_chem"})
    m["wavelength-nan"] = (_values("wavelength", lambda a, c, f: _set(a, 10, np.nan)), {"wavelength"})
    m["wavelength-reversed"] = (_values("wavelength", lambda a, c, f: a[::-1].copy()), {"wavelength"})
    m["wavelength-constant"] = (_values("wavelength", lambda a, c, f: np.full_like(a, 16000.0)), {"wavelength"})
    m["wavelength-negative"] = (_values("wavelength", lambda a, c, f: -a), {"wavelength"})
    m["wavelength-shifted-1A"] = (_values("wavelength", lambda a, c, f: a + 1.0), {"any"})
    return m


DATASET_STRUCTURE = _dataset_structure()
DATASET_VALUES = _dataset_values()


# ------------------------------------------------------------------ latent files
def _latents() -> dict:
    m = {}

    def z(fn):
        return _values("z", lambda a, c, f: fn(a))

    m["control"] = (lambda p, ctx: None, {"valid"})
    m["z-missing"] = (h5(lambda f, ctx: f.__delitem__("z")), {"structure"})
    m["z-as-group"] = (h5(lambda f, ctx: (f.__delitem__("z"), f.create_group("z"))), {"structure"})
    m["z-scalar"] = (h5(lambda f, ctx: _replace(f, "z", np.float32(1))), {"structure"})
    m["z-1d"] = (z(np.ravel), {"structure"})
    m["z-3d"] = (z(lambda a: a[:, :, None]), {"structure"})
    m["z-dim0"] = (z(lambda a: a[:, :0]), {"structure"})
    m["z-fixed-str"] = (z(lambda a: a.astype("S12")), {"structure"})
    m["z-int"] = (z(lambda a: (a * 100).astype(np.int32)), {"any"})
    m["z-f16"] = (z(lambda a: a.astype(np.float16)), {"any"})
    m["z-f64"] = (z(lambda a: a.astype(np.float64)), {"valid"})
    m["z-complex"] = (z(lambda a: a.astype(np.complex64)), {"structure"})
    m["z-bool"] = (z(lambda a: a > 0), {"structure"})
    m["z-nan-one-row"] = (z(lambda a: _set(a, (3, 1), np.nan)), {"values"})
    m["z-inf-one-row"] = (z(lambda a: _set(a, (3, 1), np.inf)), {"values"})
    m["z-nan-all"] = (z(lambda a: np.full_like(a, np.nan)), {"values"})
    m["z-huge-values"] = (z(lambda a: a * np.float32(1e37)), {"any"})
    m["z-constant"] = (z(lambda a: np.ones_like(a)), {"any"})
    m["z-other-dim"] = (z(lambda a: np.hstack([a, a[:, :1]])), {"dim"})

    def rows_k(k):
        def run(p, ctx):
            _rewrite(p, lambda name, a: a[:k] if a.ndim and a.shape[0] == 40 else a)
        return run

    m["rows-zero"] = (rows_k(0), {"rows"})
    m["rows-one"] = (rows_k(1), {"any"})

    def huge(f, ctx):
        del f["z"]
        f.create_dataset("z", shape=(10**9, 4), dtype="f4", chunks=(65536, 4), fillvalue=0.5)
        for name in ("group", "row", "labels", "star_id"):
            if name in f:
                del f[name]

    m["z-rows-huge"] = (h5(huge), {"any"})
    m["group-missing"] = (h5(lambda f, ctx: f.__delitem__("group")), {"group_in_file"})
    m["group-float-nan"] = (_values("group", lambda a, c, f: np.where(np.arange(a.size) == 2, np.nan, a.astype(float))), {"group"})
    m["group-fixed-str"] = (_values("group", lambda a, c, f: a.astype("S6")), {"structure"})
    m["group-one-short"] = (_values("group", lambda a, c, f: a[:-1]), {"structure"})
    m["group-2d"] = (_values("group", lambda a, c, f: a[:, None]), {"structure"})
    m["group-all-unknown"] = (_values("group", lambda a, c, f: np.full_like(a, -1)), {"group"})

    def sid(data, **kw):
        def run(f, ctx):
            if "star_id" in f:
                del f["star_id"]
            n = f["z"].shape[0]
            f.create_dataset("star_id", data=data(n), **kw)
        return h5(run)

    m["star_id-valid"] = (sid(lambda n: np.array([f"2M{i:06d}" for i in range(n)], dtype=object), dtype=h5py.string_dtype()),
                          {"valid"})
    m["star_id-int"] = (sid(lambda n: np.arange(n)), {"star_id"})
    m["star_id-one-short"] = (sid(lambda n: np.array(["a"] * (n - 1), dtype=object), dtype=h5py.string_dtype()), {"structure"})
    m["star_id-duplicates"] = (sid(lambda n: np.array(["2M0"] * n, dtype=object), dtype=h5py.string_dtype()), {"star_id"})
    m["star_id-nonutf8"] = (sid(lambda n: np.array([b"\xff%d" % i for i in range(n)], dtype=object),
                                dtype=h5py.vlen_dtype(bytes)), {"star_id"})
    m["row-fixed-str"] = (_values("row", lambda a, c, f: a.astype("S6")), {"any"})
    m["row-one-short"] = (_values("row", lambda a, c, f: a[:-1]), {"any"})
    m["labels-fixed-str"] = (_values("labels", lambda a, c, f: a.astype("S8")), {"any"})

    def z_external_link(p, ctx):
        other = _outside(ctx, "z-source.h5")
        with h5py.File(p, "r") as f, h5py.File(other, "w") as g:
            g["z"] = f["z"][()]
        with h5py.File(p, "r+") as f:
            del f["z"]
            f["z"] = h5py.ExternalLink(str(other), "/z")

    def z_external_storage(p, ctx):
        raw = _outside(ctx, "z.raw")
        with h5py.File(p, "r+") as f:
            values = f["z"][()]
            values.tofile(raw)
            del f["z"]
            f.create_dataset("z", shape=values.shape, dtype=values.dtype, external=[(str(raw), 0, values.nbytes)])

    m["z-external-link"] = (z_external_link, {"structure"})
    m["z-external-storage"] = (z_external_storage, {"structure"})
    for name, (fn, tags) in HDF5_BYTES.items():
        m[f"bytes-{name}"] = (fn, tags)
    return m


LATENTS = _latents()


# ------------------------------------------------------------------ JSON helpers
def json_edit(fn, filename: str):
    """Edit ``<folder>/filename`` (JSON) through ``fn(obj, ctx, folder) -> obj``; a str result is written as it is."""
    def run(folder: Path, ctx: Ctx):
        p = folder / filename
        obj = json.loads(p.read_text())
        new = fn(obj, ctx, folder)
        p.write_text(new if isinstance(new, str) else json.dumps(new, indent=1))
    return run


def _deep_nesting(n: int = 100_000) -> str:
    return "[" * n + "]" * n


# ------------------------------------------------------------------ model folders
def _model() -> dict:
    m = {}

    def cfg(fn):
        def edit(obj, ctx, folder):
            fn(obj)
            return obj
        return json_edit(edit, "config.json")

    def set_config(key, value):
        return cfg(lambda o: o["config"].__setitem__(key, value))

    m["control"] = (lambda p, ctx: None, {"valid"})
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "history.csv"):
        tag = {"checkpoint.safetensors": "checkpoint", "history.csv": "any"}.get(name, "structure")
        m[f"{name}-missing"] = (lambda p, ctx, n=name: (p / n).unlink(), {tag})
    m["config-empty"] = (lambda p, ctx: (p / "config.json").write_text(""), {"structure"})
    m["config-not-json"] = (lambda p, ctx: (p / "config.json").write_text("{config: yes"), {"structure"})
    m["config-list"] = (lambda p, ctx: (p / "config.json").write_text("[1, 2]"), {"structure"})
    m["config-binary"] = (lambda p, ctx: (p / "config.json").write_bytes(b"\xff\xfe\x00garbage"), {"structure"})
    m["config-deep-nesting"] = (lambda p, ctx: (p / "config.json").write_text(_deep_nesting()), {"structure"})
    m["config-null"] = (cfg(lambda o: o.__setitem__("config", None)), {"structure"})
    m["format-other"] = (cfg(lambda o: o.__setitem__("format", "something-else")), {"structure"})
    m["format-version-99"] = (cfg(lambda o: o.__setitem__("format_version", 99)), {"structure"})
    m["config-unknown-key"] = (set_config("colour", "blue"), {"any"})
    m["condition-swapped"] = (set_config("condition", ["LOGG", "TEFF"]), {"structure"})
    m["condition-unknown"] = (set_config("condition", ["TEFF", "FOO"]), {"structure"})
    m["condition-empty"] = (set_config("condition", []), {"structure"})
    m["condition-one-more"] = (set_config("condition", ["TEFF", "LOGG", "FE_H"]), {"structure"})
    m["latent-dim-changed"] = (set_config("latent_dim", 5), {"structure"})
    m["latent-dim-str"] = (set_config("latent_dim", "four"), {"structure"})
    m["latent-dim-zero"] = (set_config("latent_dim", 0), {"structure"})
    m["latent-dim-negative"] = (set_config("latent_dim", -4), {"structure"})
    m["latent-dim-huge"] = (set_config("latent_dim", 10**12), {"structure"})
    m["decoder-hidden-changed"] = (set_config("decoder_hidden", [33]), {"structure"})
    m["model-kind-bogus"] = (set_config("model", "xyz"), {"structure"})
    m["lr-nan"] = (json_edit(lambda o, c, f: json.dumps(o).replace('"lr": 0.0003', '"lr": NaN'), "config.json"), {"any"})
    m["n-pixels-changed"] = (cfg(lambda o: o.__setitem__("n_pixels", 7000)), {"structure"})
    m["config-huge-whitespace"] = (json_edit(lambda o, c, f: json.dumps(o) + " " * 20_000_000, "config.json"), {"any"})

    def st_edit(fname, fn):
        """Rewrite a safetensors file through ``fn(dict of arrays) -> dict``, keeping its metadata."""
        def run(p, ctx):
            from safetensors import safe_open
            from safetensors.numpy import save_file
            with safe_open(p / fname, "np") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            save_file(fn(tensors), p / fname, metadata=meta)
        return run

    def weights(fn, fname="model.safetensors"):
        def edit(t):
            for k in list(t):
                if t[k].dtype.kind == "f" and ("weight" in k or "bias" in k):
                    t[k] = fn(t[k])
            return t
        return st_edit(fname, edit)

    m["weights-nan"] = (weights(lambda a: np.full_like(a, np.nan)), {"weights"})
    m["weights-one-nan"] = (st_edit("model.safetensors", lambda t: {**t, "encoder.layers.0.weight":
                                                                    _set(t["encoder.layers.0.weight"], (0, 0), np.nan)}),
                            {"weights"})
    m["weights-inf"] = (weights(lambda a: np.full_like(a, np.inf)), {"weights"})
    m["weights-huge"] = (weights(lambda a: a * np.float32(1e30)), {"any"})
    m["wavelength-nan"] = (st_edit("model.safetensors", lambda t: {**t, "data.wavelength": np.full_like(t["data.wavelength"], np.nan)}),
                           {"weights"})
    m["scale-zero"] = (st_edit("model.safetensors", lambda t: {**t, "scale": np.zeros_like(t["scale"])}), {"any"})
    m["u-range-nan"] = (st_edit("model.safetensors", lambda t: {**t, "u_lo": np.full_like(t["u_lo"], np.nan)}), {"weights"})
    m["tensor-missing"] = (st_edit("model.safetensors", lambda t: {k: v for k, v in t.items() if k != "encoder.layers.0.weight"}),
                           {"structure"})
    m["tensor-wrong-shape"] = (st_edit("model.safetensors", lambda t: {**t, "encoder.layers.0.weight": t["encoder.layers.0.weight"][:, :-1].copy()}),
                               {"structure"})
    m["tensor-f64"] = (st_edit("model.safetensors", lambda t: {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in t.items()}),
                       {"any"})
    m["tensor-int"] = (st_edit("model.safetensors", lambda t: {**t, "encoder.layers.0.weight": t["encoder.layers.0.weight"].astype(np.int32)}),
                       {"structure"})
    m["tensor-extra"] = (st_edit("model.safetensors", lambda t: {**t, "extra.weight": np.zeros(3, np.float32)}), {"any"})
    m["checkpoint-nan"] = (weights(lambda a: np.full_like(a, np.nan), "checkpoint.safetensors"), {"checkpoint"})
    m["checkpoint-wrong-shape"] = (st_edit("checkpoint.safetensors", lambda t: {**t, "model.encoder.layers.0.weight":
                                                                              t["model.encoder.layers.0.weight"][:, :-1].copy()}),
                                   {"checkpoint"})
    m["checkpoint-metadata-gone"] = (lambda p, ctx: _strip_metadata(p / "checkpoint.safetensors"), {"checkpoint"})

    def st_bytes(fname, fn):
        return lambda p, ctx: fn(p / fname, ctx)

    for fname, tag in (("model.safetensors", "structure"), ("checkpoint.safetensors", "checkpoint")):
        short = fname.split(".")[0]
        m[f"{short}-empty"] = (st_bytes(fname, lambda q, c: truncate(q, 0)), {tag})
        m[f"{short}-header-only"] = (st_bytes(fname, lambda q, c: truncate(q, 8)), {tag})
        m[f"{short}-truncated-half"] = (st_bytes(fname, lambda q, c: truncate(q, q.stat().st_size // 2)), {tag})
        m[f"{short}-truncated-minus1"] = (st_bytes(fname, lambda q, c: truncate(q, q.stat().st_size - 1)), {tag})
        m[f"{short}-header-length-huge"] = (st_bytes(fname, lambda q, c: _poke(q, 0, (2**62).to_bytes(8, "little"))), {tag})
        m[f"{short}-header-flip"] = (st_bytes(fname, lambda q, c: flip_bytes(q, c.rng.integers(8, 200, 3))), {tag})
        m[f"{short}-data-flip"] = (st_bytes(fname, lambda q, c: flip_bytes(q, c.rng.integers(q.stat().st_size // 2, q.stat().st_size, 4))),
                                   {"any"})
        m[f"{short}-pickle"] = (st_bytes(fname, _pickle_file), {tag})
        m[f"{short}-is-directory"] = (st_bytes(fname, lambda q, c: (q.unlink(), q.mkdir())), {tag})
        m[f"{short}-symlink-to-dataset"] = (st_bytes(fname, lambda q, c: (q.unlink(), q.symlink_to(c.seeds["data"]))), {tag})
    m["history-binary"] = (lambda p, ctx: (p / "history.csv").write_bytes(b"\x00\xff\xfe" * 100), {"any"})
    m["history-columns-missing"] = (lambda p, ctx: (p / "history.csv").write_text("epoch\n1\n2\n"), {"any"})
    m["history-nan"] = (lambda p, ctx: (p / "history.csv").write_text(
        (p / "history.csv").read_text().replace("0.0", "nan")), {"any"})
    m["history-ragged"] = (lambda p, ctx: (p / "history.csv").write_text(
        (p / "history.csv").read_text() + "3,4,5\n1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18\n"), {"any"})
    m["history-empty"] = (lambda p, ctx: (p / "history.csv").write_text(""), {"any"})
    m["dir-is-file"] = (lambda p, ctx: (shutil.rmtree(p), p.write_text("not a folder")), {"structure"})
    m["dir-empty"] = (lambda p, ctx: (shutil.rmtree(p), p.mkdir()), {"structure"})
    m["dir-missing"] = (lambda p, ctx: shutil.rmtree(p), {"structure"})
    return m


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def _pickle_file(path: Path, ctx: Ctx) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"weights": np.zeros(3)}))


def _strip_metadata(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(path, "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path)


MODEL = _model()


# ------------------------------------------------------------------ shard manifests
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _restamp(folder: Path, k: int) -> None:
    """Make the manifest entry of shard k agree with its (edited) file: size and checksum."""
    man = json.loads((folder / "manifest.json").read_text())
    p = folder / man["shards"][k]["path"]
    man["shards"][k]["bytes"] = p.stat().st_size
    man["shards"][k]["sha256"] = _sha(p)
    (folder / "manifest.json").write_text(json.dumps(man, indent=1))


def _manifests(kind: str) -> dict:
    m = {}

    def man(fn):
        def edit(obj, ctx, folder):
            out = fn(obj, ctx, folder)
            return obj if out is None else out
        return json_edit(edit, "manifest.json")

    def entry(k, key, value):
        return man(lambda o, c, f: o["shards"][k].__setitem__(key, value))

    m["control"] = (lambda p, ctx: None, {"valid"})
    m["manifest-missing"] = (lambda p, ctx: (p / "manifest.json").unlink(), {"structure"})
    m["manifest-empty"] = (lambda p, ctx: (p / "manifest.json").write_text(""), {"structure"})
    m["manifest-not-json"] = (lambda p, ctx: (p / "manifest.json").write_text("{shards"), {"structure"})
    m["manifest-list"] = (lambda p, ctx: (p / "manifest.json").write_text("[]"), {"structure"})
    m["manifest-binary"] = (lambda p, ctx: (p / "manifest.json").write_bytes(b"\xff\xfe\xfd"), {"structure"})
    m["manifest-deep-nesting"] = (lambda p, ctx: (p / "manifest.json").write_text(_deep_nesting()), {"structure"})
    m["format-other"] = (man(lambda o, c, f: o.__setitem__("format", "other")), {"structure"})
    m["kind-other"] = (man(lambda o, c, f: o.__setitem__("kind", "latents" if kind == "dataset" else "dataset")), {"structure"})
    m["layout-version-99"] = (man(lambda o, c, f: o.__setitem__("layout_version", 99)), {"structure"})
    m["layout-version-str"] = (man(lambda o, c, f: o.__setitem__("layout_version", "1")), {"structure"})
    m["shards-empty"] = (man(lambda o, c, f: o.__setitem__("shards", [])), {"structure"})
    m["shards-not-list"] = (man(lambda o, c, f: o.__setitem__("shards", {"a": 1})), {"structure"})
    m["shards-null-entry"] = (man(lambda o, c, f: o["shards"].append(None)), {"structure"})
    m["shard-duplicate-entry"] = (man(lambda o, c, f: o["shards"].insert(1, dict(o["shards"][0]))), {"integrity"})

    def dup_copy(obj, ctx, folder):
        shutil.copy(folder / obj["shards"][0]["path"], folder / "shard-copy.h5")
        obj["shards"].append(dict(obj["shards"][0], path="shard-copy.h5"))

    m["shard-duplicate-copy"] = (man(dup_copy), {"integrity"})

    def modify_shard(region):
        def run(p, ctx):
            shard = p / json.loads((p / "manifest.json").read_text())["shards"][1]["path"]
            meta, data = _byte_classes(shard)
            pool = data if region == "data" else meta[meta > 4096]
            flip_bytes(shard, ctx.rng.choice(pool, 2, replace=False))
        return run

    m["shard-sha-mismatch-data"] = (modify_shard("data"), {"integrity"})
    m["shard-sha-mismatch-meta"] = (modify_shard("meta"), {"integrity"})

    def truncated_restamped(p, ctx):
        shard = p / json.loads((p / "manifest.json").read_text())["shards"][1]["path"]
        truncate(shard, shard.stat().st_size // 2)
        man_ = json.loads((p / "manifest.json").read_text())
        man_["shards"][1]["bytes"] = shard.stat().st_size
        (p / "manifest.json").write_text(json.dumps(man_))

    m["shard-truncated-bytes-updated"] = (truncated_restamped, {"integrity"})
    m["shard-file-missing"] = (lambda p, ctx: (p / json.loads((p / "manifest.json").read_text())["shards"][1]["path"]).unlink(),
                               {"structure"})

    def outside(mode):
        def run(p, ctx):
            manifest = json.loads((p / "manifest.json").read_text())
            name = manifest["shards"][1]["path"]
            target = _outside(ctx, "outside-shard.h5")
            shutil.move(p / name, target)
            if mode == "absolute":
                manifest["shards"][1]["path"] = str(target)
            elif mode == "dotdot":
                manifest["shards"][1]["path"] = os.path.relpath(target, p)
            else:  # a symlink in the folder pointing outside
                (p / name).symlink_to(target)
            (p / "manifest.json").write_text(json.dumps(manifest))
        return run

    m["shard-absolute-path"] = (outside("absolute"), {"containment"})
    m["shard-dotdot-path"] = (outside("dotdot"), {"containment"})
    m["shard-symlink-outside"] = (outside("symlink"), {"containment"})
    m["shard-path-is-manifest"] = (entry(1, "path", "manifest.json"), {"structure"})
    m["shard-path-is-folder"] = (entry(1, "path", "."), {"structure"})
    m["shard-path-empty"] = (entry(1, "path", ""), {"structure"})
    m["shard-path-int"] = (entry(1, "path", 7), {"structure"})
    m["shard-path-dev-zero"] = (entry(1, "path", "/dev/zero"), {"containment"})
    m["rows-negative"] = (entry(1, "rows", -5), {"structure"})
    m["rows-str"] = (entry(1, "rows", "sixteen"), {"structure"})
    m["rows-float"] = (entry(1, "rows", 16.5), {"structure"})
    m["rows-one-more"] = (entry(1, "rows", 17), {"structure"})
    m["rows-huge"] = (entry(1, "rows", 10**15), {"structure"})
    m["sha-not-hex"] = (entry(1, "sha256", "not-a-checksum"), {"integrity"})
    m["sha-missing"] = (man(lambda o, c, f: o["shards"][1].pop("sha256")), {"structure"})
    m["bytes-wrong"] = (entry(1, "bytes", 12345), {"structure"})
    m["n-rows-wrong"] = (man(lambda o, c, f: o.__setitem__("n_rows", 999)), {"any"})
    m["progress-garbage"] = (lambda p, ctx: (p / ".progress.jsonl").write_bytes(b"\xff{{{\n"), {"valid"})
    m["extra-unlisted-shard"] = (lambda p, ctx: shutil.copy(p / "shard-00000.h5", p / "shard-00099.h5"), {"valid"})
    if kind == "dataset":
        m["pixel-grid-wrong"] = (man(lambda o, c, f: o.__setitem__("pixel_grid", "0" * 64)), {"structure"})

        def shard_edit(fn):
            def run(p, ctx):
                name = json.loads((p / "manifest.json").read_text())["shards"][1]["path"]
                with h5py.File(p / name, "r+") as f:
                    fn(f, ctx)
                _restamp(p, 1)
            return run

        m["shard-flux-nan"] = (shard_edit(lambda f, c: _replace(f, "flux", np.full(f["flux"].shape, np.nan, np.float32))),
                               {"flux"})
        m["shard-ivar-zero"] = (shard_edit(lambda f, c: _replace(f, "ivar", np.zeros(f["ivar"].shape, np.float32))),
                                {"masked"})
        m["shard-other-labels"] = (shard_edit(lambda f, c: f["labels"].attrs.__setitem__(
            "names", np.array(["T"] + [x.decode() if isinstance(x, bytes) else x for x in f["labels"].attrs["names"]][1:],
                              dtype=h5py.string_dtype()))), {"structure"})
        m["shard-flux-missing"] = (shard_edit(lambda f, c: f.__delitem__("flux")), {"structure"})

        def shard_external(p, ctx):
            name = json.loads((p / "manifest.json").read_text())["shards"][1]["path"]
            other = _outside(ctx, "ivar-source.h5")
            with h5py.File(p / name, "r+") as f, h5py.File(other, "w") as g:
                g["ivar"] = f["ivar"][()]
                del f["ivar"]
                f["ivar"] = h5py.ExternalLink(str(other), "/ivar")
            _restamp(p, 1)

        m["shard-external-link"] = (shard_external, {"containment"})
    else:
        def lshard_edit(fn):
            def run(p, ctx):
                name = json.loads((p / "manifest.json").read_text())["shards"][1]["path"]
                with h5py.File(p / name, "r+") as f:
                    fn(f, ctx)
                _restamp(p, 1)
            return run

        m["shard-z-nan"] = (lshard_edit(lambda f, c: _replace(f, "z", np.full(f["z"].shape, np.nan, np.float32))), {"values"})
        m["shard-z-other-dim"] = (lshard_edit(lambda f, c: _replace(f, "z", np.zeros((f["z"].shape[0], 5), np.float32))),
                                  {"structure"})
    return m


DATASET_MANIFEST = _manifests("dataset")
LATENT_MANIFEST = _manifests("latents")


# ------------------------------------------------------------------ twin-search indexes
def _indexes() -> dict:
    m = {}
    m["control"] = (lambda p, ctx: None, {"valid"})
    for fname in ("index.faiss", "meta.json", "ids.npz"):
        m[f"{fname}-missing"] = (lambda p, ctx, n=fname: (p / n).unlink(), {"structure"})
        m[f"{fname}-empty"] = (lambda p, ctx, n=fname: truncate(p / n, 0), {"structure"})
        m[f"{fname}-text"] = (lambda p, ctx, n=fname: (p / n).write_text("garbage\n"), {"structure"})
    m["faiss-truncated-16"] = (lambda p, ctx: truncate(p / "index.faiss", 16), {"structure"})
    m["faiss-truncated-half"] = (lambda p, ctx: truncate(p / "index.faiss", (p / "index.faiss").stat().st_size // 2), {"structure"})
    m["faiss-truncated-minus1"] = (lambda p, ctx: truncate(p / "index.faiss", (p / "index.faiss").stat().st_size - 1), {"structure"})
    m["faiss-flip-header"] = (lambda p, ctx: flip_bytes(p / "index.faiss", ctx.rng.integers(0, 40, 2)), {"structure"})
    m["faiss-flip-fourcc"] = (lambda p, ctx: flip_bytes(p / "index.faiss", [0, 1]), {"structure"})
    m["faiss-flip-data"] = (lambda p, ctx: flip_bytes(p / "index.faiss", ctx.rng.integers(
        (p / "index.faiss").stat().st_size // 2, (p / "index.faiss").stat().st_size, 3)), {"any"})
    m["faiss-header-count-huge"] = (lambda p, ctx: _poke(p / "index.faiss", 8, (2**40).to_bytes(8, "little")), {"structure"})

    def other_index(which):
        def run(p, ctx):
            import faiss

            if which in ("hnsw", "ivf", "flat"):
                # another valid index of that kind, with the seed's d, n and metric but other vectors
                seed = faiss.read_index(str(Path(ctx.seeds[{"hnsw": "index_hnsw", "ivf": "index_ivf", "flat": "index"}[which]])
                                            / "index.faiss"))
                vectors = np.random.default_rng(0).normal(size=(seed.ntotal, seed.d)).astype(np.float32)
                kind = {"hnsw": "HNSW8,Flat", "ivf": f"IVF{min(4, seed.ntotal)},Flat", "flat": "Flat"}[which]
                index = faiss.index_factory(seed.d, kind, seed.metric_type)
                index.train(vectors)
                index.add(vectors)
                faiss.write_index(index, str(p / "index.faiss"))
            elif which == "dim5":
                index = faiss.IndexFlatL2(5)
                index.add(np.zeros((40, 5), np.float32))
                faiss.write_index(index, str(p / "index.faiss"))
            elif which == "binary":
                index = faiss.IndexBinaryFlat(32)
                index.add(np.zeros((40, 4), np.uint8))
                faiss.write_index_binary(index, str(p / "index.faiss"))
            elif which == "pq":
                index = faiss.IndexPQ(4, 2, 2)
                index.train(np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32))
                index.add(np.zeros((40, 4), np.float32))
                faiss.write_index(index, str(p / "index.faiss"))
        return run

    for which in ("flat", "hnsw", "ivf", "dim5", "binary", "pq"):
        m[f"faiss-swapped-{which}"] = (other_index(which), {"structure"})

    def meta(fn):
        def edit(obj, ctx, folder):
            out = fn(obj)
            return obj if out is None else out
        return json_edit(edit, "meta.json")

    m["meta-format-other"] = (meta(lambda o: o.__setitem__("format", "other")), {"structure"})
    m["meta-version-99"] = (meta(lambda o: o.__setitem__("format_version", 99)), {"structure"})
    m["meta-metric-bogus"] = (meta(lambda o: o.__setitem__("metric", "cosine-ish")), {"structure"})
    m["meta-metric-flipped"] = (meta(lambda o: o.__setitem__("metric", "l2" if o["metric"] == "l1" else "l1")), {"structure"})
    m["meta-kind-bogus"] = (meta(lambda o: o.__setitem__("kind", "tree")), {"structure"})
    m["meta-kind-flipped"] = (meta(lambda o: o.__setitem__("kind", "hnsw" if o["kind"] != "hnsw" else "flat")), {"structure"})
    m["meta-dim-wrong"] = (meta(lambda o: o.__setitem__("dim", 7)), {"structure"})
    m["meta-dim-str"] = (meta(lambda o: o.__setitem__("dim", "four")), {"structure"})
    m["meta-n-wrong"] = (meta(lambda o: o.__setitem__("n", 41)), {"structure"})
    m["meta-params-null"] = (meta(lambda o: o.__setitem__("params", None)), {"structure"})
    m["meta-params-ef-negative"] = (meta(lambda o: o["params"].__setitem__("ef_search", -5)), {"structure"})
    m["meta-has-star-id-lie"] = (meta(lambda o: o.__setitem__("has_star_id", True)), {"structure"})
    m["meta-deep-nesting"] = (lambda p, ctx: (p / "meta.json").write_text(_deep_nesting()), {"structure"})
    m["meta-list"] = (lambda p, ctx: (p / "meta.json").write_text("[1]"), {"structure"})

    def ids(fn):
        def run(p, ctx):
            with np.load(p / "ids.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            np.savez(p / "ids.npz", **fn(arrays))
        return run

    m["ids-pickled-objects"] = (ids(lambda a: {**a, "group": np.array([{"x": 1}] * 40, dtype=object)}), {"structure"})
    m["ids-group-short"] = (ids(lambda a: {**a, "group": a["group"][:-1]}), {"structure"})
    m["ids-group-2d"] = (ids(lambda a: {**a, "group": a["group"][:, None]}), {"structure"})
    m["ids-group-str"] = (ids(lambda a: {**a, "group": a["group"].astype(str)}), {"structure"})
    m["ids-group-float-nan"] = (ids(lambda a: {**a, "group": np.full(a["group"].shape, np.nan)}), {"structure"})
    m["ids-star-id-added-dup"] = (ids(lambda a: {**a, "star_id": np.array(["2M0"] * 40)}), {"star_id"})
    m["ids-empty-npz"] = (ids(lambda a: {}), {"any"})
    m["dir-is-file"] = (lambda p, ctx: (shutil.rmtree(p), p.write_text("x")), {"structure"})
    m["dir-empty"] = (lambda p, ctx: (shutil.rmtree(p), p.mkdir()), {"structure"})
    return m


INDEX = _indexes()


# ------------------------------------------------------------------ FITS spectra and catalogues
def _fits_hdu(fn):
    def run(p, ctx):
        from astropy.io import fits

        with fits.open(p, mode="update", memmap=False) as hdus:
            fn(hdus, ctx)
    return run


def _fits_rewrite(fn):
    def run(p, ctx):
        from astropy.io import fits

        with fits.open(p, memmap=False) as hdus:
            new = fn(fits.HDUList([h.copy() for h in hdus]), ctx)
            new.writeto(p, overwrite=True, output_verify="silentfix")
    return run


def _fits() -> dict:
    m = {}
    m["control"] = (lambda p, ctx: None, {"valid"})

    def data(k, fn):
        def edit(hdus, ctx):
            hdus[k].data = fn(hdus[k].data)
        return _fits_hdu(edit)

    m["flux-nan-all"] = (data(1, lambda a: np.full_like(a, np.nan)), {"flux"})
    m["flux-zero-all"] = (data(1, lambda a: np.zeros_like(a)), {"flux"})
    m["flux-inf-some"] = (data(1, lambda a: np.where(np.arange(a.shape[-1]) % 7 == 0, np.inf, a)), {"masked"})
    m["flux-negative-all"] = (data(1, lambda a: -np.abs(a)), {"flux"})
    m["error-zero-all"] = (data(2, lambda a: np.zeros_like(a)), {"flux"})
    m["error-nan-all"] = (data(2, lambda a: np.full_like(a, np.nan)), {"flux"})
    m["error-negative"] = (data(2, lambda a: -np.abs(a)), {"flux"})
    m["mask-all-bad"] = (data(3, lambda a: np.full_like(a, 1)), {"flux"})
    m["flux-1d-wrong-length"] = (data(1, lambda a: a[..., :100]), {"structure"})
    m["flux-as-string-table"] = (_fits_rewrite(lambda h, c: _replace_hdu_with_table(h, 1)), {"structure"})
    m["hdu1-removed"] = (_fits_rewrite(lambda h, c: (h.pop(1), h)[1]), {"structure"})
    m["only-primary"] = (_fits_rewrite(lambda h, c: type(h)([h[0]])), {"structure"})

    def header(k, key, value):
        def edit(hdus, ctx):
            if value is None:
                hdus[k].header.remove(key, ignore_missing=True)
            else:
                hdus[k].header[key] = value
        return _fits_hdu(edit)

    def header_nan(k, key):
        """A NaN value card, which astropy refuses to write: a number first, then its bytes patched."""
        def run(p, ctx):
            header(k, key, 1.0)(p, ctx)
            raw = bytearray(Path(p).read_bytes())
            at = raw.index(f"{key:<8}= ".encode()) + 10
            raw[at : at + 20] = b"NaN".rjust(20)
            Path(p).write_bytes(bytes(raw))
        return run

    m["crval1-nan"] = (header_nan(1, "CRVAL1"), {"structure"})
    m["crval1-str"] = (header(1, "CRVAL1", "abc"), {"structure"})
    m["cdelt1-zero"] = (header(1, "CDELT1", 0.0), {"structure"})
    m["cdelt1-huge"] = (header(1, "CDELT1", 1e10), {"structure"})
    m["crval1-missing"] = (header(1, "CRVAL1", None), {"structure"})
    m["apogee-id-missing"] = (lambda p, ctx: (header(0, "APOGEE_ID", None)(p, ctx), header(0, "OBJID", None)(p, ctx),
                                              header(0, "OBJECT", None)(p, ctx)), {"any"})
    m["vhelio-nan"] = (header_nan(0, "VHELIO"), {"any"})
    m["vrad-huge"] = (lambda p, ctx: (header(0, "VHELIO", 1e9)(p, ctx), header(0, "VRAD", 1e9)(p, ctx)), {"any"})
    m["teff-header-str"] = (lambda p, ctx: (header(0, "TEFF", "hot")(p, ctx), header(0, "RV_TEFF", "hot")(p, ctx)), {"any"})
    for name, (fn, tags) in FITS_BYTES.items():
        m[f"bytes-{name}"] = (fn, tags)
    return m


def _replace_hdu_with_table(hdus, k):
    from astropy.io import fits

    hdus[k] = fits.BinTableHDU.from_columns([fits.Column(name="FLUX", format="10A", array=np.array(["x"] * 5))])
    return hdus


FITS = _fits()


def _catalog() -> dict:
    from_table = {}

    def table(fn):
        def run(p, ctx):
            from astropy.table import Table

            t = Table.read(p)
            t = fn(t)
            t.write(p, overwrite=True)
        return run

    def col(name, values):
        def fn(t):
            t.replace_column(name, values) if name in t.colnames else t.add_column(values, name=name)
            return t
        return table(fn)

    m = from_table
    m["control"] = (lambda p, ctx: None, {"valid"})
    m["teff-str"] = (col("TEFF", np.array(["hot", "cool", "warm", "x"])), {"structure"})
    m["teff-missing"] = (table(lambda t: (t.remove_column("TEFF"), t)[1]), {"structure"})
    m["id-missing"] = (table(lambda t: (t.remove_column("APOGEE_ID"), t)[1]), {"structure"})
    m["id-int"] = (col("APOGEE_ID", np.arange(4)), {"structure"})
    m["teff-nan-all"] = (col("TEFF", np.full(4, np.nan, "f4")), {"labels_tl"})
    m["teff-sentinel"] = (col("TEFF", np.full(4, -9999.0, "f4")), {"labels_tl"})
    m["teff-inf"] = (col("TEFF", np.full(4, np.inf, "f4")), {"labels_tl"})
    m["teff-2d"] = (col("TEFF", np.ones((4, 3), "f4")), {"structure"})
    m["ids-duplicated"] = (table(lambda t: __import__("astropy.table", fromlist=["vstack"]).vstack([t, t])), {"valid"})
    m["rows-zero"] = (table(lambda t: t[:0]), {"structure"})
    m["aspcapflag-bad"] = (col("ASPCAPFLAG", np.full(4, 1 << 23, "i8")), {"any"})
    m["aspcapflag-str"] = (col("ASPCAPFLAG", np.array(["x"] * 4)), {"any"})
    for name, (fn, tags) in FITS_BYTES.items():
        m[f"bytes-{name}"] = (fn, tags)
    return m


CATALOG = _catalog()

REGISTRIES = {
    "dataset_structure": DATASET_STRUCTURE, "dataset_values": DATASET_VALUES, "dataset_bytes": HDF5_BYTES,
    "latents": LATENTS, "model": MODEL, "dataset_manifest": DATASET_MANIFEST, "latent_manifest": LATENT_MANIFEST,
    "index": INDEX, "fits": FITS, "catalog": CATALOG, "raw_bytes": RAW_BYTES,
}
