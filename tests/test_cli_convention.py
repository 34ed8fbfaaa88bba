"""One command-line convention (issue 17, item 6): outputs by -o/--out, -q/-v everywhere, --device
where torch runs, lists comma-separated, stars by APOGEE_ID or row, progress bars only on a
terminal, third-party INFO lines silenced, the training bar explained."""

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from chemtwin.cli import build_parser, main
from chemtwin.cli.arguments import leaf_parsers, progress_bars, resolve_output, wants_progress
from chemtwin.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "apogee"
if not FIXTURES.is_dir():
    FIXTURES = Path("/work/shared/fixtures/apogee")
# The commands that run torch models and can use a GPU.
TORCH_COMMANDS = {"bench", "train", "embed", "evaluate", "payne train"}


def options(parser) -> set:
    return {o for a in parser._actions for o in a.option_strings}


@pytest.fixture(scope="module")
def commands():
    return dict(leaf_parsers(build_parser()))


def test_every_command_nested_ones_too_takes_out_quiet_and_verbose(commands):
    assert {"payne train", "payne fit", "cannon train", "cannon test", "generate", "info", "search"} <= set(commands)
    assert "payne" not in commands and "cannon" not in commands  # groups, not commands
    for name, parser in commands.items():
        have = options(parser)
        assert {"-o", "--out", "-q", "--quiet", "-v", "--verbose"} <= have, name
        if name in TORCH_COMMANDS:
            assert "--device" in have, name
            device = next(a for a in parser._actions if "--device" in a.option_strings)
            assert (device.type or str)("auto") == "auto" and (device.choices is None or "auto" in device.choices), name


def test_quiet_before_or_after_the_command(tmp_path, commands):
    parser = build_parser()
    before = parser.parse_args(["-q", "info", "x.h5"])
    after = parser.parse_args(["info", "x.h5", "-q"])
    neither = parser.parse_args(["info", "x.h5"])
    assert before.quiet and after.quiet and not neither.quiet
    assert parser.parse_args(["info", "x.h5", "-v"]).verbose


def test_positional_outputs_are_deprecated_aliases_of_out(caplog):
    parser = build_parser()
    for argv in (["generate", "-o", "a.h5"], ["generate", "--out", "a.h5"], ["generate", "a.h5"],
                 ["augment", "in.h5", "a.h5", "--seed", "1"], ["augment", "in.h5", "-o", "a.h5", "--seed", "1"],
                 ["bench", "a.h5"], ["bench", "-o", "a.h5"]):
        args = parser.parse_args(argv)
        with caplog.at_level(logging.WARNING):
            resolve_output(args)
        assert args.out == "a.h5", argv
    assert "deprecated" in caplog.text
    both = parser.parse_args(["generate", "a.h5", "-o", "b.h5"])
    with pytest.raises(InputError, match="two outputs"):
        resolve_output(both)
    same = parser.parse_args(["generate", "a.h5", "-o", "a.h5"])
    resolve_output(same)
    assert same.out == "a.h5"


def test_a_missing_or_doubled_output_is_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", "--n-groups", "1"]) == 2
    assert capsys.readouterr().err == "chemtwin generate: error: the following arguments are required: -o/--out\n"
    assert main(["generate", str(tmp_path / "a.h5"), "-o", str(tmp_path / "b.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two outputs" in err
    assert not list(tmp_path.iterdir())


def test_lists_are_comma_separated_and_the_old_forms_still_work():
    parser = build_parser()
    for argv in (["--labels", "TEFF,LOGG,FE_H"], ["--labels", "TEFF", "LOGG", "FE_H"],
                 ["--labels", "TEFF,LOGG", "--labels", "FE_H"]):
        args = parser.parse_args(["cannon", "train", "d.h5", "-o", "m.npz"] + argv)
        assert args.labels == ["TEFF", "LOGG", "FE_H"], argv
    args = parser.parse_args(["search", "idx", "--star", "2M1,2M2", "--star", "2M3"])
    assert args.star == ["2M1", "2M2", "2M3"]
    args = parser.parse_args(["plot-spectra", "d.h5", "--star", "0,2M00242666+5341178", "--index", "3", "-o", "p.png"])
    assert args.index == [0, "2M00242666+5341178", 3]
    assert parser.parse_args(["payne", "fit", "e.npz", "d.h5", "-o", "l.h5", "--label-names", "TEFF,LOGG"]).label_names == ["TEFF", "LOGG"]


def test_parallelism_has_one_name():
    parser = build_parser()
    assert parser.parse_args(["cluster", "z.h5", "-o", "c.h5", "--threads", "3"]).n_jobs == 3
    assert parser.parse_args(["cluster", "z.h5", "-o", "c.h5", "--n-jobs", "3"]).n_jobs == 3  # the old name
    for name, command in dict(leaf_parsers(parser)).items():
        assert not {"--n-jobs", "--jobs", "--processes"} & (options(command) - {"--n-jobs"} if name == "cluster"
                                                             else options(command)), name


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_bars(False) and not progress_bars(True)
    monkeypatch.setattr(sys, "stderr", Tty())
    assert progress_bars(False) and not progress_bars(True)
    parser = build_parser()
    args = parser.parse_args(["-q", "info", "x.h5"])
    assert not wants_progress(args)


def test_main_silences_third_party_info(tmp_path):
    logging.getLogger("distributed").setLevel(logging.NOTSET)
    assert main(["info", str(tmp_path / "missing.h5")]) == 2
    for name in ("distributed", "fontTools", "matplotlib", "h5py", "numexpr"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name


def test_train_help_explains_the_progress_bar(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in ("step =", "rec =", "adv_ce =", "adv_acc =", "lam =", "val_rank0 ="):
        assert field in text, field


def test_info_writes_its_summary_with_out(tmp_path, capsys):
    from chemtwin.data.dataset_writer import DatasetWriter

    data = tmp_path / "d.h5"
    with DatasetWriter(data, np.linspace(15100, 15200, 5), ["TEFF", "LOGG"], with_star_id=True) as w:
        w.append(np.ones((3, 5)), np.ones((3, 5)), np.array([[4500, 2.0], [4600, 2.5], [4700, 3.0]]),
                 np.array([0, 0, 1]), ["2M_A", "2M_B", "2M_C"])
    assert main(["info", str(data), "-o", str(tmp_path / "info.txt")]) == 0
    assert "stars       3" in (tmp_path / "info.txt").read_text() and "stars" not in capsys.readouterr().out
    assert main(["info", str(data), "-o", str(tmp_path / "info.txt")]) == 2  # no --overwrite
    png = tmp_path / "p.png"
    assert main(["plot-spectra", str(data), "--star", "2M_C,0", "-o", str(png), "--range", "15100", "15200"]) == 0
    assert png.stat().st_size > 0
    assert main(["plot-spectra", str(data), "--star", "2M_X", "-o", str(tmp_path / "q.png")]) == 2
    assert "no such star id" in capsys.readouterr().err


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="real APOGEE fixtures not found")
def test_the_readme_python_snippet_runs_on_the_real_fixtures(monkeypatch, capsys):
    import torch

    torch.set_num_threads(1)
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\nimport glob")
    code = readme[start + len("```python\n"): readme.index("```", start + 10)]
    assert len([line for line in code.splitlines() if line.strip()]) <= 16  # imports + ten lines
    monkeypatch.chdir(FIXTURES.parent)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("nearest twin 2M" in line for line in lines)
