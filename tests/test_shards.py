"""Sharded datasets and latents: one folder + manifest.json read like one file; validation;
resuming an unfinished sharded run (in-process: the Dask path is in test_distributed.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from fake_twins import LABEL_NAMES, fake_twins

import chemtwin.data.generate as gen
from chemtwin.cli import main
from chemtwin.core.files import file_sha256
from chemtwin.data.dataset import open_dataset
from chemtwin.data.dataset_writer import DatasetWriter
from chemtwin.data.generate import generate_dataset, generate_sharded
from chemtwin.data.shard_folder import MANIFEST, grid_hash, write_manifest
from chemtwin.data.shards import run_shards
from chemtwin.errors import InputError
from chemtwin.search.index import TwinIndex
from chemtwin.search.latents import open_latents, write_latents

SMALL = dict(n_groups=30, group_size=2, snr=100.0, seed=5, chunk_stars=16, progress=False)  # 4 chunks of 16 stars


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same 60 generated spectra as one file and as 4 shards of 16, 16, 16, 12 rows."""
    root = tmp_path_factory.mktemp("shards")
    generate_dataset(root / "one.h5", **SMALL)
    generate_sharded(root / "sharded", shard_stars=16, **SMALL)
    return root / "one.h5", root / "sharded"


def _same(a, b):
    for field in ("flux", "ivar", "labels", "group"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_sharded_dataset_reads_like_the_single_file(pair):
    one, sharded = pair
    manifest = json.loads((sharded / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 12] and manifest["n_rows"] == 60
    with open_dataset(one) as a, open_dataset(sharded) as b:
        assert (len(b), b.n_pixels, b.label_names) == (len(a), a.n_pixels, a.label_names)
        assert b.attrs["seed"] == 5 and b.attrs["generator"] == "chemtwin.lines" and b.star_id is None
        np.testing.assert_array_equal(a.wavelength, b.wavelength)
        _same(a.read(), b.read())
        _same(a.read(10, 45), b.read(10, 45))  # across three shards
        rows = np.random.default_rng(0).permutation(60)[:25]
        _same(a.take(rows), b.take(rows))  # returned in the order asked
        for x, y in zip(a.iter_batches(7), b.iter_batches(7)):
            assert x.start == y.start
            _same(x, y)
        np.testing.assert_array_equal(a.labels(["TEFF", "FE_H"]), b.labels(["TEFF", "FE_H"]))
        np.testing.assert_array_equal(a.group, b.group)
        part = b.rows(14, 40)  # a row range is a dataset of its own
        _same(part.read(), a.read(14, 40))
        np.testing.assert_array_equal(part.group, a.group[14:40])
        with pytest.raises(InputError, match="outside"):
            b.take([3, 60])
    assert main(["info", str(sharded)]) == 0


def test_manifest_problems_are_one_line_naming_the_shard(pair, tmp_path, capsys):
    _, sharded = pair
    missing = shutil.copytree(sharded, tmp_path / "missing")
    (missing / "shard-00002.h5").unlink()
    corrupt = shutil.copytree(sharded, tmp_path / "corrupt")
    with open(corrupt / "shard-00001.h5", "r+b") as fh:  # same size, other bytes
        fh.seek(50_000)
        fh.write(b"\x00\x01\x02\x03")
    unfinished = shutil.copytree(sharded, tmp_path / "unfinished")
    (unfinished / MANIFEST).unlink()
    # shards of two pixel grids under one manifest (e.g. assembled by hand)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(sharded / "shard-00000.h5", mixed / "a.h5")
    generate_dataset(mixed / "b.h5", n_groups=2, grid="apstar", progress=False)
    manifest = json.loads((sharded / MANIFEST).read_text())
    manifest["shards"] = [{"path": p, "rows": open_dataset(mixed / p).n_stars, "bytes": (mixed / p).stat().st_size,
                           "sha256": file_sha256(mixed / p)} for p in ("a.h5", "b.h5")]
    write_manifest(mixed, manifest)
    cases = [(missing, "shard shard-00002.h5 (listed in manifest.json) is missing"),
             (corrupt, "shard shard-00001.h5 does not match its checksum"),
             (unfinished, "without manifest.json"),
             (mixed, "shard b.h5 has another pixel grid")]
    for folder, message in cases:
        capsys.readouterr()
        assert main(["-q", "info", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    # every reader: opening checks that the shards exist, reading checks each shard's grid
    assert main(["-q", "train", str(missing), "--out", str(tmp_path / "m")]) == 2
    assert "shard-00002.h5" in capsys.readouterr().err
    with open_dataset(mixed) as ds, pytest.raises(InputError, match="b.h5 has another pixel grid"):
        ds.read()


def test_unfinished_run_keeps_verified_shards_and_rerun_completes(pair, tmp_path, monkeypatch):
    one, _ = pair
    out = tmp_path / "run"
    real = gen.Plan.chunk

    def crash_on_chunk_2(self, synth, chunk, threads):
        if chunk == 2:
            raise RuntimeError("simulated worker crash")
        return real(self, synth, chunk, threads)

    monkeypatch.setattr(gen.Plan, "chunk", crash_on_chunk_2)
    with pytest.raises(InputError, match=r"shard 2 \(shard-00002.h5\) failed: RuntimeError: simulated worker crash; "
                                         r"2 of 4 shards are finished"):
        generate_sharded(out, shard_stars=16, **SMALL)
    monkeypatch.setattr(gen.Plan, "chunk", real)
    assert not (out / MANIFEST).exists() and sorted(p.name for p in out.glob("*.h5")) == ["shard-00000.h5", "shard-00001.h5"]
    with pytest.raises(InputError, match="unfinished sharded run"):
        open_dataset(out)
    with pytest.raises(InputError, match="unfinished run with other settings"):
        generate_sharded(out, shard_stars=16, **{**SMALL, "seed": 6})
    with open(out / "shard-00001.h5", "r+b") as fh:  # damaged after it was recorded: written again
        fh.seek(40_000)
        fh.write(b"\xff\xfe")
    (out / ".shard-00003.h5.tmp-99999").write_bytes(b"half")  # what a killed worker leaves
    inode = {p.name: p.stat().st_ino for p in out.glob("*.h5")}
    generate_sharded(out, shard_stars=16, **SMALL)
    assert (out / "shard-00000.h5").stat().st_ino == inode["shard-00000.h5"]  # verified and kept
    assert (out / "shard-00001.h5").stat().st_ino != inode["shard-00001.h5"]  # checksum mismatch: rewritten
    assert sorted(os.listdir(out)) == [MANIFEST] + [f"shard-0000{k}.h5" for k in range(4)]
    with open_dataset(one) as a, open_dataset(out) as b:
        _same(a.read(), b.read())
        b.validate()
    with pytest.raises(InputError, match="exists; pass overwrite=True"):
        generate_sharded(out, shard_stars=16, **SMALL)


def _write_fake_part(spec: dict, path: str) -> dict:
    """A task of run_shards: rows [a, b) of the fake twins as one dataset shard."""
    a, b = spec["rows"]
    flux, ivar, labels, group = fake_twins(40, 200, seed=1)
    with DatasetWriter(path, 15000 + np.arange(200.0), list(LABEL_NAMES), attrs={"generator": "fake_twins"},
                       overwrite=True) as w:
        w.append(flux[a:b], ivar[a:b], labels[a:b], group[a:b])
    return {"rows": b - a}


def test_train_embed_evaluate_cannon_read_a_sharded_dataset(tmp_path, capsys):
    data = tmp_path / "fake"
    wavelength = 15000 + np.arange(200.0)
    manifest, records = run_shards(data, "dataset", {"test": 1}, [{"rows": (0, 30)}, {"rows": (30, 80)}], _write_fake_part,
                                   header={"pixel_grid": grid_hash(wavelength), "n_pixels": 200}, progress=False)
    assert manifest["n_rows"] == 80 and [r["rows"] for r in records] == [30, 50]
    model = tmp_path / "model"
    assert main(["-q", "train", str(data), "--out", str(model), "--epochs", "1", "--latent-dim", "4"]) == 0
    assert main(["-q", "embed", str(model), str(data), "--out", str(tmp_path / "z.h5")]) == 0
    assert main(["-q", "evaluate", str(model), str(data), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n_stars"] == 80
    assert main(["-q", "cannon", "train", str(data), "--labels", "TEFF", "LOGG", "FE_H", "--out", str(tmp_path / "c.npz")]) == 0


def test_sharded_latents_index_search_and_evaluate_like_one_file(tmp_path, capsys):
    rng = np.random.default_rng(2)
    z = np.repeat(rng.standard_normal((150, 6)), 2, axis=0).astype(np.float32) + 0.01 * rng.standard_normal((300, 6)).astype(np.float32)
    group, ids = np.repeat(np.arange(150), 2), np.array([f"star{i}" for i in range(300)])
    single = write_latents(tmp_path / "z.h5", z, group=group, star_id=ids, row=np.arange(300))
    folder = tmp_path / "zs"
    folder.mkdir()
    shards = []
    for k, (a, b) in enumerate([(0, 100), (100, 130), (130, 300)]):
        path = write_latents(folder / f"part{k}.h5", z[a:b], group=group[a:b], star_id=ids[a:b], row=np.arange(a, b))
        shards.append({"path": path.name, "rows": b - a, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    write_manifest(folder, {"format": "chemtwin-shards", "kind": "latents", "dim": 6, "shards": shards})
    with open_latents(folder) as lf:
        assert (len(lf), lf.dim, lf.has_star_id) == (300, 6, True)
        np.testing.assert_array_equal(lf.read(90, 140), z[90:140])
        np.testing.assert_array_equal(lf.star_id(95, 135), ids[95:135])
        np.testing.assert_array_equal(lf.group, group)
        np.testing.assert_array_equal(lf.rows, np.arange(300))
    for kind in ("flat", "ivf"):
        a = TwinIndex.from_file(single, kind=kind, chunk_rows=64)
        b = TwinIndex.from_file(folder, kind=kind, chunk_rows=64)  # streamed shard by shard, 64 rows at a time
        np.testing.assert_array_equal(a.search_ids(ids[:50], k=3)[1], b.search_ids(ids[:50], k=3)[1])
        np.testing.assert_array_equal(a.group, b.group)
    assert main(["-q", "index", str(folder), "--out", str(tmp_path / "idx")]) == 0
    assert main(["-q", "info", str(folder)]) == 0
    assert "300 x 6, 3 shards, checksums verified" in capsys.readouterr().out
    for name, lat in (("a", single), ("b", folder)):
        assert main(["-q", "evaluate", "--latents", str(lat), "--json", str(tmp_path / f"{name}.json")]) == 0
    ra, rb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert ra["frac_rank0"] == rb["frac_rank0"] and ra["n_stars"] == rb["n_stars"] == 300
