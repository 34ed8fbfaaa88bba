"""Fuzz campaign: thousands of corrupted or adversarial inputs through every chemtwin command.

    python benchmarks/fuzz_campaign.py --out /work/out/fuzz [--cases N] [--only CASE_ID ...]
        [--category C ...] [--jobs 2] [--seed S] [--subprocess] [--keep] [--list] [--rerun] [--full]

Builds small valid seed inputs once (benchmarks/fuzz_seeds.py), derives the case list
(benchmarks/fuzz_cases.py, mutations in benchmarks/fuzz_mutations.py; deterministic from
``--seed``), runs every case and classifies it:

* primary outcome: ``ok_exit0``; ``clean_error`` (exit 2 and exactly one ``chemtwin ...: error:``
  line on stderr besides log records, argparse usage and the documented list of skipped files);
  ``messy_error`` (exit 2 with anything else on stderr); ``exit1`` (exit 1 without a traceback:
  the documented "some files were skipped"); ``traceback`` (a Python traceback on stderr, or
  exit 1 with one); ``crash`` (killed by a signal or exit >= 128); ``hang`` (over the case's
  timeout); ``other_exit``; ``prep_error`` (the campaign failed to build the case: a bug here).
* flags from the checks after the run: ``accepted_bad`` (exit 0 on an input the case marks bad),
  ``refused_valid`` (a control or a documented-masked input refused), ``leftover`` (temporary
  files ``.*.tmp-*``, ``.tmp*``, ``*.spectra-PID.h5``, ``tmp*`` left behind), ``overwrote_foreign``
  (a file that existed before the run and is not the command's own changed or vanished),
  ``unflagged_nonfinite`` (an output HDF5/npz/JSON/safetensors holds NaN/inf and no flag column
  marks those rows), ``nonfinite_flagged`` (NaN rows marked by ``converged`` False or a ``*flag*``
  column, or NaN dataset labels exactly where an input dataset has them: docs/dataset.md's
  "unknown" label, passed on; the documented conventions, counted apart), ``wrote_on_failure`` (a failed run left a
  new output file), ``nondeterministic`` (determinism trials).
* a byte flip in an HDF5 file that changes no value the file holds (free space, padding, unused
  B-tree slots: every object, attribute and value reads back as before) makes the case expect
  ``any``, and its record says ``content_unchanged``: no reader can, or needs to, tell.

How a case runs: the parent imports chemtwin.cli, torch, h5py, FAISS, scikit-learn, matplotlib
and astropy once, then forks a child per case that prepares the inputs, then calls
``chemtwin.cli.main(argv)`` with stdout/stderr in files, a fresh session (killed as a group on
timeout, after faulthandler dumped its stack: SIGUSR1), one torch thread, an address-space limit
(parent's + 4 GiB) and TMPDIR inside the case folder.  ``--subprocess`` (and the race, signal,
kill and determinism cases) run ``python -m chemtwin`` instead.  Full disk: a small tmpfs
mounted over the output folder when this process may mount (root in a container), and
``RLIMIT_FSIZE`` (with SIGXFSZ ignored, so writes fail with EFBIG) otherwise and additionally;
read-only folder: a read-only bind mount.  The summary records which were used.

Per-case JSON lines go to OUT/results.jsonl as cases finish (a rerun skips cases already there;
``--rerun`` starts over), the case list to OUT/cases.jsonl, counts per category x outcome to
OUT/summary.json, and the table to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: the children run one thread each
os.environ.setdefault("MPLBACKEND", "Agg")

import fuzz_cases  # noqa: E402
import fuzz_seeds  # noqa: E402

PRIMARY = ("ok_exit0", "clean_error", "messy_error", "exit1", "traceback", "crash", "hang", "other_exit", "prep_error")
FLAGS = ("accepted_bad", "refused_valid", "leftover", "overwrote_foreign", "unflagged_nonfinite", "nonfinite_flagged",
         "wrote_on_failure", "nondeterministic")
FAILURES = ("messy_error", "traceback", "crash", "hang", "other_exit", "prep_error", "accepted_bad", "refused_valid",
            "leftover", "overwrote_foreign", "unflagged_nonfinite", "wrote_on_failure")
LEFTOVER = re.compile(r"^\..+\.tmp-\d+|^\.tmp|\.tmp$|^\..+\.spectra-\d+\.h5$|^tmp[\w-]{6,}$|^chemtwin-\w+$")
INTERNAL = ("_content_unchanged", "_stdout", "_stderr", "_before.json", "_tmpdir", "_rerun_stdout", "_rerun_stderr", "_second_stdout",
            "_second_stderr")
FRAME = re.compile(r'File "([^"]+)", line (\d+),? in (\S+)')
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: |^WARNING: .*\[[\w.]+\]$")  # ours; astropy's
ERROR_LINE = re.compile(r"^chemtwin [\w -]+: error: ")
SKIP_HEAD = re.compile(r"^chemtwin [\w -]+: \d+ of \d+ file\(s\) skipped:$")
PY_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


# ------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict:
    """relpath -> [type, size, sha256] of everything under ``root`` (symlinks not followed)."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in INTERNAL]
        for name in dirnames + filenames:
            if rel_dir == "." and name in INTERNAL:
                continue
            p = Path(dirpath) / name
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = p.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["link", 0, os.readlink(p)]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir", 0, ""]
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ["file", st.st_size, _hash(p) if st.st_size < (256 << 20) else f"mtime:{st.st_mtime_ns}"]
            else:
                out[rel] = ["special", 0, oct(st.st_mode)]
    return out


def seed_stamp(seed_dir: Path) -> dict:
    return {k: v for k, v in snapshot(seed_dir).items()}


# ------------------------------------------------------------------ classifying a run
def classify_stderr(rc: int | None, err: str, timed_out: bool) -> tuple[str, dict]:
    info: dict = {}
    frames = FRAME.findall(err)
    if frames:
        chem = [f for f in frames if "/chemtwin/" in f[0]]
        if chem:
            path, line, func = chem[-1]
            info["where"] = f"{path[path.index('chemtwin/'):]}:{func}"
            info["where_line"] = int(line)
        path, line, func = frames[-1]
        short = path.split("site-packages/")[-1] if "site-packages/" in path else path.split("/src/")[-1]
        info["origin"] = f"{short}:{func}"
    if "Traceback (most recent call last)" in err:
        block = err[err.rindex("Traceback (most recent call last)"):].splitlines()
        exc = next((line for line in block[1:] if line and not line.startswith(" ")), "")
        info["exc"] = exc[:300]
    if timed_out:
        return "hang", info
    if rc is None or rc < 0 or rc >= 128:
        sig = -rc if rc is not None and rc < 0 else (rc - 128 if rc else None)
        if sig:
            try:
                info["exc"] = f"signal {signal.Signals(sig).name}"
            except ValueError:
                info["exc"] = f"signal {sig}"
        return "crash", info
    if "Traceback (most recent call last)" in err:
        return "traceback", info
    if rc == 0:
        return "ok_exit0", info
    if rc == 1:
        return "exit1", info
    if rc == 2:
        errors, residue, in_usage, in_skip, in_warning = [], [], False, False, False
        for line in err.splitlines():
            if not line.strip() or LOG_LINE.match(line) or "\r" in line:
                in_warning = False
                continue
            if ERROR_LINE.match(line):
                errors.append(line)
                in_usage = in_skip = False
                continue
            if line.startswith("usage: "):
                in_usage = True
                continue
            if SKIP_HEAD.match(line):
                in_skip = True
                continue
            if PY_WARNING.match(line):
                in_warning = True
                continue
            if line.startswith(" ") and (in_usage or in_skip or in_warning):
                continue
            residue.append(line)
        if errors:
            info["exc"] = errors[-1][:300]
        if len(errors) == 1 and not residue:
            return "clean_error", info
        info["residue"] = residue[:5]
        return "messy_error", info
    return "other_exit", info


FLAG_NAMES = re.compile(r"flag", re.I)
GOOD_NAMES = {"converged", "usable", "ok", "valid", "good"}


def _flag_rows(arrays: dict, n: int):
    """Boolean rows marked bad by a flag array of length n (None when there is none)."""
    marked = None
    for name, a in arrays.items():
        base = name.split("/")[-1].lower()
        if a.shape[:1] != (n,) or a.dtype.kind not in "biu":
            continue
        if FLAG_NAMES.search(base):
            m = a.reshape(n, -1).any(1)
        elif base in GOOD_NAMES:
            m = ~a.reshape(n, -1).astype(bool).all(1)
        else:
            continue
        marked = m if marked is None else marked | m
    return marked


def _input_label_nans(case_dir: Path, files: list[str]) -> list:
    """NaN masks of the ``labels`` of the dataset files among ``files`` (the case's inputs)."""
    import h5py
    import numpy as np

    masks = []
    for rel in files:
        path = case_dir / rel
        try:
            if not h5py.is_hdf5(path):
                continue
            with h5py.File(path, "r") as f:
                labels = f.get("labels")
                if isinstance(labels, h5py.Dataset) and "flux" in f and labels.dtype.kind == "f" and labels.size <= 20_000_000:
                    masks.append(np.isnan(labels[()]))
        except Exception:  # a damaged input is the case's business, not a source of known NaNs
            continue
    return masks


def nonfinite_report(path: Path, input_label_nans: list = ()) -> list[dict]:
    """Arrays of an output file with non-finite values: [{array, n, flagged}] (ivar = +inf is a noiseless
    pixel; NaN dataset labels where an input dataset had them are a passed-on "unknown")."""
    import numpy as np

    arrays: dict = {}
    name = path.name.lower()
    try:
        if name.endswith(".json"):
            bad = []
            json.loads(path.read_text(), parse_constant=lambda c: bad.append(c))
            return [{"array": "json", "n": len(bad), "flagged": False}] if bad else []
        if name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
        elif name.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            import h5py

            if not h5py.is_hdf5(path):
                return []
            with h5py.File(path, "r") as f:
                def visit(n, obj):
                    if isinstance(obj, h5py.Dataset) and obj.size <= 20_000_000 and obj.dtype.kind in "fcbiu" \
                            and obj.external is None:
                        arrays[n] = obj[()]
                f.visititems(visit)
    except Exception as exc:  # an unreadable output is reported, not fatal to the campaign
        return [{"array": f"unreadable ({exc.__class__.__name__})", "n": 1, "flagged": False}]
    found = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fc" or a.size == 0:
            continue
        bad = np.isnan(a) | np.isneginf(a) if key.split("/")[-1] == "ivar" else ~np.isfinite(a)
        if not bad.any():
            continue
        flagged = key == "labels" and "flux" in arrays and any(
            m.shape == a.shape and not (bad & ~m).any() and not np.isinf(a).any() for m in input_label_nans)
        if a.ndim >= 1 and not flagged:
            rows = bad.reshape(a.shape[0], -1).any(1)
            marked = _flag_rows(arrays, a.shape[0])
            flagged = marked is not None and bool(np.all(marked[rows]))
        found.append({"array": key, "n": int(bad.sum()), "flagged": flagged})
    return found


def post_check(c: dict, case_dir: Path, before: dict, primary: str, own: list[str]) -> dict:
    after = snapshot(case_dir)
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    removed = sorted(set(before) - set(after))
    own_rel = [os.path.normpath(os.path.relpath(o.rstrip("/"), case_dir)) for o in own if o.startswith(str(case_dir))]

    def is_own(rel):
        return any(rel == o or rel.startswith(o + os.sep) for o in own_rel)

    leftovers = [k for k in new if LEFTOVER.search(os.path.basename(k))]
    tmpdir = case_dir / "_tmpdir"
    if tmpdir.is_dir():  # torch's compile cache is torch's, reused by every run
        leftovers += [f"_tmpdir/{p.name}" for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")]
    foreign = [k for k in changed + removed if not is_own(k)]
    outputs = [k for k in new if k not in leftovers and after[k][0] == "file" and not k.startswith("elsewhere")]
    nonfinite = {}
    input_label_nans = _input_label_nans(case_dir, [k for k in before if before[k][0] == "file"])
    for k in outputs + [k for k in changed if is_own(k) and after[k][0] == "file"]:
        rep = nonfinite_report(case_dir / k, input_label_nans)
        if rep:
            nonfinite[k] = rep
    flags = []
    if leftovers:
        flags.append("leftover")
    if foreign:
        flags.append("overwrote_foreign")
    if any(not r["flagged"] for reps in nonfinite.values() for r in reps):
        flags.append("unflagged_nonfinite")
    elif nonfinite:
        flags.append("nonfinite_flagged")
    if primary not in ("ok_exit0", "exit1") and outputs and c["kind"] == "plain":
        flags.append("wrote_on_failure")
    return {"flags": flags, "new": new[:12], "changed": (changed + removed)[:12], "leftovers": leftovers[:12],
            "foreign": foreign[:12], "nonfinite": nonfinite}


def expectation_flags(c: dict, primary: str) -> list[str]:
    if c["expect"] == "bad" and primary == "ok_exit0":
        return ["accepted_bad"]
    if c["expect"] in ("valid", "masked") and primary != "ok_exit0":
        return ["refused_valid"]
    return []


# ------------------------------------------------------------------ running a case
class Env:
    """What every run needs: seed paths, the read-only folder, limits, how to mount."""

    def __init__(self, out: Path, seeds: dict, ro_dir: str | None, can_mount: bool, subprocess_mode: bool):
        self.out, self.seeds, self.ro_dir, self.can_mount = out, seeds, ro_dir, can_mount
        self.subprocess_mode = subprocess_mode


def _address_limit() -> int:
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:")) * 1024
    return vm + (4 << 30)


def _child(c: dict, case_dir: Path, env: Env, argv: list[str]) -> None:
    """In the forked child: prepare, snapshot, limits, redirect, run; never returns."""
    code = 99
    try:
        os.setsid()
        os.chdir(case_dir)
        try:
            fuzz_cases.prepare(c, env.seeds, case_dir, env.ro_dir)
        except Exception:
            import traceback

            (case_dir / "_prep_error").write_text(traceback.format_exc())
            os._exit(97)
        (case_dir / "_before.json").write_text(json.dumps(snapshot(case_dir)))
        tmpdir = case_dir / "_tmpdir"
        tmpdir.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(tmpdir)
        import resource
        import tempfile

        tempfile.tempdir = None
        out_fd = os.open(case_dir / "_stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err_fd = os.open(case_dir / "_stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(null_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        limit = _address_limit()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if c.get("disk") and c["disk"]["kind"] == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (c["disk"]["bytes"], c["disk"]["bytes"]))
        if env.subprocess_mode or c.get("mode") == "subprocess":
            os.environ["PYTHONFAULTHANDLER"] = "1"
            os.execv(sys.executable, [sys.executable, "-m", "chemtwin", "-q", *argv])
        import faulthandler

        faulthandler.enable(file=sys.stderr)
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        import torch

        torch.set_num_threads(1)
        from chemtwin.cli import main

        try:
            code = int(main(["-q", *argv]) or 0)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Running:
    def __init__(self, c, pid, case_dir, argv, own, mounted):
        self.c, self.pid, self.case_dir, self.argv, self.own, self.mounted = c, pid, case_dir, argv, own, mounted
        self.start = time.monotonic()


def start_case(c: dict, env: Env) -> Running:
    case_dir = env.out / "cases" / c["id"].replace("/", "__")
    if case_dir.exists():
        _umount(case_dir / "disk")
        shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    mounted = False
    if c.get("disk") and c["disk"]["kind"] == "tmpfs":
        # A tmpfs of one page more than the free space asked for, that page taken by a filler
        # file (tmpfs counts whole pages; folders cost none).
        free = c["disk"]["bytes"]
        mounted = _mount_tmpfs(case_dir / "disk", free + 4096)
        if mounted:
            (case_dir / "disk" / "filler.bin").write_bytes(bytes(4096))
    argv = [fuzz_cases.fill(a, env.seeds, case_dir, env.ro_dir) for a in c["argv"]]
    own = [fuzz_cases.fill(a, env.seeds, case_dir, env.ro_dir) for a in c["own"]]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(c, case_dir, env, argv)
    return Running(c, pid, case_dir, argv, own, mounted)


def _read(path: Path, limit: int = 200_000) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
        return data.decode("utf-8", "replace")
    except OSError:
        return ""


def finish_case(r: Running, status: int | None, timed_out: bool, env: Env, keep: bool) -> dict:
    c, case_dir = r.c, r.case_dir
    wall = time.monotonic() - r.start
    rc = None if status is None else (os.waitstatus_to_exitcode(status))
    rec = {"id": c["id"], "category": c["category"], "command": c["command"], "expect": c["expect"],
           "argv": r.argv, "rc": rc, "wall_s": round(wall, 3)}
    if rc == 97 and (case_dir / "_prep_error").exists():
        rec.update(primary="prep_error", flags=[], exc=_read(case_dir / "_prep_error").strip().splitlines()[-1][:300])
    else:
        err = _read(case_dir / "_stderr")
        primary, info = classify_stderr(rc, err, timed_out)
        before = json.loads(_read(case_dir / "_before.json") or "{}")
        if (case_dir / fuzz_cases.mut.UNCHANGED_MARK).exists():
            c = dict(c, expect="any")  # the flip changed no value the file holds (fuzz_mutations.hdf5_content)
            rec.update(expect="any", content_unchanged=True)
        check = post_check(c, case_dir, before, primary, r.own)
        rec.update(primary=primary, **info, flags=expectation_flags(c, primary) + check.pop("flags"), **check,
                   stderr_tail=err[-700:], stdout_tail=_read(case_dir / "_stdout")[-300:])
    if r.mounted:
        _umount(case_dir / "disk")
        rec["disk"] = c["disk"]
    elif c.get("disk"):
        rec["disk"] = dict(c["disk"], mounted=False)
    if not keep:
        shutil.rmtree(case_dir, ignore_errors=True)
    return rec


def run_pool(cases: list[dict], env: Env, jobs: int, keep: bool, sink) -> None:
    pending = list(cases)
    running: dict[int, Running] = {}
    while pending or running:
        while pending and len(running) < jobs:
            r = start_case(pending.pop(0), env)
            running[r.pid] = r
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid and pid in running:
            sink(finish_case(running.pop(pid), status, False, env, keep))
            continue
        now = time.monotonic()
        for pid, r in list(running.items()):
            if now - r.start > r.c["timeout"]:
                try:
                    os.kill(pid, signal.SIGUSR1)  # faulthandler: where it hangs
                    time.sleep(1.0)
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                running.pop(pid)
                sink(finish_case(r, status, True, env, keep))
        time.sleep(0.01)


# ------------------------------------------------------------------ special runners (subprocesses)
def _cli_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "chemtwin", "-q", *argv]


def _popen(argv, case_dir: Path, tag: str, extra_env=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONFAULTHANDLER="1", TMPDIR=str(case_dir / "_tmpdir"), **(extra_env or {}))
    (case_dir / "_tmpdir").mkdir(exist_ok=True)
    out = open(case_dir / f"_{tag}stdout", "wb")
    err = open(case_dir / f"_{tag}stderr", "wb")
    return subprocess.Popen(_cli_cmd(argv), cwd=case_dir, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def _wait(p: subprocess.Popen, timeout: float) -> tuple[int | None, bool]:
    try:
        return p.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return p.wait(), True


def _special_dir(c: dict, env: Env) -> Path:
    case_dir = env.out / "cases" / c["id"].replace("/", "__")
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    return case_dir


_WORST = {p: k for k, p in enumerate(("ok_exit0", "exit1", "clean_error", "other_exit", "messy_error", "traceback",
                                      "crash", "hang", "prep_error"))}


def run_race(c: dict, env: Env) -> dict:
    case_dir = _special_dir(c, env)
    argv = [fuzz_cases.fill(a, env.seeds, case_dir, env.ro_dir) for a in c["argv"]]
    before = snapshot(case_dir)
    t0 = time.monotonic()
    procs = [_popen(argv, case_dir, ""), _popen(argv, case_dir, "second_")]
    results = [_wait(p, c["timeout"]) for p in procs]
    outs = []
    for (rc, timed_out), tag in zip(results, ("", "second_")):
        outs.append(classify_stderr(rc, _read(case_dir / f"_{tag}stderr"), timed_out) + (rc,))
    primary = max((o[0] for o in outs), key=_WORST.__getitem__)
    info = next((o[1] for o in outs if o[0] == primary), {})
    check = post_check(c, case_dir, before, primary, [])
    flags = [f for f in check.pop("flags") if f != "wrote_on_failure"]
    if all(o[0] == "ok_exit0" for o in outs):
        flags.append("accepted_bad")
    rec = {"id": c["id"], "category": c["category"], "command": c["command"], "expect": c["expect"], "argv": argv,
           "rc": [o[2] for o in outs], "wall_s": round(time.monotonic() - t0, 3), "primary": primary, **info,
           "flags": flags, **check, "stderr_tail": _read(case_dir / "_second_stderr")[-500:]}
    shutil.rmtree(case_dir, ignore_errors=True)
    return rec


def run_signal(c: dict, env: Env) -> dict:
    """Send SIGKILL/TERM/INT when the first temporary file appears; then rerun the same command."""
    case_dir = _special_dir(c, env)
    rng = random.Random(c["rng"])
    argv = [fuzz_cases.fill(a, env.seeds, case_dir, env.ro_dir) for a in c["argv"]]
    before = snapshot(case_dir)
    t0 = time.monotonic()
    p = _popen(argv, case_dir, "")
    seen, sent_at = None, None
    while p.poll() is None and time.monotonic() - t0 < c["timeout"]:
        for dirpath, _, filenames in os.walk(case_dir):
            rel = os.path.relpath(dirpath, case_dir)
            if rel.startswith("_tmpdir"):
                continue
            for name in filenames:
                if name.startswith(".") and name != ".progress.jsonl":
                    seen = os.path.normpath(os.path.join(rel, name))
        if seen:
            time.sleep(rng.uniform(0, 0.05))
            sent_at = round(time.monotonic() - t0, 3)
            try:
                os.killpg(p.pid, getattr(signal, "SIG" + c["signal"]))
            except ProcessLookupError:
                pass
            break
        time.sleep(0.002)
    rc, timed_out = _wait(p, 60)
    err = _read(case_dir / "_stderr")
    primary, info = classify_stderr(rc, err, timed_out)
    if primary == "crash" and rc in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
        primary = "interrupted"  # what the signal asked for; the checks below judge the clean-up
    after_signal = snapshot(case_dir)
    left_after_signal = [k for k in set(after_signal) - set(before) if LEFTOVER.search(os.path.basename(k))]
    # The rerun: the same command (with --overwrite when the first run finished or left a model folder).
    rerun_argv = argv + (["--overwrite"] if "--workers" not in argv else [])
    p2 = _popen(rerun_argv, case_dir, "rerun_")
    rc2, timed_out2 = _wait(p2, c["timeout"])
    primary2, info2 = classify_stderr(rc2, _read(case_dir / "_rerun_stderr"), timed_out2)
    check = post_check(c, case_dir, before, primary2, [str(case_dir)])
    flags = [f for f in check.pop("flags") if f not in ("wrote_on_failure", "overwrote_foreign")]
    if c["signal"] in ("TERM", "INT") and left_after_signal and "leftover" not in flags:
        flags.append("leftover")
    if primary2 != "ok_exit0":
        flags.append("refused_valid")
    rec = {"id": c["id"], "category": c["category"], "command": c["command"], "expect": c["expect"], "argv": argv,
           "rc": rc, "rerun_rc": rc2, "signal": c["signal"], "temp_seen": seen, "sent_at_s": sent_at,
           "leftovers_after_signal": sorted(left_after_signal)[:12], "signal_run_primary": primary,
           "primary": primary if primary in ("traceback", "hang") else primary2,
           "rerun_primary": primary2, **{k: v for k, v in info.items()}, "flags": flags, **check,
           "wall_s": round(time.monotonic() - t0, 3), "stderr_tail": err[-500:],
           "rerun_stderr_tail": _read(case_dir / "_rerun_stderr")[-500:]}
    if seen is None:
        rec["note"] = "the run ended before a temporary file was seen; nothing was sent"
    shutil.rmtree(case_dir, ignore_errors=True)
    return rec


def _history(path: Path) -> list[dict]:
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _max_weight_diff(a: Path, b: Path) -> float:
    import numpy as np

    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        return float("inf")
    return max((float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)))) if ta[k].size else 0.0)
               for k in ta)


KILL_TRAIN = ["train", "{train_big}", "--epochs", "6", "--seed", "3", "--threads", "1", "--batch-size", "64",
              "--latent-dim", "8"]
LOSS_COLUMNS = ("train_loss", "train_recon", "train_adv_ce", "val_recon", "val_swap")


def _kill_reference(env: Env) -> tuple[Path, float, float]:
    ref = env.out / "kill-reference"
    stamp = ref / "done.json"
    if stamp.is_file():
        done = json.loads(stamp.read_text())
        return ref / "model", done["wall_s"], done.get("first_checkpoint_s", done["wall_s"] / 2)
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    argv = [fuzz_cases.fill(a, env.seeds, ref, None) for a in KILL_TRAIN] + ["--out", str(ref / "model")]
    t0 = time.monotonic()
    p = _popen(argv, ref, "")
    first = None
    while p.poll() is None:
        if first is None and (ref / "model" / "checkpoint.safetensors").exists():
            first = time.monotonic() - t0
        time.sleep(0.005)
    rc, _ = _wait(p, 600)
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"kill-9 reference training failed: {_read(ref / '_stderr')[-500:]}")
    stamp.write_text(json.dumps({"wall_s": wall, "first_checkpoint_s": first or wall / 2}))
    return ref / "model", wall, first or wall / 2


def run_kill_resume(c: dict, env: Env) -> dict:
    """kill -9 a training run (at a random moment, or while it writes a checkpoint), resume it,
    compare the loss curve and the weights with an uninterrupted run of the same seed."""
    ref_model, ref_wall, ref_first = _kill_reference(env)
    case_dir = _special_dir(c, env)
    rng = random.Random(c["rng"])
    model = case_dir / "model"
    argv = [fuzz_cases.fill(a, env.seeds, case_dir, None) for a in KILL_TRAIN] + ["--out", str(model)]
    t0 = time.monotonic()
    kills, checkpoint_checks = [], []
    n_kills = 2 if c["trial"] % 3 == 2 else 1
    rc = None
    for attempt in range(n_kills + 1):
        run_argv = argv + (["--resume"] if attempt else [])  # also when killed before the first checkpoint
        p = _popen(run_argv, case_dir, f"run{attempt}_")
        if attempt < n_kills:
            start = time.monotonic()
            if c["at"] == "checkpoint":
                target = rng.randint(1, 4)  # the n-th checkpoint write of this run
                count, was = 0, False
                while p.poll() is None and time.monotonic() - start < 300:
                    tmp = [n for n in os.listdir(model) if n.startswith(".")] if model.is_dir() else []
                    now = any("checkpoint" in n or n.startswith(".tmp") for n in tmp)
                    if now and not was:
                        count += 1
                        if count >= target:
                            time.sleep(rng.choice([0.0, 0.0, 0.001, 0.005]))  # mostly mid-write
                            break
                    was = now
                    time.sleep(0.0005)
                where = f"checkpoint write #{count}"
            else:
                delay = rng.uniform(0.8 * ref_first, 0.95 * ref_wall)  # while it trains, before it ends
                while p.poll() is None and time.monotonic() - start < delay:
                    time.sleep(0.01)
                where = f"{delay:.2f} s"
            if p.poll() is None:
                temp = sorted(n for n in os.listdir(model) if n.startswith(".")) if model.is_dir() else []
                os.killpg(p.pid, signal.SIGKILL)
                kills.append({"at": where, "t_s": round(time.monotonic() - start, 3), "temp_files_at_kill": temp})
            p.wait()
            ck = model / "checkpoint.safetensors"
            if ck.exists():
                try:
                    _tensors(ck)
                    checkpoint_checks.append("readable")
                except Exception as exc:
                    checkpoint_checks.append(f"unreadable: {exc.__class__.__name__}")
        else:
            rc, timed_out = _wait(p, c["timeout"])
    err = _read(case_dir / f"_run{n_kills}_stderr")
    primary, info = classify_stderr(rc, err, False)
    rec = {"id": c["id"], "category": "kill", "command": "train", "expect": "valid", "argv": argv, "rc": rc,
           "primary": primary, **info, "kills": kills, "checkpoint_after_kill": checkpoint_checks,
           "wall_s": round(time.monotonic() - t0, 3)}
    flags = []
    if primary != "ok_exit0":
        flags.append("refused_valid")
    else:
        ref_h, h = _history(ref_model / "history.csv"), _history(model / "history.csv")
        diffs = {}
        for col in LOSS_COLUMNS:
            pairs = [(float(a[col]), float(b[col])) for a, b in zip(ref_h, h) if a.get(col) and b.get(col)]
            pairs = [(x, y) for x, y in pairs if not (math.isnan(x) and math.isnan(y))]  # both undefined: equal
            if pairs:
                diffs[col] = max(abs(x - y) for x, y in pairs)
        rec["epochs"] = [len(ref_h), len(h)]
        rec["max_loss_diff"] = diffs
        rec["max_weight_diff"] = _max_weight_diff(ref_model / "model.safetensors", model / "model.safetensors")
        rec["bit_identical"] = rec["max_weight_diff"] == 0.0 and all(v == 0 for v in diffs.values())
        if len(ref_h) != len(h) or any(v > 1e-6 for v in diffs.values()):
            flags.append("nondeterministic")
    left = [n for n in os.listdir(model) if n.startswith(".")] if model.is_dir() else []
    left += [f"_tmpdir/{n}" for n in os.listdir(case_dir / "_tmpdir") if not n.startswith("torchinductor_")] \
        if (case_dir / "_tmpdir").is_dir() else []
    if left:
        flags.append("leftover")
        rec["leftovers"] = left
    if any(x != "readable" for x in checkpoint_checks):
        flags.append("refused_valid")
    rec["flags"] = flags
    shutil.rmtree(case_dir, ignore_errors=True)
    return rec


def run_determinism(c: dict, env: Env) -> dict:
    import h5py
    import numpy as np

    case_dir = _special_dir(c, env)
    name = c["id"].split("/")[-1]
    t0 = time.monotonic()
    S = env.seeds
    runs = {
        "generate-same-seed": [["generate", "-o", str(case_dir / f"g{k}.h5"), "--n-groups", "20", "--snr", "50", "--seed", "7",
                                "--threads", str(k + 1)] for k in range(2)],
        "train-same-seed": [["train", S["train"], "--out", str(case_dir / f"m{k}"), "--epochs", "3", "--seed", "5",
                             "--threads", "1"] for k in range(2)],
        "train-threads-1-vs-2": [["train", S["train"], "--out", str(case_dir / f"m{k}"), "--epochs", "3", "--seed", "5",
                                  "--threads", str(k + 1)] for k in range(2)],
        "embed-same-model": [["embed", S["model"], S["train"], "--out", str(case_dir / f"z{k}.h5")] for k in range(2)],
    }[name]
    rcs = []
    for k, argv in enumerate(runs):
        p = _popen(argv, case_dir, f"r{k}_")
        rcs.append(_wait(p, c["timeout"])[0])
    rec = {"id": c["id"], "category": "determinism", "command": c["command"], "expect": "valid", "argv": runs[0],
           "rc": rcs, "wall_s": round(time.monotonic() - t0, 3)}
    if any(rc != 0 for rc in rcs):
        rec.update(primary=classify_stderr(rcs[-1], _read(case_dir / "_r1_stderr"), False)[0], flags=["refused_valid"],
                   stderr_tail=_read(case_dir / "_r1_stderr")[-500:])
    else:
        if name.startswith("train"):
            diff = _max_weight_diff(case_dir / "m0" / "model.safetensors", case_dir / "m1" / "model.safetensors")
        else:
            files = [case_dir / (f"g{k}.h5" if name.startswith("generate") else f"z{k}.h5") for k in range(2)]
            with h5py.File(files[0]) as a, h5py.File(files[1]) as b:
                keys = [k for k in a if isinstance(a[k], h5py.Dataset) and a[k].dtype.kind in "fiu"]
                diff = max(float(np.max(np.abs(a[k][()].astype(float) - b[k][()].astype(float)))) if a[k].size else 0.0
                           for k in keys)
        rec.update(primary="ok_exit0", max_abs_diff=diff, flags=["nondeterministic"] if diff != 0 else [])
    shutil.rmtree(case_dir, ignore_errors=True)
    return rec


SPECIAL = {"race": run_race, "signal": run_signal, "kill_resume": run_kill_resume, "determinism": run_determinism}


# ------------------------------------------------------------------ summary
def _normalise(text: str) -> str:
    text = re.sub(r"(/[\w.\-+✓ ]+)+", "PATH", text or "")
    text = re.sub(r"0x[0-9a-f]+", "X", text)
    text = re.sub(r"\d+", "N", text)
    return text[:160]


def summarise(records: list[dict], meta: dict) -> dict:
    counts: dict = defaultdict(Counter)
    for r in records:
        row = counts[r["category"]]
        row["cases"] += 1
        row[r["primary"]] += 1
        for f in set(r.get("flags", [])):
            row[f] += 1
    total = Counter()
    for row in counts.values():
        total.update(row)
    signatures: dict = {}
    for r in records:
        kinds = [r["primary"]] if r["primary"] in FAILURES else []
        kinds += [f for f in r.get("flags", []) if f in FAILURES]
        for kind in kinds:
            if kind in ("traceback", "crash", "hang", "messy_error", "other_exit", "prep_error"):
                key = (kind, r.get("where") or r.get("origin") or r["command"], _normalise(r.get("exc", "")))
            else:
                key = (kind, r["command"], "")
            s = signatures.setdefault(key, {"kind": kind, "where": key[1], "exc": key[2], "count": 0, "example": r["id"],
                                            "categories": Counter(), "commands": Counter(), "origin": r.get("origin")})
            s["count"] += 1
            s["categories"][r["category"]] += 1
            s["commands"][r["command"]] += 1
    sig_list = sorted(signatures.values(), key=lambda s: (FAILURES.index(s["kind"]), -s["count"]))
    for s in sig_list:
        s["categories"], s["commands"] = dict(s["categories"]), dict(s["commands"])
    return {**meta, "n_cases": len(records), "counts": {k: dict(v) for k, v in sorted(counts.items())},
            "total": dict(total), "signatures": sig_list}


def table(summary: dict) -> str:
    cols = ["cases", *PRIMARY, "accepted_bad", "refused_valid", "leftover", "overwrote_foreign",
            "unflagged_nonfinite", "nonfinite_flagged", "wrote_on_failure", "nondeterministic"]
    short = {"ok_exit0": "exit0", "clean_error": "clean2", "messy_error": "messy2", "other_exit": "other",
             "traceback": "trace", "prep_error": "prep", "accepted_bad": "acc_bad", "refused_valid": "ref_ok", "overwrote_foreign": "foreign",
             "unflagged_nonfinite": "nan", "nonfinite_flagged": "nan_flag", "wrote_on_failure": "wrote_fail",
             "nondeterministic": "nondet"}
    head = f"{'category':<12}" + "".join(f"{short.get(c, c):>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for cat, row in summary["counts"].items():
        lines.append(f"{cat:<12}" + "".join(f"{row.get(c, 0):>9}" for c in cols))
    lines.append("-" * len(head))
    lines.append(f"{'total':<12}" + "".join(f"{summary['total'].get(c, 0):>9}" for c in cols))
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def _preimport() -> None:
    import importlib
    import pkgutil

    import astropy.io.fits  # noqa: F401
    import astropy.table  # noqa: F401
    import faiss  # noqa: F401
    import h5py  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import scipy.optimize  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.manifold  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    import torch  # noqa: F401

    import chemtwin
    import chemtwin.cli

    for mod in pkgutil.walk_packages(chemtwin.__path__, "chemtwin."):
        if not mod.name.endswith("__main__"):  # chemtwin.__main__ runs the CLI
            importlib.import_module(mod.name)
    chemtwin.cli.build_parser()


def _read_only_folder(out: Path) -> tuple[str | None, str]:
    src, ro = out / "ro-source", out / "read-only"
    src.mkdir(parents=True, exist_ok=True)
    ro.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(ro):
        return str(ro), "read-only bind mount"
    ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
    if ok:
        return str(ro), "read-only bind mount"
    os.chmod(ro, 0o555)
    return str(ro), "chmod 555 (not read-only for root: those cases are not meaningful here)"


def select(cases: list[dict], args) -> list[dict]:
    if args.only:
        wanted = set(args.only)
        chosen = [c for c in cases if c["id"] in wanted or any(c["id"].startswith(w.rstrip("*")) for w in wanted
                                                                if w.endswith("*"))]
        missing = wanted - {c["id"] for c in chosen} - {w for w in wanted if w.endswith("*")}
        if missing:
            raise SystemExit(f"unknown case id(s): {', '.join(sorted(missing))} (--list shows them)")
        return chosen
    if args.category:
        cases = [c for c in cases if c["category"] in args.category]
    if args.cases and args.cases < len(cases):
        # stratified: the same share of every category, drawn with the campaign seed
        rng = random.Random(args.seed)
        by_cat = defaultdict(list)
        for c in cases:
            by_cat[c["category"]].append(c)
        chosen = []
        for cat, items in by_cat.items():
            k = max(1, round(args.cases * len(items) / len(cases)))
            chosen += rng.sample(items, min(k, len(items)))
        picked = {c["id"] for c in chosen}
        rest = [c for c in cases if c["id"] not in picked]
        chosen += rng.sample(rest, max(0, min(args.cases - len(chosen), len(rest))))  # rounding fell short
        order = {c["id"]: k for k, c in enumerate(cases)}
        cases = sorted(chosen, key=lambda c: order[c["id"]])
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="campaign folder (seeds, cases.jsonl, results.jsonl, summary.json)")
    p.add_argument("--cases", type=int, default=None, help="run a stratified sample of N cases (default: all)")
    p.add_argument("--only", action="append", default=None, metavar="CASE_ID",
                   help="run these cases only (repeatable; a trailing * matches a prefix); prints each in full")
    p.add_argument("--category", action="append", default=None, help="run these categories only (repeatable)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2; at most 2 on the shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case list (default 0)")
    p.add_argument("--subprocess", action="store_true", help="run every case in a fresh interpreter (slow)")
    p.add_argument("--keep", action="store_true", help="keep every case folder (default: deleted after its checks)")
    p.add_argument("--list", action="store_true", help="print the case ids and counts, run nothing")
    p.add_argument("--rerun", action="store_true", help="ignore OUT/results.jsonl and run the selected cases again")
    p.add_argument("--full", action="store_true", help="every dataset mutation through every consumer (default: the core "
                                                       "consumers and 3 drawn ones per mutation)")
    args = p.parse_args(argv)
    fuzz_cases.FULL = args.full

    out = Path(args.out).resolve()
    cases = fuzz_cases.make_cases(args.seed)
    selected = select(cases, args)
    if args.list:
        for c in selected:
            print(c["id"])
        log(f"{len(selected)} cases: {dict(Counter(c['category'] for c in selected))}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.jsonl", "w") as fh:
        for c in cases:
            fh.write(json.dumps(c) + "\n")
    t_seed = time.monotonic()
    seeds = fuzz_seeds.ensure(out / "seeds")["seeds"]
    log(f"seeds ready in {time.monotonic() - t_seed:.1f} s: {out / 'seeds'}")
    seed_before = seed_stamp(out / "seeds")
    ro_dir, ro_method = _read_only_folder(out)
    probe = out / "mount-probe"
    can_mount = _mount_tmpfs(probe, 65536)
    if can_mount:
        _umount(probe)
    shutil.rmtree(probe, ignore_errors=True)
    env = Env(out, seeds, ro_dir, can_mount, args.subprocess)

    results_path = out / "results.jsonl"
    done: dict[str, dict] = {}
    if results_path.exists() and not args.rerun and not args.only:
        for line in results_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["id"]] = r
    todo = [c for c in selected if c["id"] not in done]
    if not can_mount:
        for c in todo:
            if c.get("disk") and c["disk"]["kind"] == "tmpfs":
                c["disk"] = {"kind": "fsize", "bytes": c["disk"]["bytes"], "instead_of": "tmpfs"}
    log(f"{len(selected)} cases selected, {len(todo)} to run ({len(selected) - len(todo)} already in {results_path.name}); "
        f"full disk: {'tmpfs + RLIMIT_FSIZE' if can_mount else 'RLIMIT_FSIZE only'}; read-only folder: {ro_method}")
    _preimport()
    t0 = time.monotonic()
    n_done = [0]
    fh = open(results_path, "a")

    def sink(rec):
        fh.write(json.dumps(rec, default=str) + "\n")
        fh.flush()
        done[rec["id"]] = rec
        n_done[0] += 1
        if args.only:
            print(json.dumps(rec, indent=1, default=str))
        bad = [f for f in [rec["primary"], *rec.get("flags", [])] if f in FAILURES]
        if n_done[0] % 50 == 0 or args.only:
            log(f"[{n_done[0]}/{len(todo)} {time.monotonic() - t0:.0f} s] {rec['id']}: {rec['primary']} {bad or ''}")

    try:
        plain = [c for c in todo if c["kind"] == "plain"]
        run_pool(plain, env, max(1, args.jobs), args.keep, sink)
        for c in todo:
            if c["kind"] != "plain":
                sink(SPECIAL[c["kind"]](c, env))
    finally:
        fh.close()
        if os.path.ismount(out / "read-only"):
            _umount(out / "read-only")
    wall = time.monotonic() - t0
    changed_seeds = [k for k, v in seed_stamp(out / "seeds").items() if seed_before.get(k) != v]
    records = [done[c["id"]] for c in selected if c["id"] in done]
    import platform

    meta = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "seed": args.seed,
            "machine": {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                     if line.startswith("model name")), "?"), "cores": os.cpu_count(),
                        "python": platform.python_version()},
            "jobs": args.jobs, "mode": "subprocess" if args.subprocess else "fork",
            "wall_s_this_run": round(wall, 1), "wall_s_cases": round(sum(r.get("wall_s", 0) for r in records), 1),
            "full_disk": "tmpfs mounts + RLIMIT_FSIZE" if can_mount else "RLIMIT_FSIZE (no mount rights)",
            "read_only_folder": ro_method, "seed_files_changed": changed_seeds}
    summary = summarise(records, meta)
    if not args.only:
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(table(summary))
    print(f"\n{summary['n_cases']} cases; this run {wall:.0f} s; seeds changed: {changed_seeds or 'none'}")
    for s in summary["signatures"][:60]:
        print(f"{s['kind']:<20} {s['count']:>4}  {s['where']}  {s['exc'][:90]}  e.g. {s['example']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
