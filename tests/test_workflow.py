"""The real-data recipe of docs/workflow.md, end to end: allStar + a DR17-layout mirror -> ingest
(quality cuts, one row per APOGEE_ID) -> train -> embed -> evaluate with an open-cluster
membership table -> index / search / cluster.

The mirror is a synthetic stand-in written as the survey places its files: apStar files made
from the embedded synthesizer (three "open clusters" of four stars sharing chemistry, field
stars with their own), plus the two real DR17 apStar fixtures of ../shared (the end-to-end
test skips, saying why, when ../shared is absent; the others need only the synthesizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from chemtwin.cli import main
from chemtwin.core.grids import APSTAR_LOG10_START, APSTAR_LOG10_STEP, APSTAR_N_PIXELS, get_grid
from chemtwin.data.allstar import ASPCAPFLAG_STAR_BAD, read_catalog, resolve_duplicates
from chemtwin.data.apogee import dr17_location, dr17_path
from chemtwin.data.dataset import open_dataset
from chemtwin.data.generate import make_synthesizer, synthesize
from chemtwin.data.population import RedGiantPrior, twin_groups
from chemtwin.data.preprocess import continuum_pixels
from chemtwin.errors import InputError
from test_ingest import APSTARS, FIXTURES

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"real APOGEE fixtures not found: {FIXTURES} (the ../shared folder is absent)"
)
# the real fixtures' FIELD (their headers); TELESCOPE is not in an apStar header: apo25m assumed
FIXTURE_FIELDS = {"2M17335483-2753043": "000+02", "2M19485057+5005279": "K04_083+13"}
N_CLUSTERS, CLUSTER_SIZE, N_FIELD = 3, 4, 10


def _apstar_hdus(apogee_id: str, flux: np.ndarray, snr: float, field: str, rng) -> fits.HDUList:
    """An apStar file of one visit as DR17 writes it: HDU1-3 (2, 8575) flux, error, bitmask (row 0
    the spectrum, row 1 zeros), NaN in the detector gaps, a smooth instrumental continuum."""
    grid = get_grid("apstar")
    x = np.linspace(-1, 1, APSTAR_N_PIXELS)
    continuum = 800.0 * (1 + 0.15 * x - 0.1 * x**2)
    error = continuum / snr
    row = flux * continuum + error * rng.standard_normal(APSTAR_N_PIXELS)
    inside = np.zeros(APSTAR_N_PIXELS, bool)
    for s in grid.chip_slices:
        inside[s] = True
    row[~inside] = np.nan
    data = np.zeros((3, 2, APSTAR_N_PIXELS))
    data[0, 0], data[1, 0] = row, np.where(inside, error, np.nan)
    header = fits.Header({"OBJID": apogee_id, "FIELD": field, "SNR": snr, "NVISITS": 1, "VHELIO": 0.0,
                          "CRVAL1": APSTAR_LOG10_START, "CDELT1": APSTAR_LOG10_STEP, "NWAVE": APSTAR_N_PIXELS})
    wcs = {"CRVAL1": APSTAR_LOG10_START, "CDELT1": APSTAR_LOG10_STEP, "CRPIX1": 1}
    return fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(data[0].astype("f4"), fits.Header(wcs)),
                         fits.ImageHDU(data[1].astype("f4"), fits.Header(wcs)),
                         fits.ImageHDU(np.zeros((2, APSTAR_N_PIXELS), np.int64), fits.Header(wcs))])


def _write(path: Path, hdus: fits.HDUList) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus.writeto(path)
    return path


def make_mirror(root: Path, seed: int = 0, fixtures: bool = False):
    """A DR17-layout mirror under ``root``, its allStar table and the members table: returns
    ``(allstar, members, rows)`` with ``rows`` the allStar rows as dicts."""
    rng = np.random.default_rng(seed)
    prior = RedGiantPrior()
    cl_labels, cl_group = twin_groups(N_CLUSTERS, CLUSTER_SIZE, prior, rng)
    fd_labels, _ = twin_groups(N_FIELD, 1, prior, rng)
    labels = np.concatenate([cl_labels, fd_labels])
    flux = synthesize(make_synthesizer("apstar"), labels, threads=1)
    # The survey's continuum pixels were chosen near line-free in real spectra; the synthesizer puts
    # some lines on them, which the continuum fit would clip away chip by chip.  The stand-in holds
    # them at the continuum, as real spectra nearly are.
    flux[:, continuum_pixels("dr17")] = 1.0
    cluster_names = ["NGC 2682", "NGC 6791", "Berkeley 39"]
    rows, members = [], []
    for k in range(len(labels)):
        star = f"2M{10000000 + k:08d}+{1000000 + k:07d}"
        field = f"FIELD{k % 3}"
        snr = 150.0 + 10 * k
        _write(dr17_path(root, "apo25m", field, star), _apstar_hdus(star, flux[k], snr, field, rng))
        rows.append({"APOGEE_ID": star, "TELESCOPE": "apo25m", "FIELD": field, "TEFF": labels[k, 0],
                     "LOGG": labels[k, 1], "FE_H": labels[k, 4], "SNR": snr, "STARFLAG": 0, "ASPCAPFLAG": 0})
        if k < len(cl_group):
            members.append({"APOGEE_ID": star, "CLUSTER": cluster_names[cl_group[k]]})
    first = rows[0]["APOGEE_ID"]
    # the same star from LCO, at lower SNR: the apo25m row wins (highest SNR)
    _write(dr17_path(root, "lco25m", "FIELDL", first), _apstar_hdus(first, flux[0], 80.0, "FIELDL", rng))
    rows.append({**rows[0], "TELESCOPE": "lco25m", "FIELD": "FIELDL", "SNR": 80.0})
    # stars the quality cuts leave out (their files exist: the cuts, not a missing file, drop them)
    base = dict(rows[-2])
    for k, change in enumerate(({"SNR": 40.0}, {"ASPCAPFLAG": ASPCAPFLAG_STAR_BAD}, {"STARFLAG": 1 << 3},
                                {"TEFF": 6200.0})):
        star = f"2M2000000{k}+2000000{k}"
        _write(dr17_path(root, "apo25m", "FIELDX", star), _apstar_hdus(star, flux[-1], 120.0, "FIELDX", rng))
        rows.append({**base, "APOGEE_ID": star, "FIELD": "FIELDX", "SNR": 120.0, **change})
    members.append({"APOGEE_ID": "2M99999999+9999999", "CLUSTER": "NGC 2682"})  # a member not observed
    members.append({"APOGEE_ID": rows[N_CLUSTERS * CLUSTER_SIZE]["APOGEE_ID"], "CLUSTER": "Collinder 261"})  # alone
    if fixtures:
        for path, (teff, logg) in zip(APSTARS, ((4300.0, 1.6), (4900.0, 3.0))):  # stand-in labels in the cut ranges
            star = path.name[len("apStar-dr17-"):-len(".fits")]
            target = dr17_path(root, "apo25m", FIXTURE_FIELDS[star], star)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            rows.append({**rows[0], "APOGEE_ID": star, "FIELD": FIXTURE_FIELDS[star], "TEFF": teff, "LOGG": logg,
                         "FE_H": 0.0, "SNR": fits.getheader(path)["SNR"]})
    allstar = root / "allStar-test.fits"
    table = Table(rows=[tuple(r.values()) for r in rows], names=list(rows[0]))
    for name in ("TEFF", "LOGG", "FE_H", "SNR"):
        table[name] = table[name].astype("f4")
    for name in ("STARFLAG", "ASPCAPFLAG"):
        table[name] = table[name].astype("i8")
    table.write(allstar)
    members_path = root / "members.csv"
    Table(rows=[(m["APOGEE_ID"], m["CLUSTER"]) for m in members], names=("APOGEE_ID", "CLUSTER")).write(members_path)
    return allstar, members_path, rows


@pytest.mark.parametrize("fixtures", [False, pytest.param(True, marks=needs_fixtures)], ids=["synthetic", "with-fixtures"])
def test_recipe_end_to_end_on_a_dr17_mirror(tmp_path, capsys, fixtures):
    root = tmp_path / "mirror"
    allstar, members, rows = make_mirror(root, fixtures=fixtures)
    data, model, latents = tmp_path / "real.h5", tmp_path / "model", tmp_path / "latents.h5"
    assert main(["-q", "ingest", "--catalog", str(allstar), "--root", str(root), "--out", str(data)]) == 0
    err = capsys.readouterr().err
    assert "4 catalogue star(s) left out (SNR: 1, ASPCAPFLAG: 1, STARFLAG: 1, TEFF: 1)" in err
    assert "1 catalogue row(s) of stars listed more than once not used" in err  # the LCO row of one star
    n_good = N_CLUSTERS * CLUSTER_SIZE + N_FIELD + (2 if fixtures else 0)
    with open_dataset(data) as ds:
        ids = list(ds.star_id)
        assert len(ids) == n_good == len(set(ids))  # one row per APOGEE_ID
        telescope, field = ds.column("telescope"), ds.column("field")
        assert set(np.asarray(telescope).astype(str)) == {"apo25m"}  # the LCO duplicate lost on SNR
        fields = dict(zip(ids, np.asarray(field).astype(str)))
        assert fields[rows[1]["APOGEE_ID"]] == "FIELD1"
        if fixtures:
            assert fields["2M17335483-2753043"] == "000+02"
        assert ds.n_pixels == get_grid("aspcap").n_pixels and ds.attrs["generator"] == "chemtwin ingest"
        assert np.all((ds.read().ivar > 0).mean(axis=1) > 0.8)  # the stand-in survives preprocessing like real files
    assert main(["-q", "train", str(data), "--out", str(model), "--epochs", "2", "--latent-dim", "4", "--batch-size",
                 "8", "--seed", "0", "--threads", "1", "--device", "cpu", "--val-fraction", "0.2"]) == 0
    assert main(["-q", "embed", str(model), str(data), "--out", str(latents), "--device", "cpu"]) == 0
    report = tmp_path / "clusters.json"
    assert main(["-q", "evaluate", "--latents", str(latents), "--members", str(members), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    clusters = {c["cluster"]: c for c in result["clusters"]}
    assert sorted(clusters) == ["Berkeley 39", "Collinder 261", "NGC 2682", "NGC 6791"]
    assert clusters["NGC 2682"]["n_members"] == 5 and clusters["NGC 2682"]["n_found"] == 4
    assert clusters["NGC 2682"]["n_pairs"] == 12 and 0 <= clusters["NGC 2682"]["doppelganger_rate"] <= 1
    assert clusters["Collinder 261"]["n_pairs"] == 0 and clusters["Collinder 261"]["doppelganger_rate"] is None
    assert result["membership"]["n_field"] == n_good - 13 and result["n_pairs"] == 36
    # the same table with the model and the dataset: the same ranks (the latents are the model's)
    report2 = tmp_path / "clusters-model.json"
    assert main(["-q", "evaluate", str(model), str(data), "--members", str(members), "--json", str(report2)]) == 0
    result2 = json.loads(report2.read_text())
    assert result2["clusters"] == result["clusters"] and result2["mse_reconstruction"] is not None
    index, hits = tmp_path / "index", tmp_path / "hits.json"
    assert main(["-q", "index", str(latents), "--out", str(index)]) == 0  # never a duplicate ID from ingest
    star = rows[0]["APOGEE_ID"]
    assert main(["-q", "search", str(index), "--star", star, "-k", "3", "--json", str(hits)]) == 0
    found = json.loads(hits.read_text())["queries"][0]
    assert found["query"] == star and len(found["neighbours"]) == 3
    assert star not in [n["star_id"] for n in found["neighbours"]]
    assert main(["-q", "cluster", str(latents), "--out", str(tmp_path / "groups.h5"), "--min-cluster-size", "2"]) == 0
    with h5py.File(tmp_path / "groups.h5", "r") as groups:
        assert groups["cluster"].shape == (n_good,) and sorted(groups["star_id"].asstr()[:]) == sorted(ids)


def test_duplicates_resolved_at_ingest(tmp_path, capsys):
    """Two telescopes, and apStar beside aspcapStar: one row per APOGEE_ID, by the documented rule."""
    root = tmp_path / "mirror"
    allstar, _, rows = make_mirror(root)
    first = rows[0]["APOGEE_ID"]
    apo, lco = dr17_path(root, "apo25m", "FIELD0", first), dr17_path(root, "lco25m", "FIELDL", first)
    assert dr17_location(apo) == ("apo25m", "FIELD0") and dr17_location(tmp_path / "x.fits") is None
    # an aspcapStar of the same star, same SNR as its apStar: the apStar wins the tie
    with fits.open(apo) as hdus:
        flux = np.nan_to_num(hdus[1].data[0] / np.nanmedian(hdus[1].data[0]))
        header = hdus[0].header.copy()
    aspcap = _write(dr17_path(root, "apo25m", "FIELD0", first, "aspcapStar"),
                    fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(flux), fits.ImageHDU(np.full_like(flux, 0.01)),
                                  fits.ImageHDU(flux)]))
    out = tmp_path / "dup.h5"
    code = main(["-q", "ingest", str(root / "**" / "*Star-dr17-*.fits"), "--catalog", str(allstar), "--out", str(out)])
    assert code == 1  # the STAR_BAD star is refused, as without --root (the duplicates are no error)
    err = capsys.readouterr().err
    assert "1 of 26 file(s) skipped" in err and "flagged STAR_BAD" in err
    assert f"{lco}: APOGEE_ID {first} also in {apo}" in err and f"{aspcap}: APOGEE_ID {first}" in err
    with open_dataset(out) as ds:
        ids = np.asarray(ds.star_id).astype(str)
        # the mirror's stars once each, less the STAR_BAD one (no other cuts for FILE arguments by default)
        assert len(ids) == len(set(ids)) == len(rows) - 2
        k = list(ids).index(first)
        assert np.asarray(ds.column("telescope")).astype(str)[k] == "apo25m"
        assert np.asarray(ds.column("field")).astype(str)[k] == "FIELD0"
    # --telescope lco25m: only that telescope's files (and its row of the catalogue with --root)
    out2 = tmp_path / "lco.h5"
    assert main(["-q", "ingest", "--catalog", str(allstar), "--root", str(root), "--telescope", "lco25m",
                 "--out", str(out2), "--min-snr", "50"]) == 0
    with open_dataset(out2) as ds:
        assert list(ds.star_id) == [first] and list(np.asarray(ds.column("field")).astype(str)) == ["FIELDL"]
    # files whose header names no APOGEE_ID are not duplicates of each other: each is reported on its own
    anonymous = []
    for k in range(2):
        hdus = _apstar_hdus("", np.ones(APSTAR_N_PIXELS), 100.0, "F", np.random.default_rng(k))
        del hdus[0].header["OBJID"]
        anonymous.append(str(_write(tmp_path / f"anon{k}" / "apStar-x.fits", hdus)))
    assert main(["-q", "ingest", *anonymous, str(apo), "--catalog", str(allstar), "--out", str(tmp_path / "a.h5")]) == 1
    assert capsys.readouterr().err.count("names no APOGEE ID") == 2
    # the rule itself: highest SNR, then the preferred kind, then the first
    np.testing.assert_array_equal(resolve_duplicates(["a", "b", "a", "a"], [10, 5, 30, np.nan]), [1, 2])
    np.testing.assert_array_equal(resolve_duplicates(["a", "a"], [10, 10], prefer=[1, 0]), [1])


def test_aspcapstar_layout_and_files_missing_from_the_mirror(tmp_path, capsys):
    """--spectra aspcapStar reads .../aspcap/dr17/synspec_rev1/TEL/FIELD/; stars whose file the mirror
    lacks are listed as skipped (exit code 1), the others written."""
    root = tmp_path / "mirror"
    allstar, _, rows = make_mirror(root)
    star = rows[2]["APOGEE_ID"]
    with fits.open(dr17_path(root, "apo25m", "FIELD2", star)) as hdus:
        flux = np.nan_to_num(hdus[1].data[0] / np.nanmedian(hdus[1].data[0]))
        header = hdus[0].header.copy()
    _write(dr17_path(root, "apo25m", "FIELD2", star, "aspcapStar"),
           fits.HDUList([fits.PrimaryHDU(header=header), fits.ImageHDU(flux), fits.ImageHDU(np.full_like(flux, 0.01)),
                         fits.ImageHDU(flux)]))
    out = tmp_path / "aspcap.h5"
    assert main(["-q", "ingest", "--catalog", str(allstar), "--root", str(root), "--spectra", "aspcapStar",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    n = N_CLUSTERS * CLUSTER_SIZE + N_FIELD
    assert f"{n - 1} of {n} file(s) skipped" in err and "synspec_rev1/apo25m/FIELD0/aspcapStar-dr17-" in err
    with open_dataset(out) as ds:
        assert list(ds.star_id) == [star] and list(np.asarray(ds.column("field")).astype(str)) == ["FIELD2"]


def test_quality_cuts_on_file_arguments(tmp_path, capsys):
    root = tmp_path / "mirror"
    allstar, _, rows = make_mirror(root)
    out = tmp_path / "cut.h5"
    argv = ["-q", "ingest", str(root / "**" / "stars" / "apo25m" / "FIELDX" / "*.fits"), "--catalog", str(allstar),
            "--out", str(out), "--quality-cuts", "on"]
    assert main(argv) == 2  # every FIELDX star fails one cut: nothing written
    err = capsys.readouterr().err
    assert "no usable spectrum among 4 file(s)" in err and "is left out: SNR 40.0 is not above 70" in err
    assert not out.exists()
    assert main([*argv, "--min-snr", "30", "--teff-range", "3500:6500", "--starflag-mask", "0"]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 file(s) skipped" not in err and "1 of 4 file(s) skipped" in err and "STAR_BAD" not in err
    assert "ASPCAPFLAG has bit(s) 23 set" in err
    with open_dataset(out) as ds:
        assert len(ds) == 3


def test_catalog_keeps_telescope_field_and_flags(tmp_path):
    allstar, _, rows = make_mirror(tmp_path / "m")
    cat = read_catalog(allstar)
    assert cat.telescope[-1] == "apo25m" and cat.fields[0] == "FIELD0" and cat.starflag is not None
    no_flags = tmp_path / "noflags.fits"
    Table({"APOGEE_ID": ["A"], "TEFF": [4500.0], "LOGG": [2.0]}).write(no_flags)
    assert read_catalog(no_flags).starflag is None and read_catalog(no_flags).snr is None
    with pytest.raises(InputError, match="unknown DR17 spectrum kind"):
        dr17_path(tmp_path, "apo25m", "F", "A", "apVisit")


def test_missing_flag_columns_warn_not_fail(tmp_path, caplog):
    root = tmp_path / "mirror"
    allstar, _, rows = make_mirror(root)
    bare = tmp_path / "bare.fits"
    t = Table.read(allstar)
    t.remove_columns(["STARFLAG", "ASPCAPFLAG", "SNR"])
    t.write(bare)
    with caplog.at_level("WARNING"):
        assert main(["-q", "ingest", "--catalog", str(bare), "--root", str(root), "--out", str(tmp_path / "b.h5")]) == 0
    text = caplog.text
    assert "no SNR column" in text and "no STARFLAG column" in text and "no ASPCAPFLAG column" in text


def test_bad_input_on_the_new_paths_is_one_line_exit_2(tmp_path, capsys):
    root = tmp_path / "mirror"
    allstar, members, rows = make_mirror(root)
    out = tmp_path / "x.h5"
    no_field = tmp_path / "nofield.fits"
    t = Table.read(allstar)
    t.remove_column("FIELD")
    t.write(no_field)
    no_id = tmp_path / "noid.csv"
    Table({"NAME": ["a"], "CLUSTER": ["NGC 1"]}).write(no_id)
    no_cluster = tmp_path / "nocluster.csv"
    Table({"APOGEE_ID": ["a"], "NAME": ["NGC 1"]}).write(no_cluster)
    ingest = ["ingest", "--catalog", str(allstar), "--out", str(out)]
    cases = [
        (ingest + ["--root", str(tmp_path / "nowhere")], "mirror root", "nowhere: no such folder"),
        (ingest + ["--root", str(root), "--telescope", "keck"], "unknown telescope 'keck'", "apo25m"),
        (ingest + [str(root / "**" / "*.fits"), "--telescope", "keck"], "unknown telescope 'keck'"),
        (["ingest", "--catalog", str(no_field), "--root", str(root), "--out", str(out)], "has no FIELD column"),
        (ingest + ["--root", str(root), "--teff-range", "5000"], "--teff-range", "LO:HI"),
        (ingest + ["--root", str(root), "--min-snr", "1e9"], "passes the quality cuts"),
        (ingest + ["--root", str(root), str(allstar)], "not both"),
        (ingest + ["--root", str(root), "--spectra", "apVisit"], "unknown DR17 spectrum kind 'apVisit'"),
    ]
    for argv, *expected in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chemtwin ingest: error:"), lines
        assert all(e in lines[0] for e in expected), lines[0]
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    # a membership table without APOGEE_ID / without the cluster column / missing: one line, no JSON
    latents = tmp_path / "lat.h5"
    from chemtwin.search.latents import write_latents
    write_latents(latents, np.zeros((3, 2), np.float32), star_id=np.array(["a", "b", "c"]))
    report = tmp_path / "r.json"
    for table, expected in ((no_id, "has no APOGEE_ID column"), (no_cluster, "has no CLUSTER column"),
                            (tmp_path / "none.csv", "no such file"), (members, "no cluster of the membership table")):
        assert main(["evaluate", "--latents", str(latents), "--members", str(table), "--json", str(report)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chemtwin evaluate: error:") and expected in lines[0], lines
        assert not report.exists()


def test_membership_groups_and_rates(tmp_path):
    """Members of a cluster are one twin group; the rate counts non-members closer than a fellow member."""
    from chemtwin.core.ranks import doppelganger_ranks
    from chemtwin.evaluation.membership import cluster_summary, read_membership

    table = tmp_path / "occam.ecsv"
    Table({"APOGEE_ID": ["a", "b", "c", "x"], "CLUSTER": ["C1", "C1", "C1", "C2"]}).write(table)
    members = read_membership(table)
    ids = ["a", "b", "c", "f1", "f2", "f3"]
    group = members.groups(ids)
    np.testing.assert_array_equal(group, [0, 0, 0, -1, -1, -1])
    z = np.array([[0.0], [1.0], [2.0], [0.5], [10.0], [11.0]])
    result = doppelganger_ranks(z, group, "l1", progress=False)
    summary = {c["cluster"]: c for c in cluster_summary(result, group, members)}
    c1 = summary["C1"]
    assert c1["n_members"] == 3 and c1["n_found"] == 3 and c1["n_pairs"] == 6
    # ranks (f1 at 0.5 is the only field star near): a->b 1, a->c 1, b->a 1, b->c 1, c->a 1, c->b 0
    assert c1["frac_rank0"] == pytest.approx(1 / 6) and c1["doppelganger_rate"] == pytest.approx(5 / 6 / 3)
    assert summary["C2"]["n_members"] == 1 and summary["C2"]["n_pairs"] == 0
