"""The Cannon (Ness et al. 2015), vectorized over pixels and over stars.

Each pixel's flux is a polynomial in the (scaled) labels, f_np = theta_p . v(l_n),
with Gaussian noise of variance sigma_np^2 + s_p^2, where s_p^2 is the pixel's
intrinsic scatter.  Two small classes:

* :class:`PolynomialVectorizer`: labels -> design matrix ``v(l)`` (and its
  derivative).  Terms are monomials of total degree <= ``order`` in the labels,
  scaled as ``(l - offsets) / scales`` with offsets and scales taken from the
  training labels (median and the 2.5-97.5 percentile range, as in the reference
  implementation AnniesLasso).
* :class:`Cannon`: the model, scikit-learn style: ``fit(flux, ivar, labels)``,
  ``predict_flux(labels)``, ``predict(flux, ivar)``, ``test(flux, ivar)`` (labels,
  covariances, chi^2), ``score(flux, ivar, labels)``, ``save(path)``/``load(path)``.

Training maximizes the per-pixel likelihood
``-2 ln L_p = sum_n (f_np - theta_p . v_n)^2 / (sigma_np^2 + s_p^2) + ln(sigma_np^2 + s_p^2)``
by alternating, for all pixels at once, (1) weighted least squares for theta with
weights 1/(sigma^2 + s^2) (normal matrices of every pixel from one matrix product)
and (2) the exact 1-D minimization in s^2 (bracketed Newton on the derivative,
vectorized over pixels).  Each step lowers the likelihood; a pixel stops when its
s^2 stops moving.

The test step fits each spectrum's labels by Levenberg-Marquardt, vectorized over
stars.  Because the model is linear in v(l), a star's chi^2 is a quadratic form in v:
chi^2 = c - 2 b.v + v.G v with G = theta^T W theta and b = theta^T W f (W: the star's
weights).  G and b cost one matrix product per batch of stars; everything after that
works on T x T matrices (T = number of terms) instead of on pixels.  Starting points
(the training median, +-1 sigma along each label, and the linear-algebra estimate:
the linear terms of the v that minimizes the quadratic form) are screened by chi^2
and the fit runs from the best ``n_fits`` of each star; the lower chi^2 wins.  The
formal covariance is (J^T W J)^-1 at the best fit.

Masks: ``pixel_mask`` (P,) excludes pixels from the model (continuum pixels, known
bad regions); ``censors`` (L, P) lets pixel p depend on label l only where True
(AnniesLasso's censoring); ivar = 0 marks a bad pixel of one star (its flux may be
NaN); ivar = inf a noiseless one (counted as sigma = 1e-6).

Work is spread over ``n_jobs`` threads (blocks of pixels in training, batches of
stars in the test step) with BLAS held to one thread; results do not depend on it
(beyond rounding).

Models are saved as ``.npz`` (read with ``allow_pickle=False``): arrays plus a
JSON header, no pickle.

The package: ``vectorizer`` (labels -> design matrix), ``fitting`` (the numerics of training
and of the test step), ``model`` (``Cannon``, ``CannonTestResult``), ``model_file`` (its file).
"""

from chemtwin.tagging.cannon.model import Cannon, CannonTestResult
from chemtwin.tagging.cannon.vectorizer import PolynomialVectorizer, monomials, polynomial_terms

__all__ = ["Cannon", "CannonTestResult", "PolynomialVectorizer", "monomials", "polynomial_terms"]
