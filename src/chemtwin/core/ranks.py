"""Exact doppelganger ranks, computed in chunks (never an N x N matrix in memory).

Definition (docs/science.md section 3): the rank of star ``i`` with respect to its twin
``j`` is the number of OTHER stars ``k`` whose tag is at distance ``d(z_i, z_k) <=
d(z_i, z_j)`` (ties count as closer).  "Other" excludes ``i`` and ``j``.

Groups larger than two (clusters).  We rank every ordered pair ``(i, j)`` of group-mates
separately: ``rank(i, j)`` counts the stars OUTSIDE the group of ``i`` that are at least
as close to ``i`` as ``j`` is (the other members are twins too, not doppelgangers, so
they are never counted).  A group of size ``g`` thus gives ``g * (g - 1)`` ranks; for
pairs this is exactly the paper's one rank per star.  Fractions are taken over these
pairs, so a star in a big cluster is not favoured by having more chances.  The
"closest group-mate" variant (rank of ``i`` = min over its mates, as the training loop's
validation metric uses) is :meth:`RankResult.nearest`; for pairs the two agree.

Stars whose group is ``-1`` (unknown) or who are alone in their group are never
queries, but they are candidates: they count as doppelgangers when they are closer.

Metrics: ``l1`` (default, as in the paper), ``l2`` and ``cosine``.  Cosine distance is
ranked as the Euclidean distance between unit-normalized tags (``|u - v|^2 = 2 - 2 cos``,
a monotone map, so ranks are identical and near-duplicates keep full precision).

Ties and arithmetic.  For tags of up to ``ELEMENTWISE_MAX_DIM`` dimensions the distance
of every (query, candidate) pair is accumulated dimension by dimension with the same
sequence of elementwise float operations (``acc = |a0-b0|; acc += |a1-b1|; ...``, no fused
multiply-add), both for the twin distance and for all other stars.  The result for a
pair is therefore bitwise independent of where the pair sits in a tile, and a star that
is mathematically as far as the twin is counted exactly when its computed distance is
equal: e.g. integer-valued tags give exact ties.  Higher-dimensional tags (raw spectra)
use ``torch.cdist`` (``p=1``, or ``p=2`` without the matrix-product shortcut) for both,
one kernel per pair.  Squared L2 is compared instead of L2 (monotone).

Cost is ``O(N_query * N * d)`` time and ``O(N * d + query_chunk * tile)`` memory.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from chemtwin.errors import InputError

log = logging.getLogger(__name__)

METRICS = ("l1", "l2", "cosine")
ELEMENTWISE_MAX_DIM = 64
DEFAULT_QUERY_CHUNK = 128
DEFAULT_TILE = 8192
# cap on query_stars * group_size * mates (index arrays) in one work item
_MEMBER_BUDGET = 1 << 22


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


# ---------------------------------------------------------------------- groups
def twin_pairs(group) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs ``(i, j)``, ``i != j``, of stars sharing a group id ``>= 0``.

    Stars with group ``-1`` (unknown) and stars alone in their group give no pair.  The
    pairs are sorted by ``i`` then ``j``.  A group of size ``g`` gives ``g (g - 1)`` pairs.
    """
    group = np.asarray(group)
    if group.ndim != 1:
        raise InputError(f"group must be 1-D, got shape {group.shape}")
    group = group.astype(np.int64, copy=False)
    idx = np.flatnonzero(group >= 0)
    if idx.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = idx[np.argsort(group[idx], kind="stable")]
    g_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    qs, ts = [], []
    for size in np.unique(sizes[sizes >= 2]):
        members = order[starts[sizes == size][:, None] + np.arange(size)]  # (n_groups, size)
        q = np.repeat(members, size, axis=1)  # each member paired with each member
        t = np.tile(members, (1, size))
        keep = q != t
        qs.append(q[keep])
        ts.append(t[keep])
    if not qs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q, t = np.concatenate(qs), np.concatenate(ts)
    o = np.lexsort((t, q))
    return q[o], t[o]


def require_twins(group, source) -> None:
    """InputError naming ``source`` unless some group has two members (ranks need a twin)."""
    if not (group_sizes(group) >= 2).any():
        raise InputError(f"{source}: no twin groups (every star has group -1 or is alone in its group)")


def group_sizes(group) -> np.ndarray:
    """Size of each star's group (0 for group -1)."""
    group = np.asarray(group, dtype=np.int64)
    out = np.zeros(group.shape, np.int64)
    known = group >= 0
    if known.any():
        _, inverse, counts = np.unique(group[known], return_inverse=True, return_counts=True)
        out[known] = counts[inverse]
    return out


# ---------------------------------------------------------------------- result
@dataclass
class RankResult:
    """Doppelganger ranks of every ordered twin pair ``(query[k], twin[k])``."""

    query: np.ndarray  # (P,) int64 star index i
    twin: np.ndarray  # (P,) int64 star index j
    rank: np.ndarray  # (P,) int64
    n_stars: int  # N: stars that were candidates
    metric: str

    def __len__(self) -> int:
        return int(self.rank.size)

    def nearest(self) -> tuple[np.ndarray, np.ndarray]:
        """``(stars, rank)``: each query star's rank against its closest group-mate (the
        minimum of its pair ranks)."""
        if self.rank.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        order = np.argsort(self.query, kind="stable")
        q, r = self.query[order], self.rank[order]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        return q[starts], np.minimum.reduceat(r, starts)


# ---------------------------------------------------------------------- distances
def _as_tensor(z, metric: str) -> torch.Tensor:
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[1] < 1:
        raise InputError(f"tags must be a 2-D array (stars, dims), got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.number):
        raise InputError(f"tags must be numeric, got {z.dtype}")
    dtype = np.float64 if z.dtype == np.float64 else np.float32
    z = np.ascontiguousarray(z, dtype=dtype)
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise InputError(f"tag row {int(np.flatnonzero(bad)[0])} holds NaN or inf")
    t = torch.from_numpy(z)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
        if (norm == 0).any():
            raise InputError(f"tag row {int(torch.nonzero(norm[:, 0] == 0)[0])} is zero: cosine distance undefined")
        t = t / norm
    return t


def _pair_dist(a: torch.Tensor, b: torch.Tensor, p: int, elementwise: bool) -> torch.Tensor:
    """Distance between rows ``a[k]`` and ``b[k]`` (same shape ``(..., d)``), computed with
    exactly the arithmetic of :func:`_tile_dist`."""
    if not elementwise:
        shape = a.shape[:-1]
        a2, b2 = a.reshape(-1, 1, a.shape[-1]), b.reshape(-1, 1, b.shape[-1])
        if a2.shape[0] == 0:
            return torch.zeros(shape, dtype=a.dtype, device=a.device)
        out = torch.cdist(a2, b2, p=float(p), compute_mode="donot_use_mm_for_euclid_dist")
        return out.reshape(shape)
    acc = a[..., 0] - b[..., 0]
    acc = acc.abs_() if p == 1 else acc.mul_(acc)
    for k in range(1, a.shape[-1]):
        tmp = a[..., k] - b[..., k]
        tmp = tmp.abs_() if p == 1 else tmp.mul_(tmp)
        acc.add_(tmp)
    return acc


def _tile_dist(q: torch.Tensor, xt: torch.Tensor, x: torch.Tensor, p: int, elementwise: bool,
               out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Distances (B, T) between queries ``q`` (B, d) and candidates (``xt`` = x.T, (d, T))."""
    if not elementwise:
        return torch.cdist(q, x, p=float(p), compute_mode="donot_use_mm_for_euclid_dist")
    torch.sub(q[:, 0:1], xt[0:1], out=out)
    out.abs_() if p == 1 else out.mul_(out)
    for k in range(1, q.shape[1]):
        torch.sub(q[:, k : k + 1], xt[k : k + 1], out=tmp)
        tmp.abs_() if p == 1 else tmp.mul_(tmp)
        out.add_(tmp)
    return out


# ---------------------------------------------------------------------- ranks
def doppelganger_ranks(
    z,
    group,
    metric: str = "l1",
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    tile: int = DEFAULT_TILE,
    max_queries: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> RankResult:
    """Exact doppelganger rank of every ordered twin pair (see the module docstring).

    ``z``: tags (N, d), NumPy; float64 input is ranked in float64, anything else in
    float32.  ``group``: (N,) int, ``-1`` = unknown.  ``max_queries``: rank only a random
    subset (``seed``) of that many query stars, each against all N stars (for slow,
    high-dimensional tags); ``None`` = all.  ``threads``: CPU worker threads, each running
    single-threaded torch ops on its own query chunks (default ``torch.get_num_threads()``;
    torch's global thread count is set to 1 meanwhile and restored afterwards).
    ``device``: a torch device for the tags and the tiles (e.g. ``"cuda"``).

    Raises InputError for an unknown metric, mismatched lengths, non-finite tags (or a
    zero tag with ``cosine``) and when no group has two members.
    """
    check_metric(metric)
    group = np.asarray(group)
    n = len(group)
    if np.ndim(z) != 2 or np.shape(z)[0] != n:
        raise InputError(f"tags have shape {np.shape(z)} but there are {n} group entries")
    if query_chunk < 1 or tile < 1:
        raise InputError("query_chunk and tile must be positive")
    x = _as_tensor(z, metric).to(device)
    p = 1 if metric == "l1" else 2
    dim = x.shape[1]
    elementwise = dim <= ELEMENTWISE_MAX_DIM
    xt = x.t().contiguous() if elementwise else x

    # queries, bucketed by group size so that every chunk has the same number of mates
    group = group.astype(np.int64)
    known = np.flatnonzero(group >= 0)
    order = known[np.lexsort((known, group[known]))]
    g_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]]) if order.size else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, order.size])
    if not (sizes >= 2).any():
        raise InputError("no twin groups: every star has group -1 or is alone in its group")
    buckets = []  # (size, members matrix (n_groups, size))
    for size in np.unique(sizes[sizes >= 2]):
        buckets.append((int(size), order[starts[sizes == size][:, None] + np.arange(size)]))
    if max_queries is not None:
        total = sum(m.size for _, m in buckets)
        if max_queries < total:
            rng = np.random.default_rng(seed)
            keep_flat = np.zeros(total, bool)
            keep_flat[rng.choice(total, size=max(int(max_queries), 1), replace=False)] = True
            chosen, off = [], 0
            for size, members in buckets:
                chosen.append(keep_flat[off : off + members.size].reshape(members.shape))
                off += members.size
        else:
            chosen = [np.ones(m.shape, bool) for _, m in buckets]
    else:
        chosen = [np.ones(m.shape, bool) for _, m in buckets]

    # work items: chunks of query stars of one group size
    items = []
    for (size, members), pick in zip(buckets, chosen):
        rows, pos = np.nonzero(pick)  # (group row, position) of every chosen query star
        n_mates = size - 1
        b_max = max(1, min(query_chunk, _MEMBER_BUDGET // (size * n_mates)))
        for a in range(0, rows.size, b_max):
            r, s = rows[a : a + b_max], pos[a : a + b_max]
            mem = members[r]  # (B, g): the star's whole group, itself included
            mates = mem[np.arange(size)[None, :] != s[:, None]].reshape(len(r), n_mates)
            items.append((members[r, s], mates, mem))
    n_query = int(sum(len(it[0]) for it in items))
    workers = max(1, int(threads if threads is not None else torch.get_num_threads()))
    if torch.device(device).type != "cpu":
        workers = 1
    chunk_tile = max(1, min(tile, n))
    local = threading.local()

    def run(item):
        star, mates, mem = item
        size, n_mates = mem.shape[1], mates.shape[1]
        st = torch.from_numpy(star).to(device)
        q = x[st]  # (B, d)
        thr = _pair_dist(q[:, None, :].expand(-1, n_mates, -1), x[torch.from_numpy(mates).to(device)],
                         p, elementwise)  # (B, g-1): twin distances
        dm = _pair_dist(q[:, None, :].expand(-1, size, -1), x[torch.from_numpy(mem).to(device)],
                        p, elementwise)  # (B, g): distances to every member, the star itself included
        # members at distance <= each threshold (the star and that twin always are)
        inside = torch.searchsorted(torch.sort(dm, dim=1).values, thr.contiguous(), right=True)
        count = torch.zeros(thr.shape, dtype=torch.int64, device=device)
        bsz = q.shape[0]
        if elementwise:
            buf = getattr(local, "buf", None)
            if buf is None or buf[0].shape[0] < bsz:
                buf = local.buf = (torch.empty((bsz, chunk_tile), dtype=x.dtype, device=device),
                                   torch.empty((bsz, chunk_tile), dtype=x.dtype, device=device))
        for c in range(0, n, chunk_tile):
            w = min(chunk_tile, n - c)
            if elementwise:
                d = _tile_dist(q, xt[:, c : c + w], None, p, True, buf[0][:bsz, :w], buf[1][:bsz, :w])
            else:
                d = _tile_dist(q, None, x[c : c + w], p, False, None, None)
            if n_mates == 1:
                count[:, 0] += (d <= thr).sum(1)
            elif n_mates <= 8:
                for m in range(n_mates):
                    count[:, m] += (d <= thr[:, m : m + 1]).sum(1)
            else:
                count += torch.searchsorted(torch.sort(d, dim=1).values, thr.contiguous(), right=True)
        rank = (count - inside).cpu().numpy()
        return np.repeat(star, n_mates), mates.reshape(-1), rank.reshape(-1)

    bar = tqdm(total=n_query, desc=f"ranks ({metric})", unit="star", disable=not progress or n_query < 2000,
               mininterval=1.0)
    out_q, out_t, out_r = [], [], []
    saved_threads = torch.get_num_threads()
    try:
        if workers > 1:
            # one torch thread per worker: independent workers, no intra-op barriers (which
            # stall badly when the machine is busy)
            torch.set_num_threads(1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for item, (qq, tt, rr) in zip(items, pool.map(run, items)):
                    out_q.append(qq), out_t.append(tt), out_r.append(rr)
                    bar.update(len(item[0]))
        else:
            for item in items:
                qq, tt, rr = run(item)
                out_q.append(qq), out_t.append(tt), out_r.append(rr)
                bar.update(len(item[0]))
    finally:
        torch.set_num_threads(saved_threads)
        bar.close()
    q_all, t_all, r_all = np.concatenate(out_q), np.concatenate(out_t), np.concatenate(out_r)
    o = np.lexsort((t_all, q_all))
    result = RankResult(q_all[o].astype(np.int64), t_all[o].astype(np.int64), r_all[o].astype(np.int64), n, metric)
    if (result.rank < 0).any():  # cannot happen: the star and its twin are always inside
        raise RuntimeError("negative doppelganger rank: inconsistent distance arithmetic")
    return result
