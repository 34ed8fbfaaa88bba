"""What a bench run was and what it says, in words: the provenance of a run (chemtwin's version,
the git commit of its source, the date) and the "What this run says" section of ``report.md``,
written from the numbers of the results table (never canned claims)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import chemtwin
from chemtwin.methods import METHODS


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def label_of(method: str) -> str:
    """The report's name of a method (its name when it is no longer registered)."""
    return METHODS[method].label if method in METHODS else method


def source_commit(package_dir=None) -> str:
    """The git commit of chemtwin's source when it runs from a git checkout (``"unknown"``
    otherwise: an installed package, no git, any error), with ``" (with uncommitted changes)"``
    when the package's tracked files differ from that commit."""
    where = Path(package_dir) if package_dir is not None else Path(chemtwin.__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)

    try:
        # the package's own files must be tracked: an installed copy inside some other repository is not a checkout
        if git("ls-files", "--error-unmatch", "--", "__init__.py").returncode != 0:
            return "unknown"
        head = git("rev-parse", "--short=12", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else ""
        if not commit:
            return "unknown"
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return commit + (" (with uncommitted changes)" if status.returncode == 0 and status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"


def machine_record() -> dict:
    """Where it ran, what a timing depends on: CPU model and count, torch threads, Python and
    torch versions, the GPU if any, the load average at the start."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def software_record() -> dict:
    """What ran: ``{"chemtwin": version, "commit": source_commit(), "date": UTC ISO date}``."""
    return {"chemtwin": chemtwin.__version__, "commit": source_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _differs(p1: float, n1: int, p2: float, n2: int) -> bool:
    """Whether two fractions differ by more than 2 binomial standard errors (a rough guide:
    ranks of one set of stars are not independent)."""
    se = math.sqrt(max(p1 * (1 - p1), 1e-12) / max(n1, 1) + max(p2 * (1 - p2), 1e-12) / max(n2, 1))
    return abs(p1 - p2) > 2 * se


def _gap(ra: dict, rb: dict) -> str:
    """How row a's rank-0 fraction stands against row b's: "+x.x points, above|below|level with"."""
    pa, pb = ra["frac_rank0"], rb["frac_rank0"]
    side = ("above" if pa > pb else "below") if _differs(pa, ra["n_stars"], pb, rb["n_stars"]) else "level with"
    return f"{100 * (pa - pb):+.1f} points, {side}"


def _top(rows: list[dict]) -> str:
    """The best rows' names (ties joined) and their rank-0 fraction."""
    best = max(r["frac_rank0"] for r in rows)
    return " and ".join(label_of(r["method"]) for r in rows if r["frac_rank0"] == best) + f", {pct(best)}%"


def _best_without_twins(rows: list[dict], scenarios: list[str], label: dict) -> list[str]:
    """Per scenario where some row learned from known twins: the best row that did not, and the
    best of those without the network (fader, cae), so a reader sees what the network adds."""
    def known(method):
        m = METHODS.get(method)
        return method == "oracle" or (m is not None and m.uses_known_twins)

    out = []
    for sc in scenarios:
        here = [r for r in rows if r["scenario"] == sc]
        if not any(known(r["method"]) and r["method"] != "oracle" for r in here):
            continue
        free = [r for r in here if not known(r["method"])]
        if not free:
            continue
        classic = [r for r in free if METHODS.get(r["method"]) is None or METHODS[r["method"]].model_kind is None]
        out.append(f"{label[sc]}: {_top(free)}" + (f" (without the network: {_top(classic)})" if classic else ""))
    return out


def _network_against_models(rows: list[dict], scenarios: list[str], label: dict) -> list[str]:
    """Per scenario: the best fader/cae row that uses no known twin against the best row whose
    chemistry comes from a spectral model or from abundance labels (The Payne, The Cannon,
    StarNet): what learning from the spectra alone buys where a survey's models are imperfect."""
    def network(method):
        m = METHODS.get(method)
        return m is not None and m.model_kind in ("fader", "cae") and not m.uses_known_twins

    def fits_a_model(method):
        m = METHODS.get(method)
        return m is not None and (m.learns_labels or "emulator" in m.uses)

    out = []
    for sc in scenarios:
        nets = [r for r in rows if r["scenario"] == sc and network(r["method"])]
        models = [r for r in rows if r["scenario"] == sc and fits_a_model(r["method"])]
        if not nets or not models:
            continue
        net = max(nets, key=lambda r: r["frac_rank0"])
        model = max(models, key=lambda r: r["frac_rank0"])
        out.append(f"{label[sc]}: {label_of(net['method'])} {pct(net['frac_rank0'])} vs "
                   f"{label_of(model['method'])} {pct(model['frac_rank0'])}% ({_gap(net, model)})")
    return out


def _oracle_given(given: dict | None) -> str:
    """What the oracle's bound assumes a method is given (a row from before the bench set it: nothing)."""
    if not given:
        return "the oracle fits every label, TEFF and LOGG included, so a method given them can pass it"
    if not any(given.values()):
        return f"the oracle is given {' and '.join(given)} exactly, as every method is"
    errors = ", ".join(f"{name} {sigma:g}" for name, sigma in given.items())
    return f"the oracle is given {' and '.join(given)} with the errors a survey quotes ({errors}), as every method is"


def run_summary(results: dict) -> list[str]:
    """The "What this run says" section: bullet lines computed from the table's rank-0 fractions
    (best method per scenario, and the best a survey can run without known twins; the best
    network row against the best model-fitting row; the fader against the oracle and the
    no-adversary cae, what the twin-free decoded-twin metric adds to the fader, and whether each
    method keeps its score on the mismatched spectra).  Empty when there is nothing to compare."""
    rows = [r for r in results["rows"] if r.get("frac_rank0") is not None]
    by = {(r["method"], r["scenario"]): r for r in rows}
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    label = {r["scenario"]: r["label"] for r in rows}
    # (SNR, mismatch); results.json stores SNR inf as null
    info = {r["scenario"]: (math.inf if r["snr"] is None else float(r["snr"]), bool(r["mismatch"])) for r in rows}
    lines = []
    best = []
    for sc in scenarios:
        cands = [r for r in rows if r["scenario"] == sc and r["method"] != "oracle"]
        if not cands:
            continue
        oracle = by.get(("oracle", sc))
        limit = f" (the Cramér–Rao oracle: {pct(oracle['frac_rank0'])}%)" if oracle else ""
        best.append(f"{label[sc]}: {_top(cands)}{limit}")
    if best:
        lines.append("* **Best rank-0 fraction** (the oracle aside): " + "; ".join(best) + ".")
    survey = _best_without_twins(rows, scenarios, label)
    if survey:
        lines.append("* **Best without known twins** (what a survey can run; *+ twin metric* rows learn from known "
                     "twins, the oracle from the truth): " + "; ".join(survey) + ".")

    def compare(a: str, b: str, sc: str) -> str | None:
        ra, rb = by.get((a, sc)), by.get((b, sc))
        if ra is None or rb is None:
            return None
        return f"{label[sc]} {pct(ra['frac_rank0'])} vs {pct(rb['frac_rank0'])}% ({_gap(ra, rb)})"

    against_models = _network_against_models(rows, scenarios, label)
    if against_models:
        survey_protocol = results.get("config", {}).get("protocol", "paper") == "survey"
        lines.append("* **Chemistry learned from the spectra against chemistry fitted with a model** (the best "
                     "network row that uses no known twin vs the best row that fits a spectral model or learns "
                     "abundance labels, rank 0"
                     + ("; the models have another code's atomic data and pipeline labels, as a survey's do"
                        if survey_protocol else "; the models are the ones that made the spectra")
                     + "): " + "; ".join(against_models) + ".")
    plain = [sc for sc in scenarios if not info[sc][1]]
    gaps = [c for c in (compare("fader", "oracle", sc) for sc in plain) if c]
    if gaps:
        given = next(by[("oracle", sc)].get("given_labels") for sc in plain if ("oracle", sc) in by)
        lines.append("* **The fader against the physical limit** (fader vs oracle, rank 0; " + _oracle_given(given)
                     + ": docs/oracle.md): " + "; ".join(gaps) + ".")
    adv = [c for c in (compare("fader", "cae", sc) for sc in scenarios) if c]
    if adv:
        lines.append("* **What the adversary buys** (fader vs the same network without it, cae): " + "; ".join(adv)
                     + '. "Level with" = within 2 binomial standard errors.')
    metric = [c for c in (compare("fader_decoded", "fader", sc) for sc in scenarios) if c]
    if metric:
        lines.append("* **What the twin-free metric buys** (fader latents ranked in the decoded-twin metric vs with "
                     + results.get("config", {}).get("metric", "l1").upper() + "): " + "; ".join(metric) + ".")
    for sc in scenarios:
        if not info[sc][1]:
            continue
        base = next((s for s in scenarios if not info[s][1] and info[s][0] == info[sc][0]), None)
        if base is None:
            continue
        moves = []
        for r in rows:
            if r["scenario"] != sc or (r["method"], base) not in by:
                continue
            b = by[(r["method"], base)]
            p0, p1 = b["frac_rank0"], r["frac_rank0"]
            if not _differs(p0, b["n_stars"], p1, r["n_stars"]):
                verb = f"keeps its score ({pct(p0)} -> {pct(p1)}%)"
            else:
                verb = f"{'falls' if p1 < p0 else 'rises'} from {pct(p0)} to {pct(p1)}%"
            moves.append((r["method"] != "fader", p1 - p0, f"{label_of(r['method'])} {verb}"))
        if moves:
            moves.sort(key=lambda m: (m[0], m[1]))
            lines.append(f"* **On observed-like spectra** ({label[sc]} against {label[base]}, rank 0): "
                         + "; ".join(m[2] for m in moves) + ".")
    if lines and results.get("config", {}).get("quick"):
        lines.append("* This is a quick run (small sets, seconds of training): the numbers test the pipeline, "
                     "they do not measure the methods.")
    return lines
