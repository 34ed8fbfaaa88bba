"""Blind clustering (chemtwin.search.cluster), `chemtwin cluster` and benchmarks/cluster_recovery.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.search.cluster import (
    _drop_small,
    auto_eps,
    cluster_latents,
    knee_threshold,
    project_2d,
    scale_latents,
)
from chemtwin.search.cluster_metrics import clustering_metrics
from chemtwin.search.latents import write_latents

ROOT = Path(__file__).resolve().parents[1]


def groups_in_space(n_groups=40, size=10, dim=8, scatter=0.05, n_field=0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, (n_groups, dim))
    z = np.repeat(centres, size, axis=0) + scatter * rng.standard_normal((n_groups * size, dim))
    group = np.repeat(np.arange(n_groups), size)
    if n_field:
        z = np.vstack([z, rng.uniform(-10, 10, (n_field, dim))])
        group = np.concatenate([group, -np.ones(n_field, np.int64)])
    return z.astype(np.float32), group


# Hand-built example (worked out in docs/search.md):
#   groups  G0 = stars 0-3, G1 = stars 4-7, G2 = stars 8-9, field stars 10-11
#   found   C0 = {0,1,2} (all G0); C1 = {3,4,5,6} (1 G0 + 3 G1); C2 = {8,9,10} (2 G2 + 1 field);
#           stars 7 and 11 are noise
GROUP = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1])
FOUND = np.array([0, 0, 0, 1, 1, 1, 1, -1, 2, 2, 2, -1])


def test_metrics_hand_built_example():
    m = clustering_metrics(FOUND, GROUP)
    assert m["n_clusters"] == 3 and m["n_groups"] == 3 and m["n_stars"] == 12
    assert m["noise_fraction"] == pytest.approx(2 / 12)
    # purity: C0 3/3, C1 3/4, C2 2/3 -> member-weighted (3+3+2)/(3+4+3), plain mean
    assert m["purity"] == pytest.approx(0.8)
    assert m["mean_cluster_purity"] == pytest.approx((1 + 0.75 + 2 / 3) / 3)
    # completeness: G0 max(3/4, 1/4), G1 3/4, G2 2/2
    assert m["completeness"] == pytest.approx((0.75 + 0.75 + 1.0) / 3)
    assert m["n_recovered"] == 3 and m["recovered_fraction"] == pytest.approx(1.0)
    # stricter purity drops G2 (C2 is 2/3 pure) but not G1 (3/4); 2/3 itself still counts
    assert clustering_metrics(FOUND, GROUP, min_purity=0.7)["n_recovered"] == 2
    assert clustering_metrics(FOUND, GROUP, min_purity=2 / 3)["n_recovered"] == 3
    # stricter completeness keeps only G2 (G0 and G1 have 3/4 in one cluster)
    assert clustering_metrics(FOUND, GROUP, min_completeness=0.8)["recovered_fraction"] == pytest.approx(1 / 3)
    # groups of 2 are not scored with min_group_size=3
    assert clustering_metrics(FOUND, GROUP, min_group_size=3)["n_groups"] == 2


def test_metrics_extremes():
    group = np.repeat(np.arange(5), 4)
    perfect = clustering_metrics(group.copy(), group)
    assert perfect["purity"] == perfect["completeness"] == perfect["recovered_fraction"] == perfect["ari"] == 1.0
    all_noise = clustering_metrics(np.full(20, -1), group)
    assert all_noise["n_clusters"] == 0 and all_noise["recovered_fraction"] == 0.0 and all_noise["completeness"] == 0.0
    assert np.isnan(all_noise["purity"])
    one_blob = clustering_metrics(np.zeros(20, int), group)
    assert one_blob["purity"] == pytest.approx(0.2) and one_blob["completeness"] == 1.0
    assert one_blob["recovered_fraction"] == 0.0  # complete but not pure
    # field stars only: nothing to score
    no_groups = clustering_metrics(np.zeros(4, int), np.full(4, -1))
    assert no_groups["n_groups"] == 0 and np.isnan(no_groups["recovered_fraction"])
    with pytest.raises(InputError):
        clustering_metrics(np.zeros(3, int), np.zeros(4, int))


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_hdbscan_recovers_separated_groups(metric):
    z, group = groups_in_space(n_groups=40, size=10, n_field=30, seed=1)
    res = cluster_latents(z, "hdbscan", min_cluster_size=5, metric=metric)
    m = clustering_metrics(res.labels, group)
    assert m["recovered_fraction"] >= 0.95 and m["purity"] >= 0.95, m
    assert res.labels.shape == (len(z),) and res.probabilities.shape == (len(z),)
    assert 35 <= res.n_clusters <= 45


def test_dbscan_explicit_and_auto_eps():
    z, group = groups_in_space(n_groups=30, size=10, seed=2)
    res = cluster_latents(z, "dbscan", eps=1.0, min_cluster_size=5, metric="l1")
    assert clustering_metrics(res.labels, group)["recovered_fraction"] == 1.0
    assert res.params["eps"] == 1.0
    auto = cluster_latents(z, "dbscan", eps="auto", min_cluster_size=5)
    assert clustering_metrics(auto.labels, group)["recovered_fraction"] >= 0.95
    assert 0 < auto.params["eps"] < 5
    assert auto_eps(z, 5) == pytest.approx(auto.params["eps"])
    # with field stars the knee sits between the groups' scale and the field's
    zf, gf = groups_in_space(n_groups=30, size=10, seed=2, scatter=0.3, n_field=200)
    eps = auto_eps(zf, 5)
    assert 0.5 * auto_eps(zf[gf >= 0], 5) < eps < auto_eps(zf, 5, quantile=0.9)
    res_f = cluster_latents(zf, "dbscan", eps=eps, min_cluster_size=5)
    assert clustering_metrics(res_f.labels, gf)["recovered_fraction"] >= 0.95
    with pytest.raises(InputError, match="needs eps"):
        cluster_latents(z, "dbscan")
    with pytest.raises(InputError, match="positive"):
        cluster_latents(z, "dbscan", eps=-1.0)


def test_ward_finds_groups_at_a_cut_it_chooses_without_twins():
    z, group = groups_in_space(n_groups=40, size=10, n_field=30, seed=1)
    res = cluster_latents(z)  # the defaults: Ward, threshold "auto"
    assert res.params["method"] == "ward" and res.params["metric"] == "l2"
    m = clustering_metrics(res.labels, group)
    assert m["recovered_fraction"] >= 0.95 and m["purity"] >= 0.95, m
    # The cut lies above the groups' own scale (two members 0.05 * sqrt(2 * 8) apart) and below
    # the distance between the closest two group centres.
    centres = np.stack([z[group == g].mean(axis=0) for g in range(40)])
    closest = min(np.linalg.norm(centres[i] - centres[j]) for i in range(40) for j in range(i))
    assert 0.05 * np.sqrt(16) < res.params["threshold"] < closest
    # a latent in other units gives the same clusters: the cut moves with the scale
    wide = cluster_latents(1000 * z)
    np.testing.assert_array_equal(wide.labels, res.labels)
    assert wide.params["threshold"] == pytest.approx(1000 * res.params["threshold"], rel=1e-4)
    # an explicit cut: 0 leaves every star alone (noise); beyond every merge, one cluster
    assert (cluster_latents(z, threshold=0.0).labels == -1).all()
    assert set(cluster_latents(z, threshold=1e6).labels) == {0}
    with pytest.raises(InputError, match="l2"):
        cluster_latents(z, "ward", metric="l1")


def test_ward_on_a_neighbour_graph_matches_the_full_tree(monkeypatch):
    import chemtwin.search.cluster as cluster

    z, group = groups_in_space(n_groups=30, size=10, n_field=20, seed=5)
    full = cluster_latents(z)
    monkeypatch.setattr(cluster, "WARD_DENSE_MAX", 100)  # as for a survey of millions
    graph = cluster._knn_graph(z, cluster.WARD_NEIGHBOURS)
    assert graph.shape == (len(z), len(z)) and graph.nnz == len(z) * cluster.WARD_NEIGHBOURS
    assert graph.diagonal().sum() == 0
    sparse = cluster_latents(z)
    assert clustering_metrics(sparse.labels, full.labels)["ari"] == pytest.approx(1.0)


def test_ward_builds_its_tree_once_and_cuts_it_as_scikit_learn_does(monkeypatch):
    import sklearn.cluster._agglomerative as agglomerative
    from sklearn.cluster import AgglomerativeClustering

    builds = []
    build = agglomerative._TREE_BUILDERS["ward"]

    def counted(*args, **kwargs):
        builds.append(1)
        return build(*args, **kwargs)

    monkeypatch.setitem(agglomerative._TREE_BUILDERS, "ward", counted)
    z, group = groups_in_space(n_groups=10, size=5, scatter=1.5, n_field=20, seed=6)  # groups that touch
    auto = cluster_latents(z, min_cluster_size=2)  # the heights and the cut from one tree
    assert len(builds) == 1
    for t in (0.5 * auto.params["threshold"], auto.params["threshold"], 3.0 * auto.params["threshold"]):
        ours = cluster_latents(z, threshold=t, min_cluster_size=2).labels
        theirs = AgglomerativeClustering(n_clusters=None, distance_threshold=t).fit(z).labels_
        ids, counts = np.unique(theirs, return_counts=True)
        theirs = np.where(counts[np.searchsorted(ids, theirs)] >= 2, theirs, -1)  # singletons are noise in ours
        assert clustering_metrics(ours, theirs)["ari"] == pytest.approx(1.0)
        assert (ours < 0).sum() == (theirs < 0).sum()


def test_knee_threshold_splits_noise_sized_from_population_sized_merges():
    rng = np.random.default_rng(0)
    noise = np.exp(rng.normal(0.0, 0.2, 900))  # merges of one chemistry: about 1
    spread = np.exp(rng.normal(np.log(30), 0.3, 100))  # merges across chemistries: about 30
    t = knee_threshold(np.concatenate([spread, noise]))
    assert noise.max() * 0.8 <= t < spread.min()
    assert knee_threshold(np.array([0.0, 0.0])) == 0.0
    assert knee_threshold(np.full(5, 2.0)) == 2.0


def test_scale_and_helpers():
    z = np.column_stack([np.arange(10.0), 100 * np.arange(10.0), np.ones(10)])
    s = scale_latents(z, "standard")
    np.testing.assert_allclose(s.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(s.std(axis=0), [1, 1, 0], atol=1e-12)
    np.testing.assert_array_equal(scale_latents(z, "none"), z)
    with pytest.raises(InputError):
        scale_latents(z, "minmax")
    np.testing.assert_array_equal(_drop_small(np.array([0, 0, 1, 2, 2, 2, -1, 1]), 2), [0, 0, 1, 2, 2, 2, -1, 1])
    np.testing.assert_array_equal(_drop_small(np.array([0, 0, 1, 2, 2, 2, -1]), 2), [0, 0, -1, 1, 1, 1, -1])
    xy, explained = project_2d(np.random.default_rng(0).standard_normal((50, 4)) * [5, 1, 0.1, 0.1])
    assert xy.shape == (50, 2) and explained[0] > explained[1] > 0


def test_cluster_bad_inputs():
    z, _ = groups_in_space(5, 5)
    bad = z.copy()
    bad[7, 0] = np.nan
    with pytest.raises(InputError, match="row 7"):
        cluster_latents(bad)
    with pytest.raises(InputError, match="unknown clustering method"):
        cluster_latents(z, "kmeans")
    with pytest.raises(InputError, match="min_cluster_size"):
        cluster_latents(z, min_cluster_size=1)


def test_cli_cluster_writes_labels_metrics_and_plot(tmp_path, capsys):
    z, group = groups_in_space(n_groups=20, size=8, n_field=10, seed=3)
    ids = np.array([f"star{i}" for i in range(len(z))])
    lat = write_latents(tmp_path / "LATENTS.h5", z, group=group, star_id=ids)
    out, png, js = tmp_path / "CLUSTERS.h5", tmp_path / "clusters.png", tmp_path / "c.json"
    assert main(["cluster", str(lat), "--out", str(out), "--plot", str(png), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "recovered" in text and "purity" in text
    with h5py.File(out, "r") as f:
        labels = f["cluster"][:]
        assert labels.shape == (len(z),) and f["probability"].shape == (len(z),)
        np.testing.assert_array_equal(f["star_id"].asstr()[:], ids)
        np.testing.assert_array_equal(f["group"][:], group)
        metrics = json.loads(f.attrs["metrics"])
        assert f.attrs["method"] == "ward"
    assert metrics == pytest.approx(clustering_metrics(labels, group))
    assert metrics["recovered_fraction"] >= 0.95
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(js.read_text())["metrics"]["n_groups"] == 20
    # hdbscan and dbscan through the CLI, and without groups in the file
    assert main(["cluster", str(lat), "--out", str(tmp_path / "h.h5"), "--method", "hdbscan", "--metric", "l1"]) == 0
    with h5py.File(tmp_path / "h.h5", "r") as f:
        assert clustering_metrics(f["cluster"][:], group)["recovered_fraction"] >= 0.95
    nogroup = write_latents(tmp_path / "nogroup.h5", z)
    assert main(["cluster", str(nogroup), "--out", str(tmp_path / "d.h5"), "--method", "dbscan", "--eps", "auto"]) == 0
    assert "no twin groups" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cluster", "{nan}", "--out", "{tmp}/a.h5"], "NaN"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--method", "dbscan"], "needs --eps"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--method", "dbscan", "--eps", "wide"], "--eps"),
        (["cluster", "{lat}", "--out", "{lat}"], "exists"),
        (["cluster", "{tmp}/missing.h5", "--out", "{tmp}/a.h5"], "no such file"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--min-cluster-size", "1"], "min_cluster_size"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--threshold", "-1"], "--threshold"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--threshold", "nan"], "--threshold"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--method", "hdbscan", "--threshold", "3"], "ward only"),
        (["cluster", "{lat}", "--out", "{tmp}/a.h5", "--metric", "l1"], "l2"),
    ],
)
def test_cli_cluster_bad_input(tmp_path, capsys, argv, message):
    z, group = groups_in_space(5, 5)
    lat = write_latents(tmp_path / "lat.h5", z, group=group)
    bad = z.copy()
    bad[3] = np.inf
    nan = write_latents(tmp_path / "nan.h5", bad)
    fill = {"nan": str(nan), "lat": str(lat), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chemtwin cluster: error:") and message in err[0]
    assert not (tmp_path / "a.h5").exists()


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cluster_recovery_benchmark_on_synthetic_latents(tmp_path, capsys):
    bench = _load_benchmark("cluster_recovery")
    specs = bench.make_synthetic(tmp_path, n_groups=40, group_size=10, dim=10, n_field=20,
                                 scatters=(("tight", 0.05), ("loose", 0.6)), seed=4)
    # a second array in one of the files, picked with #KEY
    with h5py.File(tmp_path / "tight.h5", "a") as f:
        f["z_copy"] = f["z"][:]
    specs.append(f"tight_copy={tmp_path / 'tight.h5'}#z_copy")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = bench.main(specs + ["--method", "hdbscan", "--min-cluster-size", "5", "--selection", "eom", "leaf",
                             "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    by_name = {s["name"]: s for s in result["spaces"]}
    assert set(by_name) == {"tight", "loose", "tight_copy"}
    tight, loose = by_name["tight"], by_name["loose"]
    assert tight["n_groups"] == 40 and len(tight["runs"]) == 2
    assert tight["default"]["recovered_fraction"] >= 0.95
    assert tight["default"]["recovered_fraction"] > loose["default"]["recovered_fraction"]
    assert tight["best"]["recovered_fraction"] >= tight["default"]["recovered_fraction"]
    assert by_name["tight_copy"]["default"]["recovered_fraction"] == tight["default"]["recovered_fraction"]
    table = out_md.read_text()
    assert "| tight |" in table and "recovered (p>=0.5)" in table
    # the default, Ward: its default row is chemtwin cluster's twin-free cut; the grid scales it
    assert bench.main(specs[:1] + ["--min-cluster-size", "5", "--json", str(out_json)]) == 0
    ward = json.loads(out_json.read_text())["spaces"][0]
    assert [r["setting"]["threshold_factor"] for r in ward["runs"]] == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert ward["metric"] == "l2" and ward["default"]["setting"]["threshold_factor"] == 1.0
    with h5py.File(tmp_path / "tight.h5", "r") as f:
        z_tight, g_tight = f["z"][:], f["group"][:]
    auto = cluster_latents(z_tight, min_cluster_size=5)
    assert ward["default"]["setting"]["threshold"] == pytest.approx(auto.params["threshold"])
    assert ward["default"]["recovered_fraction"] == pytest.approx(
        clustering_metrics(auto.labels, g_tight)["recovered_fraction"])
    # dbscan variant and bad input
    assert bench.main([specs[0], "--method", "dbscan", "--min-cluster-size", "5", "--eps-factor", "1"]) == 0
    nogroup = write_latents(tmp_path / "nogroup.h5", np.ones((5, 3), np.float32))
    capsys.readouterr()
    assert bench.main([f"x={nogroup}"]) == 2
    assert "no 'group'" in capsys.readouterr().err
    assert bench.main(["no-equals-sign"]) == 2
