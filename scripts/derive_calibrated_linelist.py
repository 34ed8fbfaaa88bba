"""Derive chemtwin's calibrated line list from the real APOGEE apStar fixtures.

Input:  ../shared/fixtures/apogee/apStar-dr17-*.fits (two DR17 stars: a cool luminous giant,
        2M17335483-2753043, and a warm dwarf, 2M19485057+5005279), the ASPCAP element windows
        (src/chemtwin/spectral_models/data/windows.csv, from ../shared/reference) and the drawn
        line list (linelist.csv: per-species typical excitation energy and damping only).
Output: src/chemtwin/spectral_models/data/linelist_calibrated.csv, one row per line.

How, as surveys calibrate astrophysical log gf on the Sun and Arcturus:
1. Each star is preprocessed as `chemtwin ingest` does (rest frame, DR17 continuum, ASPCAP grid)
   and held at its Doppler labels from the apStar header (RV_TEFF, RV_LOGG clipped to the
   synthesizer's 4.5, RV_FEH), solar-scaled [X/Fe] = 0, VMICRO from LOGG.
2. Lines: local minima deeper than 2 % found in either star (chemtwin.evaluation.realism),
   positions merged within 0.7 px.  Species: the element whose ASPCAP window holds the line
   (C windows -> CO, N -> CN, O -> OH: the molecules those windows are built on; CI and TiII
   windows -> C I and Ti II; windows of elements with no label and the space between windows ->
   "X", unidentified, tied to FE_H as real blends mostly are).  Where windows of two elements
   overlap, the element other than Fe wins (its windows are few and chosen for it).
3. Fit: every line's strength and excitation energy (bounded to the species' typical H-band range
   of the drawn list, widened by 0.5 eV; 0-3 eV for molecules; 0-10 eV for unidentified lines, whose
   species is unknown; with a weak prior at the median), each star's VMACRO,
   radial velocity and per-chip quadratic continuum correction, by Adam on the chi^2 of both
   stars together (pixel weights capped at SNR 100: chemtwin.spectral_models.fit).  The labels
   stay fixed: they anchor the strengths, as the Sun's and Arcturus's do.
4. Residual lines: dips where the data lie >= 2 % below the model and no line is within 0.8 px
   are added as new lines and the fit repeated (five rounds).
5. Molecular and unidentified lines that stay weaker than 0.2 % of the continuum in both stars
   are dropped; lines of a labelled element all stay (in other stars they carry its abundance).

What came from data: positions, strengths and excitation energies of the lines (two stars).
What was assumed: species from the windows, the Fe I physics of unidentified lines, per-species
damping and typical excitation (prior), the synthesizer's one-layer physics, the fixtures' Doppler
labels.  Deterministic: no random draws; torch runs single-threaded with a fixed seed.

Run:  python scripts/derive_calibrated_linelist.py [--shared ../shared] [--steps 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from chemtwin.core.grids import get_grid  # noqa: E402
from chemtwin.data.apogee import read_spectrum  # noqa: E402
from chemtwin.data.preprocess import preprocess  # noqa: E402
from chemtwin.evaluation.realism import find_lines, nearest_distance  # noqa: E402
from chemtwin.spectral_models.fit import continuum_corrected, shift_pixels  # noqa: E402
from chemtwin.spectral_models.labels import (  # noqa: E402
    LABEL_NAMES,
    VALID_RANGE,
    default_vmacro,
    default_vmicro,
)
from chemtwin.spectral_models.linelist import (  # noqa: E402
    MOLECULES,
    UNIDENTIFIED,
    LineList,
    load_linelist,
    load_windows,
)
from chemtwin.spectral_models.lines import LineSynthesizer  # noqa: E402

SEED = 20261204
MIN_DEPTH = 0.02
MERGE_PX = 0.7
MAX_IVAR = 1e4
MIN_KEPT_DEPTH = 0.002
START_LOG_REF = -0.5
WINDOW_SPECIES = {"C": ("CO", -1), "N": ("CN", -1), "O": ("OH", -1), "CI": ("C", 0), "TiII": ("Ti", 1)}
LABELLED = ("Na", "Mg", "Al", "Si", "S", "K", "Ca", "Ti", "V", "Cr", "Mn", "Co", "Ni")
CHI_MARGIN = 0.5  # eV beyond the drawn list's per-species excitation range (the species' typical H-band range)
MOLECULE_CHI = (0.0, 3.0)  # eV: the rotational ladders of CO, CN and OH that the H band samples
UNIDENTIFIED_CHI = (0.0, 10.0)  # eV: an unidentified line's excitation is unknown, so any TEFF behaviour
CHI_PRIOR_SIGMA = 1.5  # eV: weak, only decides excitation where the two stars cannot


def star_inputs(path: Path, grid: str) -> dict:
    spec = read_spectrum(path)
    flux, ivar = preprocess(spec, grid=grid)
    h = spec.header
    labels = np.zeros(len(LABEL_NAMES))
    c = LABEL_NAMES.index
    for key, name in (("RV_TEFF", "TEFF"), ("RV_LOGG", "LOGG"), ("RV_FEH", "FE_H")):
        labels[c(name)] = float(np.clip(float(h[key]), *VALID_RANGE[name]))
    labels[c("VMICRO")] = default_vmicro(labels[c("LOGG")])
    labels[c("VMACRO")] = default_vmacro(labels[c("LOGG")])
    return {"id": spec.apogee_id, "flux": flux, "ivar": ivar, "labels": labels, "snr": spec.snr}


def detection_ivar(star: dict) -> np.ndarray:
    """ivar for finding candidate lines: masked pixels with a plausible flux count too (a strong
    line whose core is flagged, by persistence for example, must still get a line; the fit itself
    uses only the usable pixels)."""
    ivar = star["ivar"]
    plausible = np.isfinite(star["flux"]) & (star["flux"] > 0.05) & (star["flux"] < 1.5)
    return np.where(ivar > 0, ivar, np.where(plausible, np.median(ivar[ivar > 0]), 0.0))


def species_of(wavelength: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(species, ion) per line from the ASPCAP windows holding it (docstring, step 2)."""
    windows = load_windows()
    species = np.full(wavelength.shape, UNIDENTIFIED, dtype=object)
    ion = np.zeros(wavelength.shape, dtype=np.int64)

    def inside(name):
        hit = np.zeros(wavelength.shape, dtype=bool)
        for lo, hi in windows.get(name, np.empty((0, 2))):
            hit |= (wavelength >= lo) & (wavelength <= hi)
        return hit

    # lowest priority first: later assignments win
    order = [("Fe", ("Fe", 0)), *[(n, v) for n, v in WINDOW_SPECIES.items()], *[(el, (el, 0)) for el in LABELLED]]
    for name, (sp, stage) in order:
        hit = inside(name)
        species[hit], ion[hit] = sp, stage
    return species.astype(str), ion


def with_blend_companions(wavelength, species, ion):
    """Every atomic line also gets a CN line at its wavelength: in cool giants CN blankets the whole
    H band, so a window chosen for an atom in typical giants is a blend in a 3,700 K supergiant.
    The fit decides each component's strength and excitation; a companion that stays negligible in
    both stars is dropped at the end."""
    atomic = (ion >= 0) & (species != UNIDENTIFIED)
    wavelength = np.concatenate([wavelength, wavelength[atomic]])
    species = np.concatenate([species, np.full(int(atomic.sum()), "CN")])
    ion = np.concatenate([ion, np.full(int(atomic.sum()), -1)])
    order = np.argsort(wavelength, kind="stable")
    return wavelength[order], species[order], ion[order]


def typical(drawn: LineList, species: np.ndarray, ion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per line: prior excitation energy and damping (the median of that species in the drawn list)
    and the (lo, hi) excitation bounds (that species' range there, widened by CHI_MARGIN)."""
    chi, damp, bounds = np.zeros(species.size), np.zeros(species.size), np.zeros((species.size, 2))
    for sp in np.unique(species):
        ref = drawn.chi_exc[drawn.species == ("Fe" if sp == UNIDENTIFIED else sp)]
        m = species == sp
        chi[m] = np.median(ref)
        damp[m] = np.median(drawn.damping[drawn.species == ("Fe" if sp == UNIDENTIFIED else sp)])
        bounds[m] = (MOLECULE_CHI if sp in MOLECULES else UNIDENTIFIED_CHI if sp == UNIDENTIFIED
                     else (max(0.0, ref.min() - CHI_MARGIN), ref.max() + CHI_MARGIN))
    return chi, damp, bounds


def pixel_to_wavelength(position: np.ndarray, wavelength: np.ndarray) -> np.ndarray:
    return 10 ** np.interp(position, np.arange(wavelength.size), np.log10(wavelength))


def merge(positions: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Positions within MERGE_PX of each other become one, at their depth-weighted mean."""
    if positions.size == 0:
        return positions
    order = np.argsort(positions)
    positions, depths = positions[order], depths[order]
    groups = np.concatenate([[0], np.cumsum(np.diff(positions) > MERGE_PX)])
    weight = np.bincount(groups, depths)
    return np.bincount(groups, positions * depths) / weight


class Calibration(torch.nn.Module):
    """Per-line strength and excitation, per-star VMACRO and RV, on top of a LineSynthesizer."""

    def __init__(self, synth: LineSynthesizer, chi0: np.ndarray, bounds: np.ndarray, stars: list[dict],
                 log_ref: np.ndarray | None = None, chi: np.ndarray | None = None, star_state=None):
        super().__init__()
        self.synth = synth
        self.register_buffer("chi_lo", torch.as_tensor(bounds[:, 0]))
        self.register_buffer("chi_hi", torch.as_tensor(bounds[:, 1]))
        self.register_buffer("chi0", torch.as_tensor(chi0))
        start_chi = np.clip(chi if chi is not None else chi0, bounds[:, 0] + 1e-3, bounds[:, 1] - 1e-3)
        self.chi_raw = torch.nn.Parameter(torch.logit(torch.as_tensor((start_chi - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0]))))
        # log10 strength at the reference giant: the shipped column, and a well-scaled parameter
        self.log_ref = torch.nn.Parameter(torch.as_tensor(log_ref if log_ref is not None else np.full(chi0.size, START_LOG_REF)))
        self.register_buffer("reference", torch.as_tensor(synth.reference_labels()[None]))
        self.labels = torch.as_tensor(np.stack([s["labels"] for s in stars]))
        vmacro, rv = star_state if star_state is not None else (self.labels[:, LABEL_NAMES.index("VMACRO")].numpy(), np.zeros(len(stars)))
        self.vmacro_raw = torch.nn.Parameter(torch.logit(torch.as_tensor(vmacro / 15.0).clamp(1e-3, 1 - 1e-3)))
        self.rv_raw = torch.nn.Parameter(torch.atanh(torch.as_tensor(rv / 10.0).clamp(-0.999, 0.999)))
        self.flux = torch.as_tensor(np.stack([s["flux"] for s in stars]))
        self.weight = torch.as_tensor(np.stack([np.where(s["ivar"] > 0, np.minimum(s["ivar"], MAX_IVAR), 0.0) for s in stars]))

    def chi(self):
        return self.chi_lo + (self.chi_hi - self.chi_lo) * torch.sigmoid(self.chi_raw)

    def star_state(self):
        return (15.0 * torch.sigmoid(self.vmacro_raw)).detach().numpy(), (10.0 * torch.tanh(self.rv_raw)).detach().numpy()

    def forward(self):
        synth = self.synth
        synth.line_chi = self.chi()
        synth.log_strength_offset = self.log_ref - synth.log_line_strength(self.reference)[0]
        labels = self.labels.clone()
        labels[:, LABEL_NAMES.index("VMACRO")] = 15.0 * torch.sigmoid(self.vmacro_raw)
        shifted = shift_pixels(synth(labels), 10.0 * torch.tanh(self.rv_raw) / synth.pixel_kms, synth.grid.chip_slices)
        return torch.cat([continuum_corrected(shifted[i:i + 1], self.flux[i], self.weight[i], synth.grid.chip_slices, 2)
                          for i in range(len(self.flux))])

    def loss(self):
        model = self()
        chi2 = (((model - self.flux) ** 2) * self.weight).sum() / self.weight.sum()
        prior = (((self.chi() - self.chi0) / CHI_PRIOR_SIGMA) ** 2).mean() * 1e-4
        return chi2 + prior, model


def build(wavelength, species, ion, chi, damping, grid) -> LineSynthesizer:
    lines = LineList(species=species, ion=ion, wavelength=wavelength, chi_exc=chi,
                     log_strength_ref=np.zeros(wavelength.size), damping=damping)
    return LineSynthesizer(grid=grid, linelist=lines, dtype=torch.float64)


def fit(cal: Calibration, steps: int, lr: float) -> tuple[float, np.ndarray]:
    optimizer = torch.optim.Adam(cal.parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        loss, _ = cal.loss()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        loss, model = cal.loss()
    return float(loss), model.numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=os.environ.get("CHEMTWIN_SHARED", str(ROOT.parent / "shared")))
    p.add_argument("--out", default=str(ROOT / "src/chemtwin/spectral_models/data/linelist_calibrated.csv"))
    p.add_argument("--grid", default="aspcap")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--no-blends", dest="blends", action="store_false", help="no CN companion for atomic lines")
    p.add_argument("--diagnostics", help="also write the stars' flux, ivar and final model to this .npz")
    args = p.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    fixtures = sorted((Path(args.shared) / "fixtures" / "apogee").glob("apStar-*.fits"))
    if not fixtures:
        print(f"no apStar fixtures under {args.shared}/fixtures/apogee", file=sys.stderr)
        return 2
    stars = [star_inputs(f, args.grid) for f in fixtures]
    drawn = load_linelist("drawn")
    wave_grid = get_grid(args.grid).wavelength

    found = [find_lines(s["flux"], detection_ivar(s), MIN_DEPTH) for s in stars]
    positions = merge(np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]))
    wavelength = pixel_to_wavelength(positions, wave_grid)
    species, ion = species_of(wavelength)
    if args.blends:
        wavelength, species, ion = with_blend_companions(wavelength, species, ion)
    log_ref = chi = star_state = None
    t0 = time.time()
    for round_ in range(args.rounds + 1):
        chi0, damping, bounds = typical(drawn, species, ion)
        synth = build(wavelength, species, ion, chi0, damping, args.grid)
        cal = Calibration(synth, chi0, bounds, stars, log_ref, chi, star_state)
        loss, model = fit(cal, args.steps, args.lr)
        rms = [float(np.sqrt(np.mean((s["flux"] - m)[s["ivar"] > 0] ** 2))) for s, m in zip(stars, model)]
        print(f"round {round_}: {wavelength.size} lines, loss {loss:.3f}, RMS "
              + ", ".join(f"{s['id']} {100 * r:.2f} %" for s, r in zip(stars, rms)) + f"  [{time.time() - t0:.0f} s]", flush=True)
        log_ref, chi, star_state = cal.log_ref.detach().numpy(), cal.chi().detach().numpy(), cal.star_state()
        if round_ == args.rounds:
            break
        new = []
        for s, m in zip(stars, model):
            pos, _ = find_lines(1.0 + (s["flux"] - m), detection_ivar(s), MIN_DEPTH)
            line_pos = np.interp(np.log10(wavelength), np.log10(wave_grid), np.arange(wave_grid.size))
            new.append(pos[nearest_distance(pos, line_pos) > 0.8])
        added = pixel_to_wavelength(merge(np.concatenate(new), np.ones(sum(n.size for n in new))), wave_grid)
        added_species, added_ion = species_of(added)
        if args.blends:
            added, added_species, added_ion = with_blend_companions(added, added_species, added_ion)
        order = np.argsort(np.concatenate([wavelength, added]), kind="stable")
        wavelength = np.concatenate([wavelength, added])[order]
        species, ion = np.concatenate([species, added_species])[order], np.concatenate([ion, added_ion])[order]
        log_ref = np.concatenate([log_ref, np.full(added.size, START_LOG_REF - 0.5)])[order]
        chi = np.concatenate([chi, typical(drawn, added_species, added_ion)[0]])[order]

    # strength at the reference giant, and the per-star peak depth proxy used to drop dead lines
    with torch.no_grad():
        cal()
        per_star = (synth.log_line_strength(cal.labels) + synth.log_strength_offset).numpy()
    # peak eta ~ strength / (sqrt(2 pi) sigma ~ 5 km/s); a labelled element's lines all stay, however weak
    # in these two stars: they are where its abundance shows in others
    labelled = np.isin(species, LABELLED) | (species == "C") & (ion == 0)
    keep = labelled | ((10 ** per_star).max(axis=0) / 5.0 > MIN_KEPT_DEPTH)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["species", "ion", "wavelength", "chi_exc", "log_strength_ref", "damping"])
        for k in np.flatnonzero(keep):
            w.writerow([species[k], int(ion[k]), f"{wavelength[k]:.4f}", f"{chi[k]:.4f}", f"{log_ref[k]:.4f}", f"{damping[k]:.4f}"])
    os.replace(tmp, out)
    if args.diagnostics:
        np.savez(args.diagnostics, flux=cal.flux.numpy(), weight=cal.weight.numpy(), model=model, ids=[s["id"] for s in stars])
    counts = {sp: int(np.sum(species[keep] == sp)) for sp in np.unique(species[keep])}
    print(f"wrote {out}: {int(keep.sum())} lines ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"dropped {int((~keep).sum())} molecular/unidentified ones weaker than {100 * MIN_KEPT_DEPTH:.1f} % in both stars; "
          f"molecules: {', '.join(m for m in MOLECULES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
