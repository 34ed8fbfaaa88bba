"""Speed of the oracle's synthesizer Jacobian (chemtwin.tagging.oracle.synthesizer_jacobian).

Compares, on the same red-giant labels, stars per second of

* ``split``: the oracle's formulation (double-vjp on the oversampled line depth, broadening
  applied afterwards, VMACRO by forward mode), with 1 and 2 worker threads;
* ``whole``: the plain double-vjp through the whole synthesizer (one backward pass per label
  column, as tests/test_synthesizer.py does), 1 thread, for reference;

and checks that the two agree.  ``--quick`` (64 stars) takes well under a minute.

    python benchmarks/oracle_jacobian.py --quick [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

try:
    import chemtwin  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chemtwin.data.population import RedGiantPrior, twin_groups
from chemtwin.spectral_models.lines import LineSynthesizer
from chemtwin.tagging.oracle import synthesizer_jacobian


def whole_double_vjp(labels: np.ndarray, batch_size: int) -> np.ndarray:
    synth = LineSynthesizer()
    out = []
    for a in range(0, len(labels), batch_size):
        x = torch.as_tensor(labels[a : a + batch_size], dtype=torch.float32).requires_grad_(True)
        flux = synth(x)
        cot = torch.zeros_like(flux, requires_grad=True)
        (vjp,) = torch.autograd.grad(flux, x, grad_outputs=cot, create_graph=True)
        cols = [torch.autograd.grad(vjp[:, k].sum(), cot, retain_graph=True)[0] for k in range(x.shape[1])]
        out.append(torch.stack(cols, dim=-1).numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 stars (default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="stars per batch (default 32)")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    n = 64 if args.quick else 256
    labels, _ = twin_groups(n // 2, 2, RedGiantPrior(), np.random.default_rng(0))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    synthesizer_jacobian(labels[:2], progress=False)  # build the synthesizer once, outside the timings
    result = {"n_stars": n, "batch_size": args.batch_size, "load_average": os.getloadavg()}
    jac = None
    for threads in (1, 2):
        t = time.perf_counter()
        jac = synthesizer_jacobian(labels, batch_size=args.batch_size, threads=threads, progress=False)
        result[f"split_{threads}_threads_stars_per_s"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    ref = whole_double_vjp(labels, args.batch_size)
    result["whole_1_thread_stars_per_s"] = n / (time.perf_counter() - t)
    result["max_abs_difference"] = float(np.abs(jac - ref).max())
    result["max_abs_jacobian"] = float(np.abs(ref).max())
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
