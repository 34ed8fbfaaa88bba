"""Twin search (chemtwin.search.index) and the `index` / `search` commands."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.errors import InputError
from chemtwin.search.index import TwinIndex, default_nlist, default_nprobe
from chemtwin.search.latents import open_latents, write_latents


def brute_force(z, q, metric):
    diff = q[:, None, :].astype(np.float64) - z[None, :, :].astype(np.float64)
    d = np.abs(diff).sum(-1) if metric == "l1" else np.sqrt((diff**2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, axis=1), order


def clustered(n_groups=200, size=10, dim=12, scatter=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, dim))
    z = np.repeat(centres, size, axis=0) + scatter * rng.standard_normal((n_groups * size, dim))
    return z.astype(np.float32), np.repeat(np.arange(n_groups), size)


@pytest.fixture
def latents(tmp_path):
    z, group = clustered(n_groups=60, size=5, dim=8, seed=3)
    ids = np.array([f"2M{i:08d}+{7 * i:07d}" for i in range(len(z))])
    path = write_latents(tmp_path / "LATENTS.h5", z, group=group, star_id=ids)
    return path, z, group, ids


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_exact_matches_brute_force(metric):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1500, 10)).astype(np.float32)
    q = rng.standard_normal((40, 10)).astype(np.float32)
    index = TwinIndex.build(z, metric=metric, kind="flat", batch_rows=400)  # several add() batches
    dist, rows = index.search(q, k=7)
    bd, bi = brute_force(z, q, metric)
    np.testing.assert_array_equal(rows, bi[:, :7])
    np.testing.assert_allclose(dist, bd[:, :7], rtol=1e-5, atol=1e-5)
    assert dist.dtype == np.float32 and rows.dtype == np.int64


def test_single_query_vector_and_k_larger_than_index():
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    index = TwinIndex.build(z, metric="l1")
    dist, rows = index.search(z[1], k=6)
    assert rows.shape == (1, 6)
    assert rows[0, 0] == 1 and dist[0, 0] == 0
    assert set(rows[0, :4]) == {0, 1, 2, 3}
    assert (rows[0, 4:] == -1).all() and np.isinf(dist[0, 4:]).all()


@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_from_file_streams_and_matches_array_build(latents, metric):
    path, z, group, ids = latents
    from_file = TwinIndex.from_file(path, metric=metric, chunk_rows=37)
    from_array = TwinIndex.build(z, star_ids=ids, group=group, metric=metric)
    q = z[::13] + 0.01
    for a, b in zip(from_file.search(q, 5), from_array.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(from_file.star_ids, ids)
    np.testing.assert_array_equal(from_file.group, group)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_save_load_round_trip(tmp_path, latents, kind, metric):
    path, z, group, ids = latents
    index = TwinIndex.from_file(path, metric=metric, kind=kind, nlist=8 if kind == "ivf" else None, nprobe=3 if kind == "ivf" else None)
    q = z[::7] + 0.02
    before = index.search(q, 6)
    before_ids = index.search_ids(ids[:5], 4)
    out = index.save(tmp_path / "INDEX")
    assert sorted(p.name for p in out.iterdir()) == ["ids.npz", "index.faiss", "meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".INDEX")]  # no temp folder left
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["metric"], meta["kind"], meta["n"], meta["dim"]) == (metric, kind, len(z), z.shape[1])
    loaded = TwinIndex.load(out)
    assert (loaded.metric, loaded.kind, loaded.ntotal, loaded.dim) == (metric, kind, len(z), z.shape[1])
    if kind == "ivf":
        assert (loaded.nlist, loaded.nprobe) == (8, 3)
    for a, b in zip(before, loaded.search(q, 6)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before_ids, loaded.search_ids(ids[:5], 4)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.star_ids, ids)
    np.testing.assert_array_equal(loaded.group, group)
    with np.load(out / "ids.npz", allow_pickle=False) as npz:  # no pickle needed
        assert set(npz.files) == {"star_id", "group"}


def test_save_refuses_existing_folder_and_overwrites_atomically(tmp_path):
    z, _ = clustered(20, 5, 4)
    a = TwinIndex.build(z, metric="l1")
    a.save(tmp_path / "IDX")
    with pytest.raises(InputError, match="overwrite=True"):
        a.save(tmp_path / "IDX")
    b = TwinIndex.build(z[:50], metric="l2")
    b.save(tmp_path / "IDX", overwrite=True)
    assert TwinIndex.load(tmp_path / "IDX").ntotal == 50
    assert [p.name for p in tmp_path.iterdir()] == ["IDX"]


def test_search_ids_excludes_self(latents):
    path, z, group, ids = latents
    index = TwinIndex.from_file(path, metric="l1")
    dist, rows = index.search_ids(ids[[0, 10, 99]], k=4)
    self_rows = np.array([0, 10, 99])
    assert not (rows == self_rows[:, None]).any()
    # the result equals the brute-force neighbours after dropping the star itself
    bd, bi = brute_force(z, z[self_rows], "l1")
    for r, s in enumerate(self_rows):
        expect = [i for i in bi[r] if i != s][:4]
        np.testing.assert_array_equal(rows[r], expect)
    # twins of a 5-star group are its 4 other members
    assert (group[rows] == group[self_rows][:, None]).all()
    np.testing.assert_array_equal(index.ids_of(rows[0]), ids[rows[0]])


def test_search_ids_excludes_self_among_identical_latents():
    z = np.zeros((5, 3), np.float32)  # all identical: self need not be ranked first
    z[4] = 10
    index = TwinIndex.build(z, star_ids=["a", "b", "c", "d", "e"], metric="l2")
    for name, row in (("a", 0), ("c", 2), ("d", 3)):
        _, rows = index.search_ids([name], k=3)
        assert row not in rows[0] and set(rows[0]) <= {0, 1, 2, 3}


def test_search_by_row_number_without_star_ids():
    z, _ = clustered(10, 3, 4)
    index = TwinIndex.build(z, metric="l1")
    _, rows = index.search_ids(["4"], k=2)
    assert 4 not in rows[0] and set(rows[0]) <= {3, 5}
    assert list(index.ids_of(np.array([7, -1]))) == ["7", ""]
    with pytest.raises(InputError, match="not in the index"):
        index.search_ids(["30"], k=2)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_approximate_recall_on_clustered_data(kind, metric):
    z, _ = clustered(n_groups=400, size=10, dim=16, scatter=0.25, seed=1)
    rng = np.random.default_rng(2)
    q = z[rng.choice(len(z), 200, replace=False)] + 0.05 * rng.standard_normal((200, 16)).astype(np.float32)
    _, exact = TwinIndex.build(z, metric=metric).search(q, 10)
    approx = TwinIndex.build(z, metric=metric, kind=kind)
    _, found = approx.search(q, 10)
    recall = np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(found, exact)])
    assert recall >= 0.9, (kind, metric, recall, approx)


def test_ivf_defaults():
    assert default_nlist(1_000_000) == 1000
    assert default_nlist(100) == 2 and default_nlist(10) == 1
    assert default_nprobe(1000) == 62 and default_nprobe(316) == 20 and default_nprobe(4) == 4


def test_add_appends_and_checks_consistency():
    z, group = clustered(20, 5, 6)
    index = TwinIndex(6, "l1")
    index.add(z[:50], star_ids=[f"s{i}" for i in range(50)])
    index.add(z[50:], star_ids=[f"s{i}" for i in range(50, 100)])
    assert index.ntotal == 100
    np.testing.assert_array_equal(index.rows_of(["s0", "s99", "s42"]), [0, 99, 42])
    with pytest.raises(InputError, match="star ids"):
        index.add(z[:2])
    index.add(z[:1], star_ids=["s0"])  # duplicate id: caught when the index is used
    with pytest.raises(InputError, match="more than once"):
        index.search_ids(["s1"], 2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((3, 5), 1.0, np.float32), "dimension 5"),
        (np.array([[np.nan] * 4], np.float32), "NaN"),
        (np.ones((2, 2, 4), np.float32), "2-D"),
    ],
)
def test_bad_queries(bad, message):
    index = TwinIndex.build(np.ones((10, 4), np.float32) * np.arange(10)[:, None], metric="l1")
    with pytest.raises(InputError, match=message):
        index.search(bad, 3)


def test_bad_build_inputs(tmp_path):
    z = np.ones((10, 4), np.float32)
    z[6, 2] = np.nan
    with pytest.raises(InputError, match="row 6"):
        TwinIndex.build(z)
    path = write_latents(tmp_path / "nan.h5", z)
    with pytest.raises(InputError, match="row 6"):
        TwinIndex.from_file(path, chunk_rows=4)
    with pytest.raises(InputError, match="unknown metric"):
        TwinIndex(4, metric="cosine")
    with pytest.raises(InputError, match="unknown index kind"):
        TwinIndex(4, kind="lsh")
    with pytest.raises(InputError, match="no such file"):
        TwinIndex.from_file(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="not a readable HDF5"):
        open_latents(tmp_path / "text.h5")
    with h5py.File(tmp_path / "noz.h5", "w") as f:
        f["latent"] = np.ones((3, 2))
    with pytest.raises(InputError, match="no latent array 'z'"):
        open_latents(tmp_path / "noz.h5")
    newer = write_latents(tmp_path / "newer.h5", np.ones((3, 2), np.float32))
    with h5py.File(newer, "a") as f:
        f.attrs["layout_version"] = 2
    with pytest.raises(InputError, match="layout version 2 is newer"):
        open_latents(newer)
    with h5py.File(tmp_path / "badgroup.h5", "w") as f:
        f["z"] = np.ones((3, 2), np.float32)
        f["group"] = np.ones(4, np.int64)
    with pytest.raises(InputError, match="'group' has shape"):
        open_latents(tmp_path / "badgroup.h5")
    with pytest.raises(InputError, match="occurs more than once"):
        TwinIndex.build(np.eye(3, dtype=np.float32), star_ids=["a", "b", "a"])


def test_load_missing_or_corrupt(tmp_path):
    with pytest.raises(InputError, match="no such index folder"):
        TwinIndex.load(tmp_path / "nothing")
    good = TwinIndex.build(np.eye(4, dtype=np.float32)).save(tmp_path / "good")
    import shutil

    for name, damage in [
        ("no_meta", lambda p: (p / "meta.json").unlink()),
        ("bad_meta", lambda p: (p / "meta.json").write_text("{not json")),
        ("bad_faiss", lambda p: (p / "index.faiss").write_bytes(b"garbage" * 20)),
        ("bad_ids", lambda p: (p / "ids.npz").write_bytes(b"PK\x03\x04broken")),
        ("wrong_n", lambda p: (p / "meta.json").write_text((p / "meta.json").read_text().replace('"n": 4', '"n": 5'))),
    ]:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        with pytest.raises(InputError):
            TwinIndex.load(folder)


def test_load_checks_checksums_and_reads_version_1(tmp_path):
    import shutil

    z = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    good = TwinIndex.build(z, star_ids=[f"s{i}" for i in range(50)]).save(tmp_path / "good")
    meta = json.loads((good / "meta.json").read_text())
    assert meta["format_version"] == 2 and set(meta["sha256"]) == {"index.faiss", "ids.npz"}
    # one flipped bit in a stored vector: FAISS still reads the file, but the neighbours would change
    flipped = shutil.copytree(good, tmp_path / "flipped")
    data = bytearray((flipped / "index.faiss").read_bytes())
    data[-20] ^= 0x10
    (flipped / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 differs"):
        TwinIndex.load(flipped)
    no_params = shutil.copytree(good, tmp_path / "no_params")
    (no_params / "meta.json").write_text(json.dumps({**meta, "params": None}))
    with pytest.raises(InputError, match="corrupt index metadata"):
        TwinIndex.load(no_params)
    # a version-1 folder (written before checksums) is read as before; a version-2 one must have them
    old = shutil.copytree(good, tmp_path / "old")
    (old / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, "format_version": 1}.items() if k != "sha256"}))
    np.testing.assert_array_equal(TwinIndex.load(old).search(z[:3], k=1)[1][:, 0], [0, 1, 2])
    unsigned = shutil.copytree(good, tmp_path / "unsigned")
    (unsigned / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "sha256"}))
    with pytest.raises(InputError, match="corrupt index metadata"):
        TwinIndex.load(unsigned)


# ------------------------------------------------------------------------ CLI
def test_cli_index_and_search(tmp_path, latents, capsys):
    path, z, group, ids = latents
    out = tmp_path / "INDEX"
    assert main(["index", str(path), "--out", str(out), "--metric", "l1"]) == 0
    assert "indexed 300 stars" in capsys.readouterr().out
    assert main(["search", str(out), "--star", ids[3], "--star", ids[50], "-k", "4", "--json", str(tmp_path / "n.json")]) == 0
    text = capsys.readouterr().out
    assert ids[3] in text and "distance" in text and "*" in text
    result = json.loads((tmp_path / "n.json").read_text())
    assert [q["query"] for q in result["queries"]] == [ids[3], ids[50]]
    first = result["queries"][0]
    assert len(first["neighbours"]) == 4 and all(n["star_id"] != ids[3] for n in first["neighbours"])
    assert all(n["group"] == group[3] for n in first["neighbours"])
    # a query file: its own star is found at distance ~0
    qpath = write_latents(tmp_path / "q.h5", z[:2] + 1e-4)
    assert main(["search", str(out), "--query", str(qpath), "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "row 0" in text and ids[0] in text
    # hnsw and ivf indexes through the CLI
    for kind in ("hnsw", "ivf"):
        assert main(["index", str(path), "--out", str(tmp_path / kind), "--kind", kind, "--metric", "l2", "--nlist", "6"]) == 0
        assert main(["search", str(tmp_path / kind), "--star", ids[0], ids[1], "-k", "2"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "{idx}", "--star", "NOT-A-STAR"], "not in the index"),
        (["search", "{idx}", "--query", "{q5}"], "dimension 5"),
        (["search", "{tmp}/missing", "--star", "x"], "no such index folder"),
        (["search", "{tmp}/corrupt", "--star", "x"], "corrupt"),
        (["index", "{nan}", "--out", "{tmp}/x"], "NaN"),
        (["index", "{lat}", "--out", "{idx}"], "exists"),
        (["index", "{tmp}/none.h5", "--out", "{tmp}/y"], "no such file"),
        (["search", "{idx}", "--star", "x", "--nprobe", "3"], "ivf indexes only"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, latents, capsys, argv, message):
    path, z, group, ids = latents
    idx = tmp_path / "IDX"
    TwinIndex.from_file(path).save(idx)
    q5 = write_latents(tmp_path / "q5.h5", np.ones((2, 5), np.float32))
    bad = z.copy()
    bad[4, 1] = np.nan
    nan = write_latents(tmp_path / "nan.h5", bad)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("index.faiss", "meta.json", "ids.npz"):
        (corrupt / name).write_text("x")
    fill = {"idx": str(idx), "q5": str(q5), "tmp": str(tmp_path), "nan": str(nan), "lat": str(path)}
    capsys.readouterr()
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"chemtwin {argv[0]}: error:") and message in err[0]


def test_latent_file_reader(latents):
    path, z, group, ids = latents
    with open_latents(path) as lf:
        assert (lf.n_stars, lf.dim) == z.shape
        np.testing.assert_array_equal(lf.read(5, 9), z[5:9])
        np.testing.assert_array_equal(lf.star_id(0, 3), ids[:3])
        chunks = list(lf.iter_chunks(64))
        assert [a for a, _ in chunks] == [0, 64, 128, 192, 256]
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), z)
        sample = lf.sample(50, seed=1, chunk_rows=64)
        assert sample.shape == (50, z.shape[1])
        assert all((np.abs(z - s).sum(axis=1) == 0).any() for s in sample)


def test_an_index_that_cannot_fit_in_memory_is_refused_before_work(tmp_path, capsys):
    # 10^11 declared rows of fill value: a tiny file whose hnsw graph would need 8 TB.
    path = write_latents(tmp_path / "z.h5", np.zeros((4, 4), np.float32))
    with h5py.File(path, "r+") as f:
        del f["z"]
        f.create_dataset("z", shape=(10**11, 4), dtype="f4", chunks=(65536, 4), fillvalue=0.5)
    index = TwinIndex(4, "l1", "hnsw", M=8)
    assert index.memory_bytes(10**11) == 10**11 * (4 * 4 + 8 * 8)
    assert main(["index", str(path), "--out", str(tmp_path / "idx"), "--kind", "hnsw", "--M", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the hnsw index of 100000000000 stars needs about 8,000 GB of memory" in err[0]
    assert not (tmp_path / "idx").exists()
