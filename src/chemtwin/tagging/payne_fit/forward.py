"""A star's model spectrum for the fitter: scaled labels and radial velocity -> flux, and its derivatives.

theta (R, n) holds the emulator's scaled labels (in [-0.5, 0.5]) and, with ``rv=True``, the
radial velocity in units of ``RV_UNIT``.  The derivatives are what Levenberg-Marquardt needs:
the gradient half J^T W r (exact: backpropagation written out for the MLP format, forward-mode
autodiff otherwise) and the Gauss-Newton matrix J^T W J (exact, or for the MLP format the matrix
shared by a batch, ``A^T (W2^T diag(w_bar) W2) A``; see the package's docstring).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from chemtwin.core.grids import SPEED_OF_LIGHT_KMS
from chemtwin.errors import InputError
from chemtwin.spectral_models.payne import LEAKY_SLOPE, PayneEmulator

# torch.func's forward-mode autodiff is not safe to enter from several threads at once
_FORWARD_AD = threading.Lock()
RV_UNIT = 10.0  # km/s per unit of the fitted RV parameter (keeps it O(1) like the labels)


class SpectrumModel:
    """Model flux of stars at theta, on the emulator's pixels (shifted by RV when ``rv``).

    ``wavelength`` (P,) is needed for ``rv=True`` when the emulator stores none; a grid that
    differs from the emulator's own is refused (resample the spectra first).
    """

    def __init__(self, emulator: PayneEmulator, wavelength=None, *, rv: bool = False, rv_max: float = 200.0,
                 shared_hessian: bool = False):
        if not rv_max > 0:
            raise InputError(f"rv_max must be positive, not {rv_max}")
        if shared_hessian and emulator.format != "mlp":
            raise InputError("hessian='shared' needs an MLP-format emulator")
        self.emulator = emulator.eval()
        self.rv, self.rv_max, self.shared_hessian = bool(rv), float(rv_max), bool(shared_hessian)
        self.n_labels = emulator.n_labels
        self.n_par = self.n_labels + int(self.rv)
        self.dtype = emulator.dtype
        self._g_cache = None
        if wavelength is None:
            wavelength = emulator.wavelength
        elif emulator.wavelength is not None and (
            np.shape(wavelength) != emulator.wavelength.shape
            or not np.allclose(wavelength, emulator.wavelength, rtol=1e-7, atol=0)
        ):
            raise InputError("the spectra's wavelength grid differs from the emulator's; resample them first")
        if wavelength is not None and np.size(wavelength) != emulator.n_pixels:
            raise InputError(f"wavelength has {np.size(wavelength)} pixels, the emulator {emulator.n_pixels}")
        if self.rv:
            self._setup_shift(wavelength)

    def emulate(self, s: torch.Tensor) -> torch.Tensor:
        """Rest-frame flux (R, P) at scaled labels s (R, L)."""
        return self.emulator.forward_scaled(s.to(self.dtype))

    def _setup_shift(self, wavelength) -> None:
        """Pixel geometry for radial-velocity shifts: log-uniform pixels, in one or more chips."""
        if wavelength is None:
            raise InputError("fitting RV needs a wavelength grid (the emulator stores none; give the spectra's)")
        log_wl = np.log(np.asarray(wavelength, dtype=np.float64))
        steps = np.diff(log_wl)
        if log_wl.size < 4 or not np.all(np.isfinite(log_wl)) or not np.all(steps > 0):
            raise InputError("fitting RV needs a finite, strictly increasing wavelength grid of at least 4 pixels")
        dx = float(np.median(steps))
        gap = steps > 1.5 * dx
        if not np.all(gap | (np.abs(steps - dx) <= 1e-4 * dx)):
            raise InputError("fitting RV needs pixels uniform in log wavelength (within each detector chip); resample first")
        self._pixel_kms = dx * SPEED_OF_LIGHT_KMS
        # each chip padded on both sides with copies of its edge pixels, wide enough for any shift
        pad = int(math.ceil(self.rv_max / self._pixel_kms)) + 3
        starts = np.flatnonzero(np.r_[True, gap])
        stops = np.r_[starts[1:], log_wl.size]
        source, self._pad_chips = [], []  # chips: (first pixel in the padded layout, pixels)
        for a, b in zip(starts, stops):
            self._pad_chips.append((sum(map(len, source)) + pad, int(b - a)))
            source.append(np.r_[np.full(pad, a), np.arange(a, b), np.full(pad, b - 1)])
        self._pad_source = torch.as_tensor(np.concatenate(source))
        self._pad_arange = torch.arange(self._pad_source.numel())
        n_half = int(math.ceil(self.rv_max / (0.5 * self._pixel_kms)))
        self.rv_grid = torch.linspace(-self.rv_max, self.rv_max, 2 * n_half + 1, dtype=torch.float64)

    def shift(self, flux: torch.Tensor, rv_kms: torch.Tensor) -> torch.Tensor:
        """Model flux (R, P) seen at radial velocity rv (R,): f(lambda / (1 + rv/c)).

        On a log-uniform grid a velocity is the same shift k (in pixels) everywhere, so
        observed pixel i shows the rest-frame flux at position i - k, interpolated by
        cubic convolution (Catmull-Rom: continuous first derivative, so chi2 is smooth in
        rv).  Neighbours beyond a chip's ends repeat its edge pixel.
        """
        position = -torch.log1p(rv_kms / SPEED_OF_LIGHT_KMS) * (SPEED_OF_LIGHT_KMS / self._pixel_kms)  # (R,)
        whole = torch.floor(position.detach())
        t = (position - whole).to(flux.dtype)[:, None]  # (R, 1)
        t2, t3 = t * t, t * t * t
        weights = (0.5 * (-t3 + 2 * t2 - t), 0.5 * (3 * t3 - 5 * t2 + 2), 0.5 * (-3 * t3 + 4 * t2 + t), 0.5 * (t3 - t2))
        padded = flux[:, self._pad_source]
        index = (self._pad_arange[None, :] + whole.long()[:, None]).clamp(0, self._pad_arange.numel() - 1)
        moved = torch.gather(padded, 1, index)  # moved[r, q] = padded[r, q + whole_r]
        return torch.cat(
            [sum(w * moved[:, a + k : a + k + n] for k, w in zip(range(-1, 3), weights)) for a, n in self._pad_chips], 1
        )

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """theta (R, n): scaled labels (+ rv / RV_UNIT) -> model flux (R, P)."""
        flux = self.emulate(theta[:, : self.n_labels])
        if self.rv:
            flux = self.shift(flux, theta[:, self.n_labels] * RV_UNIT)
        return flux

    def jacobian(self, theta: torch.Tensor) -> torch.Tensor:
        """Exact d model / d theta, (R, P, n), by forward-mode autodiff (one tangent per parameter)."""
        tangents = torch.eye(self.n_par, dtype=theta.dtype)[:, None, :].expand(-1, theta.shape[0], -1)

        def column(t):
            return torch.func.jvp(self, (theta,), (t,))[1]

        with _FORWARD_AD, torch.no_grad():
            cols = torch.func.vmap(column)(tangents)  # (n, R, P)
        return cols.permute(1, 2, 0)

    def forward(self, theta: torch.Tensor):
        """Model flux (R, P) at theta (R, n), and what :meth:`derivatives` needs of it."""
        s = theta[:, : self.n_labels].to(self.dtype)
        if self.shared_hessian:
            base, d0, d1 = _mlp_forward(self.emulator, s)
        else:
            base, d0, d1 = self.emulate(s), None, None
        flux = self.shift(base, theta[:, self.n_labels] * RV_UNIT) if self.rv else base
        return flux, (base, d0, d1)

    def derivatives(self, theta, r, w, state, shared_g):
        """Gradient half J^T W r (R, n) and Gauss-Newton matrix (R, n, n), float64, at theta (R, n)
        with residuals r = model - data (R, P) and the :meth:`forward` state there."""
        if not self.shared_hessian:
            jac = self.jacobian(theta)
            wj = jac * w[:, :, None]
            return torch.einsum("rpn,rp->rn", wj, r).double(), torch.bmm(wj.transpose(1, 2), jac).double()
        # MLP: the gradient by backpropagation written out (exact, and cheaper than autograd's
        # graph); the label block of the matrix from the shared W2^T diag(w_bar) W2
        em, n_lab = self.emulator, self.n_labels
        base, d0, d1 = state
        scale, g_bar = shared_g
        g = torch.zeros(theta.shape[0], self.n_par, dtype=torch.float64)
        h = torch.zeros(theta.shape[0], self.n_par, self.n_par, dtype=torch.float64)
        h[:, :n_lab, :n_lab] = _mlp_gauss_newton(em, d0, d1, g_bar).double() * scale[:, None, None]
        u = w * r
        if not self.rv:
            g[:, :n_lab] = _mlp_backward(em, d0, d1, u).double()
            return g, h
        # radial velocity: the shift is linear in the rest-frame flux; its rows of the matrix are exact
        v = theta[:, n_lab]

        def shift(f, v_):
            return self.shift(f, v_ * RV_UNIT)

        with _FORWARD_AD:
            _, j_rv = torch.func.jvp(lambda v_: shift(base, v_), (v,), (torch.ones_like(v),))
        _, to_rest = torch.func.vjp(lambda f: shift(f, v), base)
        wj = w * j_rv
        g[:, :n_lab] = _mlp_backward(em, d0, d1, to_rest(u)[0]).double()
        g[:, n_lab] = (wj * r).sum(1, dtype=torch.float64)
        col = _mlp_backward(em, d0, d1, to_rest(wj)[0]).double()
        h[:, :n_lab, n_lab] = col
        h[:, n_lab, :n_lab] = col
        h[:, n_lab, n_lab] = (wj * j_rv).sum(1, dtype=torch.float64)
        return g, h

    def shared_g(self, w: torch.Tensor):
        """Per-row weight scale (R,), W2^T diag(w_bar) W2 (H2, H2) and w_bar (P,) for the shared
        Gauss-Newton matrix; None when it is not used."""
        if not self.shared_hessian:
            return None
        scale = w.mean(1).clamp_min(1e-30)
        w_bar = (w / scale[:, None]).mean(0)
        cached = self._g_cache  # batches usually share their pixel weights: reuse the (H2, H2) product
        if cached is None or not torch.equal(cached[0], w_bar):
            w2 = self.emulator.w_array_2
            cached = self._g_cache = (w_bar, w2.T @ (w2 * w_bar[:, None]))
        return scale, cached[1], w_bar

    def fisher(self, theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """J^T W J (B, n, n) float64 at theta (B, n), exact.

        For MLP emulators without RV and stars whose weights are w_bar up to a factor (noiseless
        or constant-SNR spectra with one mask), the shared matrix is exact and costs about one
        emulator evaluation; the other stars take the full Jacobian (L emulator evaluations).
        """
        fisher = torch.empty(theta.shape[0], self.n_par, self.n_par, dtype=torch.float64)
        general = torch.ones(theta.shape[0], dtype=torch.bool)
        if self.shared_hessian and not self.rv:
            scale, g_bar, w_bar = self.shared_g(w)
            general = (w / scale[:, None] - w_bar).abs().amax(1) > 1e-6 * w_bar.abs().amax()
            shared = ~general
            if shared.any():
                _, d0, d1 = _mlp_forward(self.emulator, theta[shared].to(self.dtype))
                fisher[shared] = (_mlp_gauss_newton(self.emulator, d0, d1, g_bar) * scale[shared, None, None]).double()
        if general.any():
            jac = self.jacobian(theta[general])
            fisher[general] = torch.bmm((jac * w[general][:, :, None]).transpose(1, 2), jac).double()
        return fisher

    # ------------------------------------------------------------------ fitting


def _mlp_forward(em: PayneEmulator, s: torch.Tensor):
    """Flux (R, P) of an MLP emulator at scaled labels s (R, L), and the slopes of its two
    leaky ReLUs there, d0 (R, H) and d1 (R, H2) (1 or LEAKY_SLOPE)."""
    z0 = torch.addmm(em.b_array_0, s, em.w_array_0.T)
    d0 = torch.full_like(z0, LEAKY_SLOPE).masked_fill_(z0 > 0, 1.0)
    z1 = torch.addmm(em.b_array_1, z0 * d0, em.w_array_1.T)
    d1 = torch.full_like(z1, LEAKY_SLOPE).masked_fill_(z1 > 0, 1.0)
    return torch.addmm(em.b_array_2, z1 * d1, em.w_array_2.T), d0, d1


def _mlp_backward(em: PayneEmulator, d0: torch.Tensor, d1: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J^T u (R, L) for cotangents u (R, P): backpropagation through the MLP with slopes d0, d1."""
    return ((u @ em.w_array_2 * d1) @ em.w_array_1 * d0) @ em.w_array_0


def _mlp_gauss_newton(em: PayneEmulator, d0: torch.Tensor, d1: torch.Tensor, g_bar: torch.Tensor) -> torch.Tensor:
    """A^T g_bar A (R, L, L) with A = D1 W1 D0 W0 (R, H2, L), the Jacobian of the last hidden layer."""
    a = _left_multiply(em.w_array_1, d0[:, :, None] * em.w_array_0) * d1[:, :, None]
    return torch.bmm(a.transpose(1, 2), _left_multiply(g_bar, a))


def _left_multiply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m (H2, H) times every x[r] (H, L) -> (R, H2, L), as one large matrix product."""
    r, h, n = x.shape
    return (m @ x.permute(1, 0, 2).reshape(h, r * n)).reshape(m.shape[0], r, n).permute(1, 0, 2)
