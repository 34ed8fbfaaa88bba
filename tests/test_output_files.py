"""How outputs are written (chemtwin.core.files): nothing half-written, nobody else's file replaced,
and what a killed run left behind cleaned by the next run (issue 19)."""

from __future__ import annotations

import os
import signal
import time
import subprocess
import sys

import pytest

from chemtwin.cli import main
from chemtwin.core.files import atomic_output, scratch_path, temporary_path
from chemtwin.errors import InputError
from chemtwin.tagging.model_folder import remove_stale_temporaries


def dead_pid() -> int:
    """The PID of a process that has just ended (so no process runs under it, barring reuse)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_an_output_written_by_another_run_meanwhile_is_refused_not_replaced(tmp_path):
    out = tmp_path / "labels.h5"
    with pytest.raises(InputError, match="written by another run meanwhile"):
        with atomic_output(out, overwrite=False) as tmp:
            tmp.write_bytes(b"mine")
            out.write_bytes(b"theirs")  # the other run renames its file in while this one writes
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.h5"]


def test_overwrite_replaces_and_a_failed_block_leaves_nothing(tmp_path):
    out = tmp_path / "z.h5"
    out.write_bytes(b"old")
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "other.h5") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the run fails half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.h5"]


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "g.h5"
    stale = tmp_path / f".g.h5.tmp-{dead_pid()}"
    live = tmp_path / f".g.h5.tmp-{os.getppid()}"  # our parent runs
    stale_scratch = tmp_path / f".g.h5.spectra-{dead_pid()}.h5"
    stale_scratch_tmp = tmp_path / f"..g.h5.spectra-{dead_pid()}.h5.tmp-{dead_pid()}"
    for p in (stale, live, stale_scratch, stale_scratch_tmp):
        p.write_bytes(b"x")
    assert temporary_path(out).name == f".g.h5.tmp-{os.getpid()}"
    assert scratch_path(out, "spectra").name == f".g.h5.spectra-{os.getpid()}.h5"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_only_safetensors_temporaries_are_removed_from_a_model_folder(tmp_path):
    header = b'{"__metadata__":{}}'
    (tmp_path / ".tmpAb12Cd").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    (tmp_path / ".tmpEf34Gh").write_bytes(b"")  # killed before the first byte
    (tmp_path / ".tmpIj56Kl").write_bytes(b"the user's own notes, not a safetensors file")
    (tmp_path / "config.json").write_text("{}")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpIj56Kl", "config.json"]


def test_sigterm_removes_the_temporary_file_and_exits_143(tmp_path):
    """A batch system's stop (SIGTERM) cleans up like Ctrl-C: no temporary file stays."""

    out = tmp_path / "g.h5"
    p = subprocess.Popen([sys.executable, "-m", "chemtwin", "-q", "generate", "-o", str(out), "--n-groups", "400",
                          "--threads", "1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline and not any(tmp_path.glob(".g.h5.tmp-*")):
        time.sleep(0.01)
    assert p.poll() is None, "generate ended before its temporary file was seen"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "chemtwin generate: terminated"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_that_a_library_turned_into_its_own_error_still_stops_cleanly(monkeypatch, capsys, signum, code, word):
    """h5py turns an exception raised inside its conversion callbacks into a TypeError: a SIGTERM landing
    there must still end the command as terminated (exit 143, one line), not as a traceback."""
    import chemtwin.cli.info as info

    def run(args):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
        except KeyboardInterrupt:
            raise TypeError("Operation not defined for data type class") from None
        return 0

    monkeypatch.setattr(info, "run", run)
    # the handlers the command found (SIGINT is ignored under `nohup cmd &`, not Python's default)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["info", "x.h5"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [f"chemtwin info: {word}"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
