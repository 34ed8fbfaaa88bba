"""Fitting spectra with a Payne emulator: all labels free, optional radial velocity.

For every star we minimize chi2 = sum_p w_p (model_p(labels, rv) - flux_p)^2 with
w = ivar (0 on masked pixels), batched over stars, by Levenberg-Marquardt in torch:

1. **Starting points** (``n_starts``, default 2).  ``n_candidates`` label vectors (a
   scrambled Sobol set in the scaled box plus its centre) are emulated once.  Ridge
   regressions of their labels on their spectra are crude inverses of the emulator; the
   starts of a star are the guess of a strongly regularized one (robust to noise, shifts
   and model error), that of a weakly regularized one (closer on clean spectra), then the
   candidate with the lowest chi2 (one matrix product for all stars and candidates) and,
   beyond three starts, random offsets (0.05 of the box) from the first guess.  Masked
   pixels take the flux emulated at the best candidate, then at the guess, before a
   regression is applied.  With ``rv=True`` a grid of velocities is scanned first with
   the centre spectrum and the spectra are moved to the rest frame for all this.
2. **Levenberg-Marquardt** in the scaled label space (s in [-0.5, 0.5]; steps are
   projected back into the box), all starts of all stars in one batch.  A trial step
   costs one emulator evaluation (chi2); the derivatives are computed only where the
   step is taken.  The gradient J^T W r is exact: backpropagation written out for the
   MLP format (cheaper than autograd's graph), reverse-mode autodiff otherwise.  The
   Gauss-Newton matrix J^T W J comes from forward-mode autodiff (``hessian="exact"``),
   or, for the MLP format, from ``A^T (W2^T diag(w_bar) W2) A`` with A the (cheap)
   Jacobian of the last hidden layer and w_bar the batch's mean pixel weights
   (``hessian="shared"``; exact when all stars share their pixel weights up to a factor,
   e.g. noiseless or constant-SNR data, and a good preconditioner otherwise).
   Radial-velocity rows of the matrix are always exact.  A start stops when chi2 stops
   changing (``ftol`` relative; ``chi2_tol`` absolute for ivar-weighted stars), when it
   runs into a better start of the same star, or when another start converged to a
   chi2 ten times lower.
3. **Restarts** (``n_retries`` rounds, default 3).  The chi2 of a leaky-ReLU emulator is
   piecewise smooth and LM can stop in a wrong basin.  A star whose reduced chi2 is
   above ``retry_factor`` (10) times the median of the stars fitted in the same call with
   the same kind of weights (and, for unit weights, above an RMS residual of 1e-6) is
   fitted again from ``retry_starts`` (8) random offsets (0.05 of the box) around its best
   fit; the better fit is kept.  Decided over the whole ``fit`` call, so results do not
   depend on batches or threads.
4. **Uncertainties.**  At the best fit, (J^T W J)^-1 in physical units: from the shared
   matrix where it is exact (MLP, no RV, the star's weights proportional to w_bar),
   else from the full Jacobian (forward-mode autodiff, L emulator evaluations).  For
   stars fitted with unit weights (noiseless: ivar inf, or ``weighting="uniform"``) it
   is scaled by chi2 / (n_pixels - n_par).

The package: ``forward`` (the model spectrum at labels and RV, and its derivatives), ``fitter``
(``PayneFitter``: starts, Levenberg-Marquardt, restarts, uncertainties), ``result``
(``FitResult``), ``dataset_fit`` (``fit_dataset``: a dataset in, a labels file out).
"""

from chemtwin.tagging.payne_fit.dataset_fit import fit_dataset
from chemtwin.tagging.payne_fit.fitter import HESSIANS, WEIGHTINGS, PayneFitter
from chemtwin.tagging.payne_fit.result import FitResult

__all__ = ["HESSIANS", "WEIGHTINGS", "FitResult", "PayneFitter", "fit_dataset"]
