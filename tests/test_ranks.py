"""Doppelganger ranks against a brute-force NumPy implementation, and the rank fractions."""

import numpy as np
import pytest

from chemtwin.core.ranks import doppelganger_ranks, group_sizes, twin_pairs
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import rank_cdf, rank_fractions, rank_summary


def brute_ranks(z, group, metric):
    """rank(i, j) = #{k outside i's group : d(i, k) <= d(i, j)}, in float64 NumPy."""
    z = np.asarray(z, dtype=np.float64)
    if metric == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    q, t = twin_pairs(group)
    ranks = []
    for i, j in zip(q, t):
        diff = z - z[i]
        d = np.abs(diff).sum(1) if metric == "l1" else (diff**2).sum(1)
        ranks.append(int(((d <= d[j]) & (group != group[i])).sum()))
    return q, t, np.array(ranks, dtype=np.int64)


def mixed_groups(rng, n_pairs, n_triples, n_unknown, n_single=0):
    group = np.concatenate([
        np.repeat(np.arange(n_pairs), 2),
        np.repeat(np.arange(n_pairs, n_pairs + n_triples), 3),
        np.arange(n_pairs + n_triples, n_pairs + n_triples + n_single),
        -np.ones(n_unknown, np.int64),
    ])
    return rng.permutation(group)


def test_twin_pairs_and_sizes():
    group = np.array([5, -1, 5, 7, 7, 7, 9, -1])
    q, t = twin_pairs(group)
    assert list(zip(q, t)) == [(0, 2), (2, 0), (3, 4), (3, 5), (4, 3), (4, 5), (5, 3), (5, 4)]
    assert group_sizes(group).tolist() == [2, 0, 2, 3, 3, 3, 1, 0]
    q, t = twin_pairs(np.array([-1, -1, 3]))
    assert q.size == 0 and t.size == 0


@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_integer_latents_with_ties_match_brute_force(metric, threads):
    rng = np.random.default_rng(1)
    group = mixed_groups(rng, n_pairs=70, n_triples=30, n_unknown=50, n_single=10)
    # few distinct values in 4 dims: many exact ties between distances
    z = rng.integers(-2, 3, size=(len(group), 4)).astype(np.float32)
    res = doppelganger_ranks(z, group, metric, query_chunk=7, tile=33, threads=threads, progress=False)
    q, t, expected = brute_ranks(z, group, metric)
    np.testing.assert_array_equal(res.query, q)
    np.testing.assert_array_equal(res.twin, t)
    np.testing.assert_array_equal(res.rank, expected)
    assert res.n_stars == len(group)
    assert len(res) == 70 * 2 + 30 * 6


def test_cosine_with_duplicates_and_scaled_copies():
    rng = np.random.default_rng(2)
    group = mixed_groups(rng, n_pairs=60, n_triples=20, n_unknown=40)
    z = rng.integers(-1000, 1001, size=(len(group), 5)).astype(np.float64)
    # exact cosine ties: copies of other stars, scaled by powers of two (same direction)
    src = rng.choice(len(group), 60, replace=False)
    dst = rng.choice(len(group), 60, replace=False)
    z[dst] = z[src] * (2.0 ** rng.integers(-2, 3, 60))[:, None]
    res = doppelganger_ranks(z, group, "cosine", query_chunk=16, tile=50, progress=False)
    q, t, expected = brute_ranks(z, group, "cosine")
    np.testing.assert_array_equal(res.rank, expected)
    # the scale of a tag does not matter for cosine
    res2 = doppelganger_ranks(z * 3.0, group, "cosine", progress=False)
    np.testing.assert_array_equal(res2.rank, res.rank)


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_float_latents_all_metrics(metric):
    rng = np.random.default_rng(3)
    group = mixed_groups(rng, n_pairs=80, n_triples=20, n_unknown=30)
    z = rng.normal(size=(len(group), 8))
    res = doppelganger_ranks(z, group, metric, query_chunk=32, tile=64, progress=False)
    _, _, expected = brute_ranks(z, group, metric)
    np.testing.assert_array_equal(res.rank, expected)


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_high_dimensional_tags_use_the_same_definition(metric):
    rng = np.random.default_rng(4)
    group = mixed_groups(rng, n_pairs=40, n_triples=10, n_unknown=20)
    z = rng.integers(0, 3, size=(len(group), 100)).astype(np.float32)  # > 64 dims: the cdist path
    res = doppelganger_ranks(z, group, metric, query_chunk=9, tile=40, progress=False)
    _, _, expected = brute_ranks(z, group, metric)
    np.testing.assert_array_equal(res.rank, expected)


def test_big_groups_and_nearest_mate():
    rng = np.random.default_rng(5)
    group = rng.permutation(np.concatenate([np.repeat(np.arange(6), 12), np.repeat([6, 7], 2), -np.ones(40, int)]))
    z = rng.integers(-3, 4, size=(len(group), 3)).astype(np.float32)
    res = doppelganger_ranks(z, group, "l1", query_chunk=5, tile=17, progress=False)
    q, t, expected = brute_ranks(z, group, "l1")
    np.testing.assert_array_equal(res.rank, expected)
    stars, nearest = res.nearest()
    for s, r in zip(stars, nearest):
        assert r == expected[q == s].min()


def test_ties_count_as_closer_and_twin_and_self_are_excluded():
    # star 0 and its twin 1 at L1 distance 2; star 2 exactly as far, star 3 farther,
    # star 4 (unknown group) a duplicate of star 0
    z = np.array([[0, 0], [1, 1], [2, 0], [3, 0], [0, 0]], dtype=np.float32)
    group = np.array([0, 0, 1, 1, -1])
    res = doppelganger_ranks(z, group, "l1", progress=False)
    ranks = dict(zip(zip(res.query.tolist(), res.twin.tolist()), res.rank.tolist()))
    assert ranks[(0, 1)] == 2  # star 2 (tie) and star 4 (duplicate of 0)
    assert ranks[(1, 0)] == 2  # star 4 (a copy of its twin) and star 2, both at distance 2
    assert ranks[(2, 3)] == 0 and ranks[(3, 2)] == 0


def test_max_queries_gives_a_subset_of_the_full_ranks():
    rng = np.random.default_rng(6)
    group = mixed_groups(rng, n_pairs=100, n_triples=0, n_unknown=0)
    z = rng.normal(size=(len(group), 6)).astype(np.float32)
    full = doppelganger_ranks(z, group, "l1", progress=False)
    part = doppelganger_ranks(z, group, "l1", max_queries=37, seed=3, progress=False)
    assert len(part) == 37 and np.unique(part.query).size == 37
    lookup = dict(zip(zip(full.query.tolist(), full.twin.tolist()), full.rank.tolist()))
    assert all(lookup[(a, b)] == r for a, b, r in zip(part.query.tolist(), part.twin.tolist(), part.rank.tolist()))


def test_bad_input():
    z = np.zeros((4, 2), np.float32)
    with pytest.raises(InputError, match="unknown metric"):
        doppelganger_ranks(z, [0, 0, 1, 1], "l3", progress=False)
    with pytest.raises(InputError, match="no twin groups"):
        doppelganger_ranks(z, [-1, 0, 1, 2], "l1", progress=False)
    with pytest.raises(InputError, match="group entries"):
        doppelganger_ranks(z, [0, 0, 1], "l1", progress=False)
    bad = z.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="row 2"):
        doppelganger_ranks(bad, [0, 0, 1, 1], "l1", progress=False)
    with pytest.raises(InputError, match="zero"):
        doppelganger_ranks(z, [0, 0, 1, 1], "cosine", progress=False)


def test_fraction_definitions_on_a_hand_built_example():
    n = 25_000  # thresholds: rank < 25 and rank < 250
    ranks = np.array([0, 0, 1, 24, 25, 249, 250, 1000])
    f = rank_fractions(ranks, n)
    assert f["frac_rank0"] == 2 / 8
    assert f["frac_rank_lt_0p1pct"] == 4 / 8  # 0, 0, 1, 24
    assert f["frac_rank_lt_1pct"] == 6 / 8  # ... 25, 249
    assert f["median_rank"] == 24.5
    r, frac = rank_cdf(ranks, [0, 24, 25, 999, 1000])
    assert frac.tolist() == [2 / 8, 4 / 8, 5 / 8, 7 / 8, 1.0]
    r, frac = rank_cdf(ranks)
    assert r.tolist() == [0, 1, 24, 25, 249, 250, 1000] and frac[-1] == 1.0
    with pytest.raises(InputError):
        rank_fractions([], n)


def test_rank_summary_of_pairs_and_clusters():
    # 3 pairs and one triple on a line; N = 9 (two unknown stars far away)
    z = np.array([[0.0], [0.1], [10.0], [10.1], [20.0], [20.5], [30.0], [30.2], [30.3]] + [[100.0]] * 0)
    group = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3])
    res = doppelganger_ranks(z, group, "l1", progress=False)
    s = rank_summary(res, group)
    assert s["n_stars"] == 9 and s["n_pairs"] == 6 + 6 and s["n_query_stars"] == 9
    assert s["frac_rank0"] == 1.0 and s["median_rank"] == 0.0
    assert s["nearest_mate"]["frac_rank0"] == 1.0
    assert s["rank_cdf"]["rank"][0] == 0 and s["rank_cdf"]["fraction"][0] == 1.0
