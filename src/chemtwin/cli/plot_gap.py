"""``chemtwin plot-gap SYN.h5 REAL.h5 --out PNG``: t-SNE map of synthetic and real spectra together."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chemtwin.cli.arguments import positive_int, seed
from chemtwin.core.files import prepare_output, temporary_path
from chemtwin.core.grids import convert, get_grid, identify_grid
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError

MIN_PER_CLASS_FOR_SCORE = 5


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot-gap",
        help="t-SNE map of synthetic vs real spectra (the synthetic gap)",
        description=(
            "Embed spectra of two datasets together with PCA + t-SNE (scikit-learn) and colour them "
            "by origin; masked pixels are filled with 1 (the continuum). Also prints how well a "
            "5-nearest-neighbour classifier tells the two apart in PCA space (balanced accuracy, "
            "0.5 = indistinguishable)."
        ),
    )
    p.add_argument("synthetic", metavar="SYN.h5", help="synthetic (or augmented) dataset")
    p.add_argument("real", metavar="REAL.h5", help="real dataset (e.g. from `chemtwin ingest`)")
    p.add_argument("--out", required=True, metavar="PNG", help="figure to write")
    p.add_argument("--max-spectra", type=positive_int, default=1000, help="at most this many spectra from each file (random, default 1000; t-SNE time grows fast with it)")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (lowered automatically for few spectra)")
    p.add_argument("--seed", type=seed, default=0, help="seed for the subsample and t-SNE")
    p.add_argument("--overwrite", action="store_true", help="replace PNG if it exists")
    p.set_defaults(func=run)


def _common_grid(wl_a: np.ndarray, wl_b: np.ndarray) -> tuple[str | None, str | None, str | None]:
    """(grid of a, grid of b, common grid) -- all None when both wavelength arrays are equal."""
    if wl_a.shape == wl_b.shape and np.allclose(wl_a, wl_b, rtol=1e-9, atol=0):
        return None, None, None
    a, b = identify_grid(wl_a), identify_grid(wl_b)
    if a is None or b is None:
        raise InputError("the two datasets are on different wavelength grids that are not both APOGEE grids")
    common = a if get_grid(a).n_pixels <= get_grid(b).n_pixels else b
    return a, b, common


def load_filled(path: str, max_rows: int, rng: np.random.Generator):
    """Up to ``max_rows`` random spectra with masked pixels set to 1, and the wavelength."""
    with open_dataset(path) as ds:
        if ds.n_stars == 0:
            raise InputError(f"{path}: dataset has no spectra")
        n = min(ds.n_stars, max_rows)
        rows = np.sort(rng.choice(ds.n_stars, size=n, replace=False))
        batch = ds.take(rows)
        wavelength = ds.wavelength
    flux = batch.flux.astype(np.float64)
    good = np.isfinite(flux) & np.isfinite(batch.ivar) & (batch.ivar > 0)
    return np.where(good, flux, 1.0), wavelength


def origin_score(features: np.ndarray, origin: np.ndarray, seed: int) -> float | None:
    """Cross-validated balanced accuracy of a 5-NN origin classifier, or None with too few spectra."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    counts = np.bincount(origin, minlength=2)
    if counts.min() < MIN_PER_CLASS_FOR_SCORE:
        return None
    folds = StratifiedKFold(n_splits=min(5, int(counts.min())), shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=min(5, int(counts.min()) - 1))
    return float(np.mean(cross_val_score(knn, features, origin, cv=folds, scoring="balanced_accuracy")))


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if args.max_spectra < 1:
        raise InputError("--max-spectra must be >= 1")
    if args.perplexity <= 0:
        raise InputError("--perplexity must be > 0")
    out = prepare_output(args.out, args.overwrite, inputs=(args.synthetic, args.real))
    if out.suffix.lower() != ".png":
        raise InputError(f"{out}: the figure is written as PNG; name it *.png")
    rng = np.random.default_rng(args.seed)
    syn, wl_syn = load_filled(args.synthetic, args.max_spectra, rng)
    real, wl_real = load_filled(args.real, args.max_spectra, rng)
    grid_syn, grid_real, common = _common_grid(wl_syn, wl_real)
    if common is not None:
        syn = convert(syn, grid_syn, common, fill=1.0)
        real = convert(real, grid_real, common, fill=1.0)
    x = np.concatenate([syn, real])
    origin = np.concatenate([np.zeros(len(syn), dtype=int), np.ones(len(real), dtype=int)])
    n = len(x)
    if n < 4:
        raise InputError(f"t-SNE needs at least 4 spectra in all; got {n}")
    pca = PCA(n_components=min(50, n - 1, x.shape[1]), random_state=args.seed)
    features = pca.fit_transform(x)
    perplexity = min(args.perplexity, max(1.0, (n - 1) / 3.0))
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=args.seed).fit_transform(features)
    score = origin_score(features, origin, args.seed)

    fig, ax = plt.subplots(figsize=(7.5, 6), layout="constrained")
    for value, label, colour in ((0, f"synthetic ({len(syn)})", "tab:blue"), (1, f"real ({len(real)})", "tab:red")):
        sel = origin == value
        ax.scatter(embedding[sel, 0], embedding[sel, 1], s=8 if value == 0 else 18, alpha=0.6, c=colour, label=label,
                   edgecolors="none")
    title = "synthetic vs real spectra (t-SNE)"
    if score is not None:
        title += f"\n5-NN origin balanced accuracy {score:.2f} (0.5 = no gap)"
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.legend(loc="outside right upper", fontsize=9)  # off the data
    tmp = temporary_path(Path(out))
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    score_text = f"{score:.3f}" if score is not None else f"n/a (needs >= {MIN_PER_CLASS_FOR_SCORE} spectra per origin)"
    print(f"wrote {out}: {len(syn)} synthetic + {len(real)} real spectra, perplexity {perplexity:.1f}; "
          f"5-NN origin balanced accuracy {score_text}")
    return 0
