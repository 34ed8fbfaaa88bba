"""`lines`: chemtwin's embedded, physics-based spectrum synthesizer (labels -> normalized flux).

A one-layer LTE model of a red-giant photosphere, batched in torch and differentiable with
respect to every label.  For each star and line it computes the line-to-continuum opacity
ratio from

* Boltzmann excitation at the line-forming temperature T = 0.86 TEFF (10^(-theta chi_exc)),
* Saha ionization with the ionization energies of science.md (neutral and singly ionized
  stages; so minority species such as Fe I barely react to LOGG while majority species
  such as Ti II weaken as the electron pressure rises),
* an H- continuum opacity proportional to P_e theta^(5/2) 10^(0.754 theta),
* CO / CN / OH molecular equilibrium (CO formation solved exactly from the C and O budgets,
  so CO takes most of the rarer of C and O in cool stars; CN from the free C and N, OH
  from the free O),

then builds an opacity profile on a 5x oversampled log-lambda grid (pseudo-Voigt: a
Gaussian with thermal + microturbulent Doppler width plus a pressure-scaled Lorentzian
fraction), turns it into line depth with Milne-Eddington saturation
(depth = r_max * eta / (1 + eta)), convolves with macroturbulence and the R = 22,500
Gaussian line-spread function and bins to the APOGEE pixels.

What is physical and what is calibrated is listed in docs/synthesizer.md.  Speed comes
from three choices: the Gaussian profile of a line at any width is interpolated between
a few fixed-width basis profiles, so the opacity of a whole batch is one sparse matrix
product; the convolution and the binning are one strided grouped convolution; and the
per-line physics is a handful of (batch x lines) tensor operations.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from chemtwin.core.grids import (
    APSTAR_LOG10_START,
    APSTAR_LOG10_STEP,
    SPEED_OF_LIGHT_KMS,
    get_grid,
)
from chemtwin.spectral_models.labels import (
    ELEMENTS,
    LABEL_NAMES,
    check_in_range,
    default_vmacro,
    default_vmicro,
)
from chemtwin.spectral_models.linelist import (
    DISSOCIATION_EV,
    IONIZATION_EV,
    MASS_AMU,
    MOLECULES,
    SOLAR_A,
    UNIDENTIFIED,
    LineList,
    load_linelist,
)

LINE_LAYER_TEFF_FRACTION = 0.9  # T of the line-forming layer relative to TEFF
REFERENCE_LABELS = {"TEFF": 4700.0, "LOGG": 2.4, "FE_H": 0.0}  # where log_strength_ref is defined
# log10 electron / gas pressure (dyn cm^-2) at the reference giant.  P_e is an effective
# one-layer value, set low enough that iron-peak metals are mostly singly ionized over the whole
# valid TEFF range (science.md section 6), and made to fall steeply with TEFF as the metals
# that supply the electrons recombine.
LOG_PE_REF, LOG_PG_REF = -2.5, 4.2
PE_TEFF_EXPONENT = 5.0
R_MAX = 0.9  # Milne-Eddington central depth of a fully saturated line
# Molecular equilibrium: log10 K/p_H = CO_K_OFFSET - MOLECULE_THETA_SCALE * theta * D0.  The
# scale stands in for averaging over the layers where molecules form (a one-layer model with the
# full D0 makes CN vary by 10^3 across the giant branch); calibrated so that the fraction of C in
# CO falls from ~0.95 at TEFF 4,000 K to ~0.4 at 5,500 K.
MOLECULE_THETA_SCALE = 0.33
CO_K_OFFSET = 0.77
LSF_SIGMA_KMS = SPEED_OF_LIGHT_KMS / 22500.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
THERMAL_KMS2_PER_K_AMU = 2 * 1.380649e-23 / 1.66054e-27 / 1e6  # 2kT/m in (km/s)^2 per (K / amu)
LORENTZ_HWHM_KMS = 2.0


class LineSynthesizer(torch.nn.Module):
    """Continuum-normalized APOGEE spectra from stellar labels.

    ``synth(labels)`` takes a (B, 21) tensor in the order of
    ``chemtwin.spectral_models.labels.LABEL_NAMES`` and returns (B, P) flux on ``grid``.
    ``synth.from_numpy(array)`` validates the label ranges first (out of range -> InputError).
    """

    def __init__(
        self,
        grid: str = "aspcap",
        oversample: int = 4,
        resolution: float = 22500.0,
        basis_sigmas_kms: tuple[float, ...] = (0.62, 0.94, 1.43, 2.18, 3.31),
        linelist: LineList | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.grid = get_grid(grid)
        self.oversample = oversample
        self.lsf_sigma_kms = SPEED_OF_LIGHT_KMS / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        self.pixel_kms = SPEED_OF_LIGHT_KMS * math.log(10.0) * APSTAR_LOG10_STEP
        self.os_kms = self.pixel_kms / oversample
        # Enough apStar pixels either side for the widest kernel (VMACRO 15 km/s, 4 sigma).
        self.margin = int(math.ceil(4.0 * math.hypot(self.lsf_sigma_kms, 15.0 / math.sqrt(2)) / self.pixel_kms)) + 1
        self.first_pixel = int(self.grid.apstar_index.min()) - self.margin
        n_apstar = int(self.grid.apstar_index.max()) + 1 + self.margin - self.first_pixel
        self.n_os = n_apstar * oversample
        self.register_buffer("output_index", torch.as_tensor(self.grid.apstar_index - self.first_pixel - self.margin))
        self.basis_log_sigma = np.log(np.asarray(basis_sigmas_kms))

        lines = linelist if linelist is not None else load_linelist()
        lines = self._lines_in_range(lines)
        self.n_lines = len(lines)
        self._setup_line_physics(lines)
        self.register_buffer("profile_matrix", self._profile_matrix(lines))
        # Calibrate in float64 so that every line has its tabulated strength at the reference giant.
        reference = torch.as_tensor(self.reference_labels()[None], dtype=torch.float64)
        offset = torch.as_tensor(lines.log_strength_ref) - self.log_line_strength(reference)[0]
        self.register_buffer("log_strength_offset", offset)
        self.dtype = dtype
        self.to(device=device, dtype=dtype)

    # ---------------------------------------------------------------- setup
    @property
    def wavelength(self) -> np.ndarray:
        return self.grid.wavelength

    def os_log10_wavelength(self, index: np.ndarray) -> np.ndarray:
        """log10 wavelength of oversampled pixel centres."""
        sub = (np.asarray(index) % self.oversample - (self.oversample - 1) / 2) / self.oversample
        return APSTAR_LOG10_START + APSTAR_LOG10_STEP * (self.first_pixel + np.asarray(index) // self.oversample + sub)

    def _lines_in_range(self, lines: LineList) -> LineList:
        lo, hi = self.os_log10_wavelength(np.array([0, self.n_os - 1]))
        log_wave = np.log10(lines.wavelength)
        return lines.select((log_wave > lo) & (log_wave < hi))

    def _setup_line_physics(self, lines: LineList) -> None:
        # Species = (element, stage) for atoms, then the molecules; every per-star quantity is
        # computed per species and gathered to the lines once.
        elements = list(SOLAR_A)
        n_el = len(elements)
        species = np.array([
            n_el * 2 + MOLECULES.index(sp) if ion < 0 else elements.index("Fe" if sp == UNIDENTIFIED else sp) + n_el * ion
            for sp, ion in zip(lines.species, lines.ion)
        ])
        masses = [MASS_AMU[e] for e in elements] * 2 + [MASS_AMU[m] for m in MOLECULES]
        as_t = lambda a, dt=torch.float64: torch.as_tensor(np.asarray(a), dtype=dt)  # noqa: E731
        self.register_buffer("line_species", as_t(species, torch.long))
        self.register_buffer("line_chi", as_t(lines.chi_exc))
        self.register_buffer("line_damping", as_t(np.where(lines.ion < 0, 0.0, lines.damping)))
        self.register_buffer("species_mass", as_t(masses))
        self.register_buffer("solar_a", as_t(list(SOLAR_A.values())))
        self.register_buffer("ionization", as_t(list(IONIZATION_EV.values())))
        # Which label column carries [X/Fe] of each element in SOLAR_A order (-1: Fe itself).
        x_fe_column = [LABEL_NAMES.index(f"{el.upper()}_FE") if el in ELEMENTS else -1 for el in SOLAR_A]
        self.register_buffer("x_fe_column", as_t(x_fe_column, torch.long))
        self.has_lorentz = np.flatnonzero(self.line_damping.numpy() > 0)

    def _profile_matrix(self, lines: LineList) -> torch.Tensor:
        """Sparse CSR (n_os, n_columns): one column per (basis width, line), then one per line for the Lorentzian."""
        centre = (np.log10(lines.wavelength) - self.os_log10_wavelength(np.array([0]))[0]) / (APSTAR_LOG10_STEP / self.oversample)
        rows, cols, vals = [], [], []
        h = self.os_kms

        def add(column_offset, line_ids, half_width, cdf):
            offsets = np.arange(-half_width, half_width + 1)
            pix = np.round(centre[line_ids])[:, None].astype(int) + offsets[None, :]
            v = (pix - centre[line_ids][:, None]) * h
            w = (cdf(v + h / 2) - cdf(v - h / 2)) / h  # pixel-averaged profile per km/s
            w /= w.sum(axis=1, keepdims=True) * h  # unit area despite truncation
            ok = (pix >= 0) & (pix < self.n_os)
            rows.append(pix[ok])
            cols.append((column_offset + np.broadcast_to(line_ids[:, None], pix.shape))[ok])
            vals.append(w[ok])

        all_lines = np.arange(self.n_lines)
        for k, log_sigma in enumerate(self.basis_log_sigma):
            sigma = math.exp(log_sigma)
            gauss_cdf = lambda v, s=sigma: 0.5 * (1 + _erf(v / (s * math.sqrt(2))))  # noqa: E731
            add(k * self.n_lines, all_lines, int(math.ceil(5 * sigma / h)), gauss_cdf)
        lorentz_cdf = lambda v: np.arctan(v / LORENTZ_HWHM_KMS) / math.pi + 0.5  # noqa: E731
        add(len(self.basis_log_sigma) * self.n_lines - 0, self.has_lorentz, int(math.ceil(15 * LORENTZ_HWHM_KMS / h)), lorentz_cdf)
        n_columns = len(self.basis_log_sigma) * self.n_lines + self.n_lines
        index = torch.as_tensor(np.vstack([np.concatenate(rows), np.concatenate(cols)]))
        values = torch.as_tensor(np.concatenate(vals), dtype=torch.float32)
        with torch.sparse.check_sparse_tensor_invariants(True):
            matrix = torch.sparse_coo_tensor(index, values, (self.n_os, n_columns))
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only its matmul
            warnings.simplefilter("ignore", UserWarning)
            return matrix.coalesce().to_sparse_csr()

    # ---------------------------------------------------------------- physics
    @staticmethod
    def reference_labels() -> np.ndarray:
        labels = np.zeros(len(LABEL_NAMES))
        for name, value in REFERENCE_LABELS.items():
            labels[LABEL_NAMES.index(name)] = value
        labels[LABEL_NAMES.index("VMICRO")] = default_vmicro(REFERENCE_LABELS["LOGG"])
        labels[LABEL_NAMES.index("VMACRO")] = default_vmacro(REFERENCE_LABELS["LOGG"])
        return labels

    def atmosphere(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Line-layer temperature, theta, log10 P_e, log10 P_gas and log10 H- opacity per star."""
        col = LABEL_NAMES.index
        teff, logg, feh = labels[:, col("TEFF")], labels[:, col("LOGG")], labels[:, col("FE_H")]
        temp = LINE_LAYER_TEFF_FRACTION * teff
        theta = 5040.0 / temp
        log_t_rel = torch.log10(teff / REFERENCE_LABELS["TEFF"])
        log_pe = LOG_PE_REF + 0.45 * (logg - 2.4) + 0.4 * feh + PE_TEFF_EXPONENT * log_t_rel
        log_pg = LOG_PG_REF + 0.6 * (logg - 2.4) - 0.25 * feh - 1.5 * log_t_rel
        log_kappa = log_pe - 2.5 * torch.log10(temp) + 0.754 * theta
        return {"temp": temp, "theta": theta, "log_pe": log_pe, "log_pg": log_pg, "log_kappa": log_kappa}

    def log_abundances(self, labels: torch.Tensor) -> torch.Tensor:
        """log10 N_X / N_H for every element in SOLAR_A order, (B, n_elements)."""
        feh = labels[:, LABEL_NAMES.index("FE_H")][:, None]
        x_fe = torch.where(
            self.x_fe_column[None, :] >= 0,
            labels[:, self.x_fe_column.clamp(min=0)],
            torch.zeros((), dtype=labels.dtype, device=labels.device),
        )
        return self.solar_a[None, :] - 12.0 + feh + x_fe

    def log_species_strength(self, labels: torch.Tensor, atm: dict[str, torch.Tensor]) -> torch.Tensor:
        """log10 (N_species / N_H) / kappa_continuum per star and species, (B, n_species)."""
        log_eps = self.log_abundances(labels)
        # Saha: log10 N_II/N_I = log10(0.6665 T^2.5) - theta chi_ion - log10 P_e (partition-function ratio 1).
        log_ratio = (
            math.log10(0.6665) + 2.5 * torch.log10(atm["temp"])[:, None]
            - atm["theta"][:, None] * self.ionization[None, :] - atm["log_pe"][:, None]
        )
        log_f_neutral = -_log10_1p_exp10(log_ratio)
        per_species = torch.cat(
            [log_eps + log_f_neutral, log_eps + log_ratio + log_f_neutral, self.log_molecule_fractions(log_eps, atm)], dim=1
        )
        return per_species - atm["log_kappa"][:, None]

    def log_line_strength(self, labels: torch.Tensor) -> torch.Tensor:
        """log10 line-to-continuum opacity of every line before calibration, (B, n_lines)."""
        atm = self.atmosphere(labels)
        per_species = self.log_species_strength(labels, atm)
        return per_species[:, self.line_species] - atm["theta"][:, None] * self.line_chi[None, :]

    def log_molecule_fractions(self, log_eps: torch.Tensor, atm: dict[str, torch.Tensor]) -> torch.Tensor:
        """log10 N_mol / N_H for CO, CN, OH (up to constants absorbed by the calibration)."""
        idx = list(SOLAR_A)
        eps_c, eps_n, eps_o = (10.0 ** log_eps[:, idx.index(e)] for e in ("C", "N", "O"))
        theta, log_p = atm["theta"], atm["log_pg"] - LOG_PG_REF
        d = lambda m: MOLECULE_THETA_SCALE * theta * DISSOCIATION_EV[m]  # noqa: E731
        k_co = 10.0 ** (CO_K_OFFSET - d("CO") - log_p)  # K_CO / p_H: higher pressure favours CO
        # (C - x)(O - x) = K x, smallest root, in the cancellation-free form.
        disc = (eps_c - eps_o) ** 2 + k_co**2 + 2 * k_co * (eps_c + eps_o)
        x_co = 2 * eps_c * eps_o / (eps_c + eps_o + k_co + torch.sqrt(disc))
        free_c, free_o = eps_c - x_co, eps_o - x_co
        log_co = torch.log10(x_co)
        log_cn = torch.log10(free_c) + torch.log10(eps_n) + d("CN") + log_p
        log_oh = torch.log10(free_o) + d("OH") + log_p
        return torch.stack([log_co, log_cn, log_oh], dim=1)

    def species_doppler_sigma(self, labels: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        """Gaussian sigma (km/s) of the thermal + microturbulent profile per star and species."""
        vmicro = labels[:, LABEL_NAMES.index("VMICRO")][:, None]
        b2 = THERMAL_KMS2_PER_K_AMU * temp[:, None] / self.species_mass[None, :] + vmicro**2
        return torch.sqrt(b2 / 2.0)

    # ---------------------------------------------------------------- forward
    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Normalised flux (B, P) on the instrument's pixels for labels (B, 21) in LABEL_NAMES order."""
        labels = labels.to(self.dtype)
        # Milne-Eddington: depth = R_MAX * eta / (1 + eta); R_MAX is applied after the (linear) convolution.
        return 1.0 - R_MAX * self.broaden_and_bin(self.line_saturation(labels), labels)

    def line_saturation(self, labels: torch.Tensor) -> torch.Tensor:
        """``eta / (1 + eta)`` (B, n_os) on the oversampled grid, before macroturbulence, LSF and
        binning; ``forward`` is ``1 - R_MAX * broaden_and_bin(line_saturation)``."""
        labels = labels.to(self.dtype)
        atm = self.atmosphere(labels)
        ln10 = math.log(10.0)
        log_strength = torch.addcmul(
            self.log_species_strength(labels, atm)[:, self.line_species] + self.log_strength_offset[None, :],
            atm["theta"][:, None], self.line_chi[None, :], value=-1.0,
        )
        strength = torch.exp(ln10 * log_strength)  # integrated opacity ratio, km/s
        # Pressure-broadened fraction of the profile (van der Waals damping grows with P_gas).
        damping = self.line_damping[None, :] * torch.exp(0.7 * ln10 * (atm["log_pg"][:, None] - LOG_PG_REF))
        lorentz = damping / (1 + damping)

        # Each species' Gaussian, interpolated between the basis widths (hat functions in log sigma).
        log_sigma = torch.log(self.species_doppler_sigma(labels, atm["temp"]))
        step = float(self.basis_log_sigma[1] - self.basis_log_sigma[0])
        position = ((log_sigma - float(self.basis_log_sigma[0])) / step).clamp(0, len(self.basis_log_sigma) - 1)
        basis = torch.arange(len(self.basis_log_sigma), dtype=position.dtype, device=position.device)
        hats = torch.relu(1 - (position[:, None, :] - basis[None, :, None]).abs())  # (B, K, n_species)
        gauss_weight = hats[:, :, self.line_species] * (strength * (1 - lorentz))[:, None, :]
        weights = torch.cat([gauss_weight.flatten(1), strength * lorentz], dim=1)

        eta = (self.profile_matrix @ weights.t()).t().contiguous()  # (B, n_os): sparse (n_os, columns) x dense
        return eta / (eta + 1)

    def broaden_and_bin(self, depth_os: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Convolve with macroturbulence + LSF (Gaussian, per star) and average into APOGEE pixels."""
        batch = depth_os.shape[0]
        vmacro = labels[:, LABEL_NAMES.index("VMACRO")].to(self.dtype)
        sigma = torch.sqrt(self.lsf_sigma_kms**2 + vmacro**2 / 2.0) / self.os_kms  # in oversampled pixels
        half = int(math.ceil(4.0 * float(sigma.max().detach()) / self.oversample)) * self.oversample
        taps = torch.arange(-half, half + 1, dtype=self.dtype, device=depth_os.device)
        gauss = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
        gauss = gauss / gauss.sum(dim=1, keepdim=True)
        # Binning = averaging `oversample` neighbours: fold that boxcar into the kernel.
        box = torch.full((1, 1, self.oversample), 1.0 / self.oversample, dtype=self.dtype, device=depth_os.device)
        kernel = F.conv1d(gauss[:, None, :], box, padding=self.oversample - 1)  # (B, 1, 2*half + oversample)
        out = F.conv1d(depth_os[None], kernel.flip(-1), stride=self.oversample, groups=batch)[0]
        first = self.margin - half // self.oversample
        return out[:, first + self.output_index]

    @torch.no_grad()
    def from_numpy(self, labels: np.ndarray, validate: bool = True) -> np.ndarray:
        """Flux (N, P) float32 for labels (N, 21) in LABEL_NAMES order; checks the valid range."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if labels.shape[1] != len(LABEL_NAMES):
            from chemtwin.errors import InputError

            raise InputError(f"expected {len(LABEL_NAMES)} labels ({', '.join(LABEL_NAMES)}), got {labels.shape[1]}")
        if validate:
            check_in_range(LABEL_NAMES, labels)
        tensor = torch.as_tensor(labels, dtype=self.dtype, device=self.log_strength_offset.device)
        return self(tensor).cpu().numpy().astype(np.float32)


def _log10_1p_exp10(x: torch.Tensor) -> torch.Tensor:
    """log10(1 + 10^x), stable for large |x|."""
    return torch.nn.functional.softplus(x * math.log(10.0)) / math.log(10.0)


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)
