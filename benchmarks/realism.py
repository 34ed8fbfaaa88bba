"""How real is the embedded synthesizer?  Each real APOGEE fixture fitted with each line list.

    python benchmarks/realism.py [--shared ../shared] [--json OUT.json] [--figures DIR] [--steps 300]

For every apStar and apVisit fixture and for both shipped line lists ("calibrated", the default,
and "drawn"), fits the synthesizer with TEFF, LOGG, FE_H, the main [X/Fe], VMACRO and RV free
(chemtwin.spectral_models.fit; six starting points from cool giant to warm dwarf, the best chi^2
kept) and reports the census of chemtwin.evaluation.realism: RMS residual over usable pixels (and a
flat line at 1 for scale), real lines deeper than 5 % present in the model, model lines deeper
than 5 % present in the data, line-by-line depth scatter.  The apStar stars calibrated the
"calibrated" list (scripts/derive_calibrated_linelist.py); the apVisit stars did not: they are
the held-out check of whether the calibration generalises.

Figures (with --figures): realism_spectra.png (each fixture and both fits, full range and a zoom)
and realism_depths.png (histogram of line depths, real against each model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import log, machine, print_or_write_json

STARTS = ((3700, 0.8), (4200, 1.5), (4700, 2.4), (5200, 3.0), (5600, 4.0), (6000, 4.3))
ZOOM = (15150.0, 15300.0)


def fixtures(shared: Path) -> list[tuple[Path, bool]]:
    root = shared / "fixtures" / "apogee"
    return [(p, True) for p in sorted(root.glob("apStar-*.fits"))] + [(p, False) for p in sorted(root.glob("apVisit-*.fits"))]


def starting_labels() -> np.ndarray:
    from chemtwin.spectral_models.labels import LABEL_NAMES, default_vmacro, default_vmicro

    c = LABEL_NAMES.index
    out = np.zeros((len(STARTS), len(LABEL_NAMES)))
    for row, (teff, logg) in zip(out, STARTS):
        row[c("TEFF")], row[c("LOGG")] = teff, logg
        row[c("VMICRO")], row[c("VMACRO")] = default_vmicro(logg), default_vmacro(logg)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=os.environ.get("CHEMTWIN_SHARED", str(Path(__file__).resolve().parents[2] / "shared")))
    p.add_argument("--json", help="write the results here (default: stdout)")
    p.add_argument("--figures", help="write realism_spectra.png and realism_depths.png into this folder")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    import torch

    from chemtwin.data.apogee import read_spectrum
    from chemtwin.data.preprocess import preprocess
    from chemtwin.evaluation.realism import line_census
    from chemtwin.spectral_models.fit import fit_spectrum
    from chemtwin.spectral_models.linelist import LINELISTS, load_linelist
    from chemtwin.spectral_models.lines import LineSynthesizer

    torch.manual_seed(0)
    files = fixtures(Path(args.shared))
    if not files:
        print(f"realism: error: no APOGEE fixtures under {args.shared}/fixtures/apogee", file=sys.stderr)
        return 2
    synths = {name: LineSynthesizer(grid="aspcap", linelist=load_linelist(name)) for name in LINELISTS}
    starts = starting_labels()
    rows, plotted = [], []
    for path, calibration_star in files:
        spec = read_spectrum(path)
        flux, ivar = preprocess(spec, grid="aspcap")
        models = {}
        for name, synth in synths.items():
            t0 = time.time()
            fit = fit_spectrum(synth, flux, ivar, starts, steps=args.steps)
            census = line_census(flux, ivar, fit.model)
            models[name] = (fit.model, census)
            row = {"star": spec.apogee_id, "file": path.name, "snr": round(float(spec.snr), 1),
                   "used_in_calibration": calibration_star, "linelist": name, "n_lines": synth.n_lines,
                   "fit": {"TEFF": round(fit.label("TEFF"), 0), "LOGG": round(fit.label("LOGG"), 2),
                           "FE_H": round(fit.label("FE_H"), 2), "VMACRO": round(fit.label("VMACRO"), 1),
                           "RV": round(fit.rv_kms, 2)},
                   **{k: v for k, v in census.items() if not k.endswith("depths")}, "fit_seconds": round(time.time() - t0, 1)}
            rows.append(row)
            log(f"{spec.apogee_id} {name}: RMS {100 * row['rms']:.2f} % (flat {100 * row['rms_flat']:.2f} %), "
                f"real in model {100 * row['real_in_model']:.0f} %, model in real {100 * row['model_in_real']:.0f} %, "
                f"TEFF {row['fit']['TEFF']:.0f} LOGG {row['fit']['LOGG']:.2f} FE_H {row['fit']['FE_H']:+.2f}")
        plotted.append((spec.apogee_id, calibration_star, flux, ivar, models))
    if args.figures:
        figures(Path(args.figures), plotted, synths["calibrated"].wavelength)
    print_or_write_json({"benchmark": "realism", "machine": machine(), "steps": args.steps,
                         "min_depth": 0.05, "rows": rows}, args.json)
    return 0


def figures(folder: Path, plotted, wave) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"calibrated": "tab:orange", "drawn": "tab:blue"}
    fig, axes = plt.subplots(len(plotted), 2, figsize=(14, 2.6 * len(plotted)), gridspec_kw={"width_ratios": (3, 2)}, squeeze=False)
    for (star, calib, flux, ivar, models), (full, zoom) in zip(plotted, axes):
        real = np.where(ivar > 0, flux, np.nan)
        for ax, sel in ((full, slice(None)), (zoom, (wave >= ZOOM[0]) & (wave <= ZOOM[1]))):
            ax.plot(wave[sel], real[sel], c="k", lw=0.5, label=f"{star} ({'calibration star' if calib else 'held out'})")
            for name, (model, census) in models.items():
                ax.plot(wave[sel], np.where(ivar > 0, model, np.nan)[sel], c=colours[name], lw=0.5, alpha=0.8,
                        label=f"{name} list: RMS {100 * census['rms']:.1f} %")
            ax.set_ylim(0.3, 1.15)
        full.legend(fontsize=7, loc="lower left", ncol=3)
        full.set_ylabel("normalized flux")
    for ax in axes[-1]:
        ax.set_xlabel("vacuum wavelength (A)")
    fig.tight_layout()
    fig.savefig(folder / "realism_spectra.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0.05, 0.7, 27)
    real = np.concatenate([models["calibrated"][1]["real_depths"] for *_, models in plotted])
    ax.hist(real, bins, histtype="step", color="k", lw=1.5, label=f"real fixtures ({real.size} lines)")
    for name in colours:
        depths = np.concatenate([models[name][1]["model_depths"] for *_, models in plotted])
        ax.hist(depths, bins, histtype="step", color=colours[name], label=f"{name} list at the fitted labels ({depths.size})")
    ax.set_xlabel("line depth (1 - flux at the minimum)")
    ax.set_ylabel("lines")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "realism_depths.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
