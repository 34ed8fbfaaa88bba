"""A full disk in the middle of a write: one line, exit code 2, and no file left behind (issue 19).

The disk is filled with the file-size limit (RLIMIT_FSIZE, ``ulimit -f``) of a child process:
every write past the limit fails with EFBIG as it would with ENOSPC on a full disk, without
needing a tmpfs mount.  ``check_free_space`` reads the same limit and refuses before any work;
the "during the write" cases hide the limit from it, so the write itself fails half-way (the
case the pre-check cannot rule out: another process filling the disk while we write).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fake_twins import write_fake

# The child: lower the soft file-size limit, optionally hide it from the pre-check, run the CLI.
CHILD = """
import resource, sys
limit, hide = int(sys.argv[1]), sys.argv[2] == "hide"
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
if hide:
    real = resource.getrlimit
    resource.getrlimit = lambda which: (resource.RLIM_INFINITY,) * 2 if which == resource.RLIMIT_FSIZE else real(which)
from chemtwin.cli import main
sys.exit(main(sys.argv[3:]))
"""


def run_with_file_limit(argv, limit: int, hide: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(limit), "hide" if hide else "show", "-q",
                           *map(str, argv)], capture_output=True, text=True, env=env, timeout=120,
                          # ignored in the child: a write past the limit is then EFBIG, not a kill
                          preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from chemtwin.search.latents import write_latents
    from chemtwin.tagging import ChemTwin

    d = tmp_path_factory.mktemp("inputs")
    data = d / "data.h5"
    write_fake(data, n_groups=100, n_pixels=200, seed=3)  # 200 stars x 200 pixels: ~350 kB of output
    model = d / "model"
    ChemTwin(epochs=1, latent_dim=3, batch_size=32, decoder_hidden=(8,), adversary_hidden=(8,), val_fraction=0.0,
             device="cpu").fit(str(data), out_dir=model, progress=False)
    latents = write_latents(d / "z.h5", np.random.default_rng(0).normal(size=(200, 3)), group=np.arange(200) // 2)
    return {"data": data, "model": model, "latents": latents}


# command: (argv writing into the folder ``out``, file-size limit smaller than what it writes)
COMMANDS = {
    "generate": (lambda i, out: ["generate", "-o", out / "g.h5", "--n-groups", "20", "--threads", "1"], 64 * 1024),
    "augment": (lambda i, out: ["augment", i["data"], "-o", out / "a.h5", "--seed", "1"], 64 * 1024),
    "cannon-train": (lambda i, out: ["cannon", "train", i["data"], "--labels", "TEFF,LOGG,FE_H,MG_FE,SI_FE,CA_FE",
                                     "--out", out / "c.npz"], 16 * 1024),
    "embed": (lambda i, out: ["embed", i["model"], i["data"], "--out", out / "z.h5"], 4 * 1024),
    "cluster": (lambda i, out: ["cluster", i["latents"], "--out", out / "c.h5", "--min-cluster-size", "2"], 4 * 1024),
}


@pytest.mark.parametrize("hide", [False, True], ids=["refused-before", "during-the-write"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(inputs, tmp_path, command, hide):
    out = tmp_path / "out"
    out.mkdir()
    argv, limit = COMMANDS[command]
    result = run_with_file_limit(argv(inputs, out), limit, hide)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and re.match(r"^chemtwin [\w ]+: error: ", lines[0]), lines
    assert ("file-size limit" in lines[0]) if not hide else ("File too large" in lines[0]), lines[0]
    assert list(out.iterdir()) == [], f"left behind: {[p.name for p in out.iterdir()]}"
