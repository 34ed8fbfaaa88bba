"""``chemtwin bench``: the whole protocol end to end, its report, restart and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from chemtwin.cli import main
from chemtwin.evaluation.bench import BenchConfig, Scenario, bench_methods
from chemtwin.evaluation.report import anchor_text
from chemtwin.methods import METHODS

# the methods that rank a trained model's own latents (their rows carry training times and leakage)
MODELS = [m for m in bench_methods() if METHODS[m].model_kind and METHODS[m].base is None]


@pytest.mark.slow
def test_quick_bench_writes_every_row_and_resumes(tmp_path, capsys):
    """The README's demo: every method x scenario in results.json and report.md, figures
    written, and a rerun skips every finished step and reproduces the table."""
    out = tmp_path / "bench"
    assert main(["-q", "bench", "-o", str(out), "--quick"]) == 0
    assert "report.md" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    cfg = BenchConfig.quick_config()
    expected = {(m, sc.name) for sc in cfg.scenarios() for m in bench_methods()
                if not (m == "oracle" and sc.mismatch)}
    got = {(r["method"], r["scenario"]) for r in results["rows"]}
    assert got == expected
    report = (out / "report.md").read_text()
    main_table = report[report.index("| method | scenario"):].split("\n\n")[0]
    assert len([line for line in main_table.splitlines() if "SNR" in line]) == len(expected)
    r2_table = report[report.index("| model | scenario"):].split("\n\n")[0]
    assert len([line for line in r2_table.splitlines() if "SNR" in line]) == len(MODELS) * len(cfg.scenarios())
    for r in results["rows"]:
        assert r["n_stars"] == 2 * cfg.n_val_pairs
        assert 0.0 <= r["frac_rank0"] <= r["frac_rank_lt_1pct"] <= 1.0
        if r["method"] in MODELS:
            assert r["train_s"] > 0 and r["mse_swapped"] > 0
    by = {(r["method"], r["scenario"]): r for r in results["rows"]}
    # the demo is the survey protocol: The Cannon learned from the pipeline's labels, not the truth
    assert results["config"]["protocol"] == "survey" and "survey protocol" in report
    cannon = json.loads((out / "evals" / "snr100" / "cannon.json").read_text())
    assert cannon["model"]["train"]["path"].endswith("pipeline_snr100.h5")
    # noiseless, the model is known: the oracle finds every twin; noise can only hurt it
    assert by[("oracle", "snrinf")]["frac_rank0"] == 1.0
    assert by[("oracle", "snr30")]["frac_rank0"] <= by[("oracle", "snr100")]["frac_rank0"]
    # raw spectra are dominated by TEFF/LOGG: the trained fader must beat them at SNR inf
    assert by[("fader", "snrinf")]["frac_rank0"] > by[("raw", "snrinf")]["frac_rank0"]
    # the model rows say how much TEFF/LOGG their latents still carry; the Payne's emulator reports its error
    for m in MODELS:
        assert set(by[(m, "snrinf")]["condition_r2"]) == {"TEFF", "LOGG"}
    assert "R² (mlp)" in report
    emulator = results["payne_emulator"]
    assert emulator["n_train"] > 0 and 0 < emulator["val_median_abs_error"] < 0.1
    assert "The Payne's emulator" in report
    for name in ("reconstruction", "rank_cdf", "latent_map", "training_curves"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in report

    assert main(["-q", "bench", "-o", str(out), "--quick"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]
    assert again["step_seconds"] == {}, "a rerun of a finished bench must redo nothing"


def test_scenarios_and_names():
    cfg = BenchConfig(protocol="paper", snrs=("inf", 50), mismatch_snr=100)
    assert [sc.name for sc in cfg.scenarios()] == ["snrinf", "snr50", "snr100_mismatch"]
    assert Scenario(math.inf, False).label == "SNR inf"
    assert BenchConfig(protocol="paper", mismatch_snr=None).scenarios()[-1] == Scenario(30.0, False)
    # the survey protocol gives the model-based methods the other code at every SNR: no separate scenario
    survey = BenchConfig(snrs=("inf", 50), mismatch_snr=100)
    assert survey.protocol == "survey" and [sc.name for sc in survey.scenarios()] == ["snrinf", "snr50"]


def test_anchor_text_uses_the_published_numbers():
    assert anchor_text("fader", 50.0, False) == "FaderDis 2021: 64.4 / 92.7 / 98.9"
    assert anchor_text("polyres", math.inf, False) == "polyres 2021: 52.1 / 69.2 / 80.2"
    assert anchor_text("fader", 100.0, True) == ""
    assert anchor_text("raw", 30.0, False) == ""


@pytest.mark.parametrize("argv, message", [
    (["--methods", "fader,magic"], "unknown method"),
    (["--snr", "100,loud"], "--snr takes"),
    (["--snr", "0"], "SNR must be between"),
    (["--n-val-pairs", "1"], "at least 2"),
    (["--time-limit", "0"], "time limit must be positive"),
    (["--metric", "l3"], "metric"),
    (["--protocol", "asteroseismic"], "unknown --protocol"),
    (["--teff-error", "-30"], "--teff-error must be >= 0"),
    (["--logg-systematic", "-0.1"], "--logg-systematic must be >= 0"),
    (["--logg-error", "nan"], "--logg-error must be a finite number"),
    (["--protocol", "paper", "--teff-error", "30"], "the survey protocol's"),
    (["--mismatch-snr", "50"], "the paper protocol's"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["bench", "-o", str(tmp_path / "b"), "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_refuses_a_foreign_folder_and_other_settings(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["bench", "-o", str(foreign), "--quick"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious"

    run = tmp_path / "run"
    run.mkdir()
    (run / "bench_config.json").write_text(json.dumps({"n_train_pairs": 7}))
    assert main(["bench", "-o", str(run), "--quick"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_quick_config_is_small():
    cfg = BenchConfig.quick_config()
    assert cfg.quick and cfg.n_train_pairs * cfg.time_limit < BenchConfig().n_train_pairs * BenchConfig().time_limit
    assert np.isinf(cfg.snrs[0]) and cfg.mismatch_snr is None and cfg.protocol == "survey"
    assert BenchConfig.quick_config(protocol="paper").mismatch_snr == 100


def test_cli_options_reach_the_config_and_no_mismatch_means_none(tmp_path):
    out = tmp_path / "b"
    assert main(["-q", "bench", "-o", str(out), "--quick", "--protocol", "paper", "--snr", "inf", "--mismatch-snr",
                 "none", "--methods", "raw",
                 "--n-train-pairs", "3", "--n-val-pairs", "4"]) == 0
    cfg = json.loads((out / "bench_config.json").read_text())
    assert cfg["mismatch_snr"] is None and cfg["snrs"] == ["inf"] and cfg["n_val_pairs"] == 4
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["scenario"], r["n_stars"]) for r in rows] == [("raw", "snrinf", 8)]


def test_the_paper_protocol_gives_the_oracle_teff_and_logg_exactly(tmp_path):
    common = ["-q", "bench", "--n-train-pairs", "30", "--n-val-pairs", "20", "--snr", "100", "--methods", "oracle"]
    assert main([*common, "-o", str(tmp_path / "paper"), "--protocol", "paper", "--mismatch-snr", "none"]) == 0
    assert main([*common, "-o", str(tmp_path / "survey")]) == 0
    row = {p: json.loads((tmp_path / p / "results.json").read_text())["rows"][0] for p in ("paper", "survey")}
    assert row["paper"]["given_labels"] == {"TEFF": 0.0, "LOGG": 0.0}
    assert row["survey"]["given_labels"] == {"TEFF": 50.0, "LOGG": 0.07}
    sigma = {p: json.loads((tmp_path / p / "evals" / "snr100" / "oracle.json").read_text())["oracle"]["sigma_median"]
             for p in row}
    # TEFF/LOGG given exactly bound every abundance at least as tightly as given with errors
    assert all(sigma["paper"][n] <= sigma["survey"][n] * (1 + 1e-9) for n in sigma["paper"])
    assert "The oracle's bound is that of a method given TEFF and LOGG exactly" in (
        tmp_path / "paper" / "report.md").read_text()
    assert "given TEFF and LOGG with the quoted random errors" in (tmp_path / "survey" / "report.md").read_text()


def test_a_finished_bench_given_more_methods_computes_only_their_rows(tmp_path, capsys):
    out = tmp_path / "b"
    small = ["-q", "bench", "-o", str(out), "--n-train-pairs", "30", "--n-val-pairs", "20", "--snr", "inf",
             "--time-limit", "1"]
    assert main([*small, "--methods", "raw"]) == 0
    first = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in first["rows"]] == ["raw"]
    raw_json = (out / "evals" / "snrinf" / "raw.json").read_text()

    assert main([*small, "--methods", "raw,oracle"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in again["rows"]] == ["raw", "oracle"]
    assert list(again["step_seconds"]) == ["evaluate oracle, SNR inf"]
    assert (out / "evals" / "snrinf" / "raw.json").read_text() == raw_json
    assert "oracle (Cramer-Rao)" in (out / "report.md").read_text()
    # the survey protocol's oracle is the bound for a method given TEFF/LOGG with the quoted errors
    oracle = next(r for r in again["rows"] if r["method"] == "oracle")
    assert oracle["given_labels"] == {"TEFF": 50.0, "LOGG": 0.07}
    # a row computed with other settings (here: by a chemtwin that recorded none) is evaluated again
    stale = out / "evals" / "snrinf" / "oracle.json"
    stale.write_text(json.dumps({k: v for k, v in json.loads(stale.read_text()).items() if k != "settings"}))
    assert main([*small, "--methods", "raw,oracle"]) == 0
    assert list(json.loads((out / "results.json").read_text())["step_seconds"]) == ["evaluate oracle, SNR inf"]
    assert (out / "evals" / "snrinf" / "raw.json").read_text() == raw_json
    # anything else that changes the data or the models is still refused
    assert main([*small, "--methods", "raw", "--seed", "1"]) == 2
    assert "other settings" in capsys.readouterr().err
