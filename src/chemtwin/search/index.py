"""FAISS-backed twin search over chemical latents.

Index kinds (see docs/search.md):

* ``flat``  exact brute force (``faiss.IndexFlat`` with ``METRIC_L1`` or ``IndexFlatL2``).
  Memory N*d*4 bytes; 1,000 queries against 10^6 20-d latents take seconds on 2 cores.
  The default, and the right choice up to a few million stars.
* ``hnsw``  approximate graph search (``faiss.IndexHNSWFlat``): ``M`` links per node
  (memory ~ N*(d*4 + M*8) bytes), ``ef_construction`` (build quality), ``ef_search``
  (search breadth; raised to at least k).  Slow to build, fast to query.
* ``ivf``   approximate inverted file (``faiss.IndexIVFFlat``): k-means into ``nlist``
  cells trained on a sample, ``nprobe`` cells visited per query.  Fast to build.

Distances are in the latent's own units: L1 = sum |dz|, L2 = Euclidean (FAISS reports
squared L2; we take the square root so the numbers read as distances).  Rows that FAISS
could not fill (k larger than the index, or an approximate search that visited too few
points) have index -1 and distance inf.

Latents are searched as they are (no standardization): the twin metric of the method is
L1 on the raw latent (docs/science.md section 2).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from chemtwin.core.memory import check_memory
from chemtwin.errors import InputError
from chemtwin.search import index_folder
from chemtwin.search.index_folder import METRICS
from chemtwin.search.latents import DEFAULT_CHUNK_ROWS, check_finite, open_latents

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivf")

# Approximate-index defaults (docs/search.md explains the trade-offs).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_TRAIN_PER_LIST = 64   # k-means training points per cell (FAISS wants >= 39)
IVF_MIN_PER_LIST = 39


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` stars: about sqrt(n), with at least 39 training points per cell."""
    return int(max(1, min(round(math.sqrt(max(n, 1))), n // IVF_MIN_PER_LIST)))


def default_nprobe(nlist: int) -> int:
    """Cells visited per query: nlist/16, at least 16 (at most nlist)."""
    return int(min(nlist, max(16, round(nlist / 16))))


def _as_queries(queries, dim: int, what: str = "queries") -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise InputError(f"{what} must be 2-D (n, {dim}), got shape {q.shape}")
    if q.shape[1] != dim:
        raise InputError(f"{what} have dimension {q.shape[1]}, the index has {dim}")
    if not np.issubdtype(q.dtype, np.number):
        raise InputError(f"{what} are not numeric ({q.dtype})")
    q = np.ascontiguousarray(q, dtype=np.float32)
    check_finite(q, what)
    return q


class TwinIndex:
    """Nearest-neighbour search over latents, with optional star ids and twin groups.

    >>> idx = TwinIndex.build(z, star_ids=ids, metric="l1")     # exact
    >>> dist, rows = idx.search(z_query, k=10)
    >>> dist, rows = idx.search_ids(["2M17335483-2753043"], k=10)  # self excluded
    >>> idx.save("INDEX"); idx = TwinIndex.load("INDEX")

    Without star ids, stars are named by their row number ("0", "1", ...).
    """

    def __init__(
        self,
        dim: int,
        metric: str = "l1",
        kind: str = "flat",
        *,
        M: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        nlist: int | None = None,
        nprobe: int | None = None,
        _faiss_index=None,
    ):
        if metric not in METRICS:
            raise InputError(f"unknown metric '{metric}' (choose from {', '.join(METRICS)})")
        if kind not in KINDS:
            raise InputError(f"unknown index kind '{kind}' (choose from {', '.join(KINDS)})")
        if int(dim) < 1:
            raise InputError(f"latent dimension must be >= 1, got {dim}")
        for name, value in (("M", M), ("ef_construction", ef_construction), ("ef_search", ef_search), ("nlist", nlist), ("nprobe", nprobe)):
            if value is not None and int(value) < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        self.dim = int(dim)
        self.metric = metric
        self.kind = kind
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.ef_search = int(ef_search)
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe = None if nprobe is None else int(nprobe)
        self._star_id: np.ndarray | None = None   # str array (N,) or None (row numbers)
        self._id_parts: list[np.ndarray] = []
        self._group: np.ndarray | None = None
        self._group_parts: list[np.ndarray] = []
        self._has_ids: bool | None = None          # decided by the first add
        self._has_group: bool | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, rows)
        self.source: str | None = None
        self._dirty = False                        # rows added since the last _finish()
        self._index = _faiss_index if _faiss_index is not None else self._make_index()

    # ------------------------------------------------------------------ building
    def _make_index(self):
        m = METRICS[self.metric]
        if self.kind == "flat":
            return faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlat(self.dim, m)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.M, m)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        return None  # ivf: created in train(), once nlist is known

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def train(self, sample: np.ndarray, n_total: int | None = None, seed: int = 0) -> None:
        """Train the IVF quantizer on ``sample`` (no-op for flat and HNSW).

        ``n_total`` (the number of stars that will be added) sets the default nlist;
        it defaults to the sample size.
        """
        if self.kind != "ivf" or self.is_trained:
            return
        sample = _as_queries(sample, self.dim, "training latents")
        n_total = len(sample) if n_total is None else int(n_total)
        if self.nlist is None:
            self.nlist = default_nlist(n_total)
        if len(sample) < self.nlist:
            raise InputError(f"IVF index with nlist={self.nlist} needs at least {self.nlist} training latents, got {len(sample)}")
        if self.nprobe is None:
            self.nprobe = default_nprobe(self.nlist)
        m = METRICS[self.metric]
        quantizer = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlat(self.dim, m)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, m)
        index.cp.seed = int(seed)
        index.cp.min_points_per_centroid = 1  # no warning when sample < 39 * nlist
        t0 = time.perf_counter()
        try:
            index.train(sample)
        except RuntimeError as exc:  # e.g. a FAISS too old for IVF with L1 (added in FAISS 1.12)
            raise InputError(f"FAISS {getattr(faiss, '__version__', '?')} cannot train an IVF index with "
                             f"metric {self.metric}: {str(exc).splitlines()[-1][:120]}") from None
        log.debug("trained IVF (nlist=%d) on %d latents in %.1f s", self.nlist, len(sample), time.perf_counter() - t0)
        self._index = index

    def add(self, z, star_ids=None, group=None) -> None:
        """Append latents (n, d) with optional star ids (n,) and twin groups (n,).

        The first call decides whether the index keeps star ids / groups; later calls
        must agree.  An untrained IVF index is trained on the first batch.
        """
        z = _as_queries(z, self.dim, "latents")
        n = len(z)
        has_ids, has_group = star_ids is not None, group is not None
        if self._has_ids is None:
            self._has_ids, self._has_group = has_ids, has_group
            if self.ntotal:
                raise InputError("internal: index has rows but no id bookkeeping")
        if has_ids != self._has_ids:
            raise InputError("this index " + ("keeps" if self._has_ids else "has no") + " star ids: give them for every batch or for none")
        if has_group != self._has_group:
            raise InputError("this index " + ("keeps" if self._has_group else "has no") + " twin groups: give them for every batch or for none")
        if has_ids:
            star_ids = np.asarray(star_ids).astype(str)
            if star_ids.shape != (n,):
                raise InputError(f"star ids have shape {star_ids.shape}, expected ({n},)")
        if has_group:
            group = np.asarray(group)
            if group.shape != (n,) or not np.issubdtype(group.dtype, np.integer):
                raise InputError(f"groups must be integers of shape ({n},), got {group.dtype} {group.shape}")
        if self.kind == "ivf" and not self.is_trained:
            self.train(z)
        if n == 0:
            return
        self._index.add(z)
        if has_ids:
            self._id_parts.append(star_ids)
        if has_group:
            self._group_parts.append(group.astype(np.int64))
        self._lookup = None
        self._dirty = True

    def _finish(self) -> None:
        """Consolidate ids/groups added in parts; check ids are unique (once per add)."""
        if not self._dirty:
            return
        if self._id_parts:
            parts = ([self._star_id] if self._star_id is not None else []) + self._id_parts
            self._star_id = np.concatenate(parts)
            self._id_parts = []
        if self._group_parts:
            parts = ([self._group] if self._group is not None else []) + self._group_parts
            self._group = np.concatenate(parts)
            self._group_parts = []
        if self._star_id is not None and self._lookup is None:
            order = np.argsort(self._star_id, kind="stable")
            sorted_ids = self._star_id[order]
            dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if dup.size:
                raise InputError(f"star id '{sorted_ids[dup[0]]}' occurs more than once; star ids must be unique")
            self._lookup = (sorted_ids, order)
        if self.kind == "ivf" and self.is_trained and self.ntotal:
            # Direct map: lets search_ids read stored vectors back (kept by write_index).
            ivf = faiss.extract_index_ivf(self._index)
            if ivf.direct_map.no():
                ivf.make_direct_map()
        self._dirty = False

    @classmethod
    def build(cls, z, star_ids=None, group=None, metric: str = "l1", kind: str = "flat",
              batch_rows: int = DEFAULT_CHUNK_ROWS, seed: int = 0, **params) -> "TwinIndex":
        """Index an in-memory array of latents (n, d)."""
        z = np.asarray(z)
        if z.ndim != 2:
            raise InputError(f"latents must be 2-D (stars, dims), got shape {z.shape}")
        index = cls(z.shape[1], metric, kind, **params)
        check_memory(index.memory_bytes(len(z)), f"the {kind} index of {len(z)} stars")
        if kind == "ivf":
            nlist = index.nlist or default_nlist(len(z))
            rng = np.random.default_rng(seed)
            take = min(len(z), max(nlist * IVF_TRAIN_PER_LIST, nlist))
            rows = np.sort(rng.choice(len(z), size=take, replace=False)) if take < len(z) else slice(None)
            index.train(z[rows], n_total=len(z), seed=seed)
        for a in range(0, max(len(z), 1), batch_rows):
            sl = slice(a, a + batch_rows)
            index.add(z[sl], None if star_ids is None else np.asarray(star_ids)[sl], None if group is None else np.asarray(group)[sl])
        index._finish()
        return index

    @classmethod
    def from_file(cls, path, metric: str = "l1", kind: str = "flat", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                  seed: int = 0, progress: bool = False, key: str = "z", **params) -> "TwinIndex":
        """Index a latent file, reading it ``chunk_rows`` stars at a time.

        Only the index itself (N*d*4 bytes for flat) and one chunk are in memory,
        plus the IVF training sample (64*nlist rows) for ``kind='ivf'``.
        """
        with open_latents(path, key=key) as lf:
            if lf.n_stars == 0:
                raise InputError(f"{path}: holds no latents")
            index = cls(lf.dim, metric, kind, **params)
            check_memory(index.memory_bytes(lf.n_stars), f"{path}: the {kind} index of {lf.n_stars} stars")
            index.source = str(Path(path).resolve())
            if kind == "ivf":
                nlist = index.nlist or default_nlist(lf.n_stars)
                index.train(lf.sample(max(nlist * IVF_TRAIN_PER_LIST, nlist), seed=seed, chunk_rows=chunk_rows),
                            n_total=lf.n_stars, seed=seed)
            group = lf.group
            chunks = lf.iter_chunks(chunk_rows)
            n_chunks = math.ceil(lf.n_stars / chunk_rows)
            if progress and n_chunks > 2:
                chunks = tqdm(chunks, total=n_chunks, desc="indexing", unit="chunk", leave=False)
            for a, z in chunks:
                index.add(z, lf.star_id(a, a + len(z)), None if group is None else group[a : a + len(z)])
        index._finish()
        return index

    def memory_bytes(self, n_stars: int) -> int:
        """What this index holds for ``n_stars`` latents: the vectors (float32), plus the graph's ``M``
        links a node at its base level (both ways, int32) for hnsw, or an int64 id a vector for ivf."""
        per_star = 4 * self.dim + {"hnsw": 8 * self.M, "ivf": 8}.get(self.kind, 0)
        return n_stars * per_star

    # ----------------------------------------------------------------- queries
    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def star_ids(self) -> np.ndarray:
        """Star id of every row (row numbers as strings when the index keeps none)."""
        self._finish()
        if self._star_id is not None:
            return self._star_id
        return np.arange(self.ntotal).astype(str)

    @property
    def group(self) -> np.ndarray | None:
        self._finish()
        return self._group

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """Star ids of index rows (``''`` where a row is -1)."""
        rows = np.asarray(rows, dtype=np.int64)
        self._finish()
        if self._star_id is None:
            return np.where(rows >= 0, rows.astype(str), "").astype(str)
        if not len(self._star_id):
            return np.full(rows.shape, "", dtype=str)
        return np.where(rows >= 0, self._star_id[np.clip(rows, 0, len(self._star_id) - 1)], "").astype(str)

    def rows_of(self, star_ids) -> np.ndarray:
        """Index rows of star ids; InputError naming the first id not in the index."""
        self._finish()
        wanted = np.atleast_1d(np.asarray(star_ids)).astype(str)
        if self._star_id is None:
            rows = np.empty(len(wanted), dtype=np.int64)
            for i, s in enumerate(wanted):
                if not s.isdigit() or int(s) >= self.ntotal:
                    raise InputError(f"star '{s}' is not in the index (it keeps no star ids: name stars by row 0..{self.ntotal - 1})")
                rows[i] = int(s)
            return rows
        sorted_ids, order = self._lookup
        pos = np.searchsorted(sorted_ids, wanted)
        pos_c = np.clip(pos, 0, len(sorted_ids) - 1)
        missing = np.flatnonzero((pos >= len(sorted_ids)) | (sorted_ids[pos_c] != wanted))
        if missing.size:
            raise InputError(f"star '{wanted[missing[0]]}' is not in the index")
        return order[pos_c].astype(np.int64)

    def reconstruct(self, rows) -> np.ndarray:
        """Stored latents of index rows (n, d)."""
        self._finish()
        rows = np.ascontiguousarray(np.atleast_1d(rows), dtype=np.int64)
        return self._index.reconstruct_batch(rows)

    def _prepare_search(self, k: int) -> None:
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        elif self.kind == "ivf":
            faiss.extract_index_ivf(self._index).nprobe = int(self.nprobe or 1)

    def search(self, queries, k: int = 10, batch_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest stored latents of each query.

        Returns ``(distances, rows)``, both (n_queries, k), nearest first; distances
        float32 in the metric's units, rows int64 (-1 and inf where no neighbour).
        """
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}")
        k = int(k)
        q = _as_queries(queries, self.dim)
        self._finish()
        if self.ntotal == 0:
            raise InputError("the index is empty")
        self._prepare_search(k)
        dist = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        for a in range(0, len(q), batch_rows):
            d, i = self._index.search(q[a : a + batch_rows], k)
            dist[a : a + len(d)], rows[a : a + len(d)] = d, i
        if self.metric == "l2":
            np.sqrt(np.maximum(dist, 0.0, out=dist), out=dist)
        dist[rows < 0] = np.inf
        return dist, rows

    def search_ids(self, star_ids, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest other stars of stars already in the index (self excluded).

        The star's own row is dropped from its neighbour list (even when it is not
        ranked first because another star has an identical latent).
        """
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}")
        k = int(k)
        rows = self.rows_of(star_ids)
        dist, nbr = self.search(self.reconstruct(rows), k + 1)
        keep = nbr != rows[:, None]
        # Rows where self was not found: drop the last (the k+1-th) instead.
        no_self = keep.all(axis=1)
        keep[no_self, -1] = False
        out_d = dist[keep].reshape(len(rows), k)
        out_i = nbr[keep].reshape(len(rows), k)
        return out_d, out_i

    # --------------------------------------------------------------- save/load
    def meta(self) -> dict:
        """What ``meta.json`` records of this index (chemtwin.search.index_folder)."""
        return index_folder.meta(self)

    def save(self, folder, overwrite: bool = False) -> Path:
        """Write ``folder/`` = index.faiss + meta.json + ids.npz, atomically (an existing folder
        needs ``overwrite=True``); chemtwin.search.index_folder."""
        return index_folder.save(self, folder, overwrite)

    @classmethod
    def load(cls, folder) -> "TwinIndex":
        """Read an index folder written by :meth:`save`; InputError if missing or corrupt."""
        return index_folder.load(cls, folder)

    def __repr__(self) -> str:
        extra = ""
        if self.kind == "hnsw":
            extra = f", M={self.M}, ef_search={self.ef_search}"
        elif self.kind == "ivf":
            extra = f", nlist={self.nlist}, nprobe={self.nprobe}"
        return f"TwinIndex(n={self.ntotal}, dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}{extra})"
