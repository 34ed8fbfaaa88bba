"""The bench report: its header (date, version, commit), the "What this run says" section computed
from the numbers, star names in figures, and figures that keep legends off the data and their
layout with 100 stars and many curves."""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

import chemtwin
from chemtwin.cli import main
from chemtwin.evaluation import summary
from chemtwin.evaluation.metrics import draw_rank_cdf, plot_rank_cdf
from chemtwin.evaluation.spectra_figure import MAX_LEGEND_STARS, plot_dataset_spectra, star_label
from chemtwin.evaluation.summary import run_summary, software_record, source_commit

PNG = b"\x89PNG\r\n\x1a\n"


def _row(method, scenario, frac, n=25000):
    snr = math.inf if scenario.startswith("snrinf") else float(scenario[3:].split("_")[0])
    mismatch = scenario.endswith("_mismatch")
    label = ("SNR inf" if math.isinf(snr) else f"SNR {snr:g}") + (" mismatch" if mismatch else "")
    return {"method": method, "scenario": scenario, "label": label, "snr": snr, "mismatch": mismatch,
            "frac_rank0": frac, "n_stars": n}


def _results(rows, quick=False):
    return {"config": {"quick": quick}, "rows": rows}


FULL = _results([  # rank 0 of the full bench (docs/benchmarks.md), plus a mismatch scenario
    _row("fader", "snrinf", 0.527), _row("cae", "snrinf", 0.236), _row("oracle", "snrinf", 1.0),
    _row("payne", "snrinf", 0.975),
    _row("fader", "snr100", 0.447), _row("cae", "snr100", 0.222), _row("oracle", "snr100", 0.983),
    _row("payne", "snr100", 0.792),
    _row("fader", "snr100_mismatch", 0.445), _row("cae", "snr100_mismatch", 0.225),
    _row("payne", "snr100_mismatch", 0.156),
])


def test_summary_is_computed_from_the_numbers():
    text = "\n".join(run_summary(FULL))
    assert "SNR inf: The Payne, 97.5% (the Cramér–Rao oracle: 100.0%)" in text
    assert "SNR 100 mismatch: fader (chemtwin), 44.5%" in text
    assert "SNR inf 52.7 vs 100.0% (-47.3 points, below)" in text  # the fader against the oracle
    assert "SNR 100 44.7 vs 22.2% (+22.5 points, above)" in text  # what the adversary buys
    assert "fader (chemtwin) keeps its score (44.7 -> 44.5%)" in text
    assert "The Payne falls from 79.2 to 15.6%" in text
    assert "quick run" not in text

    # other numbers, other sentences: nothing is canned
    rows = [dict(r) for r in FULL["rows"]]
    for r in rows:
        if r["method"] == "fader" and r["scenario"] == "snr100_mismatch":
            r["frac_rank0"] = 0.20
        if r["method"] == "cae" and r["scenario"] == "snrinf":
            r["frac_rank0"] = 0.53
    text = "\n".join(run_summary(_results(rows, quick=True)))
    assert "fader (chemtwin) falls from 44.7 to 20.0%" in text
    assert "SNR inf 52.7 vs 53.0% (-0.3 points, level with)" in text
    assert "quick run" in text


def test_the_physical_limit_line_says_what_the_oracle_was_given():
    def line(given):
        rows = [dict(r, **({"given_labels": given} if r["method"] == "oracle" else {})) for r in FULL["rows"]]
        return next(x for x in run_summary(_results(rows)) if "physical limit" in x)

    assert "the oracle fits every label" in line(None)  # a row from before the bench gave it labels
    assert "the oracle is given TEFF and LOGG exactly" in line({"TEFF": 0.0, "LOGG": 0.0})
    quoted = line({"TEFF": 50.0, "LOGG": 0.07})
    assert "with the errors a survey quotes (TEFF 50, LOGG 0.07)" in quoted and "exactly" not in quoted


def test_summary_names_the_best_method_a_survey_can_run():
    # FULL has no row that learns from known twins: no such line
    assert not any("without known twins" in line for line in run_summary(FULL))
    rows = [dict(r) for r in FULL["rows"]] + [
        _row("polyres_twin", "snr100", 0.90), _row("fader_decoded", "snr100", 0.50), _row("polyres", "snr100", 0.30)]
    line = next(line for line in run_summary(_results(rows)) if "without known twins" in line)
    # the supervised row (90 %) and the oracle (98.3 %) are left out; The Payne is the best non-network row
    assert "SNR 100: The Payne, 79.2% (without the network: The Payne, 79.2%)" in line
    rows = [r for r in rows if r["method"] != "payne"]
    line = next(line for line in run_summary(_results(rows)) if "without known twins" in line)
    assert "SNR 100: fader (chemtwin) + decoded-twin metric, 50.0% (without the network: polynomial residuals, 30.0%)" in line
    assert "SNR inf" not in line  # no supervised row there


def test_summary_sets_the_network_against_the_model_fitting_methods():
    line = next(line for line in run_summary(FULL) if "fitted with a model" in line)
    # the paper protocol hands The Payne the generator's own model: it wins, and the line says so
    assert "the models are the ones that made the spectra" in line
    assert "SNR 100: fader (chemtwin) 44.7 vs The Payne 79.2% (-34.5 points, below)" in line
    # a survey's models are imperfect: the best twin-free network row against the best model row
    rows = [dict(r) for r in FULL["rows"] if r["scenario"] == "snr100" and r["method"] != "payne"] + [
        _row("payne", "snr100", 0.06, n=600), _row("cannon", "snr100", 0.20, n=600),
        _row("fader_decoded", "snr100", 0.348, n=600), _row("fader_twin", "snr100", 0.90, n=600)]
    results = {"config": {"protocol": "survey"}, "rows": rows}
    line = next(line for line in run_summary(results) if "fitted with a model" in line)
    assert "another code's atomic data" in line
    # the twin-supervised row (90 %) is not the network's: 44.7 % from 25,000 stars against 20 % from 600
    assert "SNR 100: fader (chemtwin) 44.7 vs The Cannon 20.0% (+24.7 points, above)" in line
    only_networks = {"config": {}, "rows": [r for r in rows if r["method"] not in ("payne", "cannon")]}
    assert not any("fitted with a model" in line for line in run_summary(only_networks))


def test_summary_copes_with_partial_results_and_json_nulls():
    assert run_summary(_results([])) == []
    only_raw = _results([_row("raw", "snrinf", 0.01, n=100)])
    assert run_summary(only_raw) == ["* **Best rank-0 fraction** (the oracle aside): SNR inf: raw spectra, 1.0%."]
    # results.json stores SNR inf as null and rows without a score as null
    loaded = json.loads(json.dumps(FULL, default=str).replace("Infinity", "null"))
    loaded["rows"].append(dict(_row("polyres", "snr100", None)))
    assert run_summary(loaded) == run_summary(FULL)


def test_commit_is_unknown_outside_a_git_checkout_and_never_crashes(tmp_path, monkeypatch):
    assert source_commit(tmp_path) == "unknown"
    assert source_commit(tmp_path / "does-not-exist") == "unknown"
    # an installed copy inside some git repository's ignored .venv is not a checkout of chemtwin
    repo = tmp_path / "clone"
    installed = repo / ".venv" / "site-packages" / "chemtwin"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (repo / ".gitignore").write_text(".venv/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    if subprocess.run([*git, "init", "-q"]).returncode == 0:
        subprocess.run([*git, "add", ".gitignore"], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
        assert source_commit(installed) == "unknown"
        (repo / "chemtwin").mkdir()
        (repo / "chemtwin" / "__init__.py").write_text("")
        subprocess.run([*git, "add", "chemtwin"], check=True)
        subprocess.run([*git, "commit", "-qm", "y"], check=True)
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert source_commit(repo / "chemtwin") == head
        (repo / "chemtwin" / "__init__.py").write_text("changed = True\n")
        assert source_commit(repo / "chemtwin") == f"{head} (with uncommitted changes)"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(summary.subprocess, "run", no_git)
    record = software_record()
    assert record["commit"] == "unknown" and record["chemtwin"] == chemtwin.__version__
    assert record["date"].endswith("UTC")


def test_commit_is_the_checkout_head_when_run_from_git():
    package = Path(chemtwin.__file__).resolve().parent
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "--", "__init__.py"], capture_output=True,
                             cwd=package)
    if tracked.returncode != 0:  # e.g. CI's non-editable install into .venv inside the clone
        assert source_commit() == "unknown"
        pytest.skip("chemtwin is not running from its git checkout here")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=package)
    assert source_commit().startswith(head.stdout.strip())


def test_star_names_use_the_star_id_then_the_row():
    labels = {"TEFF": 4607.2, "LOGG": 3.341}
    assert star_label("2M00242666+5341178", 12, labels) == "2M00242666+5341178 (TEFF 4607 K, LOGG 3.34)"
    assert (star_label(b"2M00242666+5341178", 12, labels, group=7)
            == "2M00242666+5341178 (TEFF 4607 K, LOGG 3.34, group 7)")
    assert star_label(None, 12, labels, group=-1) == "row 12 (TEFF 4607 K, LOGG 3.34)"
    assert star_label("", 3, {"TEFF": float("nan")}) == "row 3"


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_rank_cdf_legend_is_off_the_data_with_many_curves(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    curves = [(f"method {k} with a long label", rng.integers(0, 100, 100), 100) for k in range(15)]
    fig, ax = plt.subplots(layout="constrained")
    draw_rank_cdf(ax, curves, "15 methods, N = 100")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not _overlaps(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    # at N = 100 the 0.1% N marker (0.1) lies outside the axis and is not drawn
    assert [t.get_text() for t in ax.texts] == [" 1% N"]
    plt.close(fig)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plot_rank_cdf(curves, tmp_path / "cdf.png", "15 methods")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_report_of_a_small_bench_with_100_stars(tmp_path):
    """A real (tiny) bench: 50 validation pairs = 100 stars, two trained models and raw spectra.
    The report carries its provenance and summary; every figure is drawn without a layout
    warning; the latent map's caption and title say what is shown."""
    out = tmp_path / "bench"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["-q", "bench", str(out), "--n-train-pairs", "30", "--n-val-pairs", "50", "--snr", "inf",
                     "--time-limit", "20", "--methods", "fader,cae,raw"]) == 0
    layout = [str(w.message) for w in caught if any(k in str(w.message).lower() for k in ("layout", "legend"))]
    assert layout == []
    text = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["software"]["chemtwin"] == chemtwin.__version__
    assert f"chemtwin {chemtwin.__version__}, commit {results['software']['commit']}" in text
    assert f"Date: {results['software']['date']}" in text
    summary = text[text.index("## What this run says"):text.index("## Protocol and results")]
    fader = next(r for r in results["rows"] if r["method"] == "fader")
    assert f"{100 * fader['frac_rank0']:.1f}" in summary
    assert all(r["n_stars"] == 100 for r in results["rows"])
    for name in ("reconstruction", "rank_cdf", "latent_map", "training_curves"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG, name
    assert "should" not in text and "coloured by the true TEFF, LOGG and [Fe/H]" in text


def _dataset(path, n, star_id):
    from chemtwin.core.grids import get_grid
    from chemtwin.data.dataset_writer import DatasetWriter

    wave = get_grid("aspcap").wavelength
    rng = np.random.default_rng(0)
    flux = 1 - 0.2 * rng.random((n, wave.size)).astype("f4")
    ivar = np.full((n, wave.size), 1e4, "f4")
    ivar[:, ::50] = 0  # masked pixels are left out of the lines
    labels = np.column_stack([rng.uniform(4000, 5000, n), rng.uniform(1, 3, n)]).astype("f4")
    with DatasetWriter(path, wave, ["TEFF", "LOGG"], attrs={"generator": "test", "grid": "aspcap", "seed": 0,
                                                           "snr": "100"}, with_star_id=star_id) as w:
        w.append(flux, ivar, labels, np.arange(n) // 2,
                 [f"2M{i:08d}+0000000" for i in range(n)] if star_id else None)
    return labels


@pytest.mark.parametrize("n", [3, 100])
def test_spectra_figure_names_stars_and_survives_100(tmp_path, n, monkeypatch):
    """Few spectra: a legend entry per star (APOGEE_ID, TEFF, LOGG), outside the axes; 100: lines
    coloured by TEFF with a colour bar. Both without a layout warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chemtwin.data.dataset import open_dataset

    labels = _dataset(tmp_path / "d.h5", n, star_id=(n == 3))
    seen = {}
    close = plt.close

    def keep(fig):  # look at the figure before it is closed
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ax = fig.axes[0]
        seen["legend"] = [t.get_text() for t in fig.legends[0].get_texts()]
        seen["off_data"] = not _overlaps(fig.legends[0].get_window_extent(r), ax.get_window_extent(r))
        seen["colorbar"] = len(fig.axes) == 2
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_dataset(tmp_path / "d.h5") as ds:
            out = plot_dataset_spectra(ds, range(n), tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG
    assert seen["off_data"]
    stars = [t for t in seen["legend"] if "windows" not in t]
    if n <= MAX_LEGEND_STARS:
        assert stars[0] == f"2M00000000+0000000 (TEFF {labels[0, 0]:.0f} K, LOGG {labels[0, 1]:.2f}, group 0)"
        assert len(stars) == n and not seen["colorbar"]
    else:
        assert stars == [] and seen["colorbar"]
