"""The lecture's t-SNE check of the synthetic gap, in one figure (``chemtwin cyclestarnet tsne``).

Up to three panels, each a t-SNE map (scikit-learn, after PCA to 50 dimensions) of a sample of
synthetic and observed-like spectra: **before augmentation** (the mismatched synthesizer alone),
**after augmentation** (LSF, tellurics, persistence, continuum errors, noise) and **after
Cycle-StarNet** (both domains in the shared latent z_sh: synthetic spectra through the synthetic
encoder, observed ones through the observed encoder).  Real spectra on the same pixels
(``real``) are drawn in every panel.  Where the domains form separate islands, a model of one
does not describe the other; after a successful adaptation they overlap.  Masked pixels
(ivar 0) are read as the continuum (1).  Legends sit outside the axes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.data.dataset import open_dataset
from chemtwin.errors import InputError
from chemtwin.tagging import cyclestarnet_train

STYLES = {"synthetic": ("tab:blue", "o"), "observed-like": ("tab:orange", "s"), "real": ("black", "*")}


def _sample(path, n: int, rng, n_pixels: int | None = None):
    with open_dataset(path) as ds:
        if n_pixels is not None and ds.n_pixels != n_pixels:
            raise InputError(f"{ds.path}: spectra have {ds.n_pixels} pixels, the others {n_pixels}")
        rows = np.sort(rng.choice(ds.n_stars, size=min(n, ds.n_stars), replace=False))
        b = ds.take(rows)
        return np.where(b.ivar > 0, b.flux, 1.0).astype(np.float32), np.asarray(b.ivar), ds.n_pixels


def _embed(blocks: dict, seed: int) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    names = list(blocks)
    x = np.concatenate([blocks[k] for k in names])
    x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x - x.mean(0))
    y = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
    out, a = {}, 0
    for k in names:
        out[k] = y[a : a + len(blocks[k])]
        a += len(blocks[k])
    return out, _separability(x, len(blocks["synthetic"]), len(blocks["observed-like"]), seed)


def _separability(x, n_syn: int, n_obs: int, seed: int) -> float:
    """Cross-validated balanced accuracy of a 5-nearest-neighbour synthetic/observed-like classifier
    on the PCA features (0.5: the domains cannot be told apart; 1: separate islands)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    origin = np.r_[np.zeros(n_syn, int), np.ones(n_obs, int)]
    folds = StratifiedKFold(n_splits=min(5, n_syn, n_obs), shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(n_neighbors=min(5, n_syn - 1, n_obs - 1))
    return float(np.mean(cross_val_score(knn, x[: n_syn + n_obs], origin, cv=folds, scoring="balanced_accuracy")))


def tsne_figure(syn, obs, out, *, raw=None, model=None, real=None, n_stars: int = 400, seed: int = 0,
                overwrite: bool = False) -> tuple[Path, dict]:
    """Write the figure (PNG) and return its path and each panel's domain accuracy; see the module docstring.  Each panel's title gives
    how well a 5-nearest-neighbour classifier tells the two domains apart (``_separability``)."""
    out = prepare_output(out, overwrite)
    rng = np.random.default_rng(seed)
    xs, _, n_pixels = _sample(syn, n_stars, rng)
    xo, wo, _ = _sample(obs, n_stars, rng, n_pixels)
    extra = {}
    if real is not None:
        extra["real"] = _sample(real, n_stars, rng, n_pixels)[:2]
    panels = []
    if raw is not None:
        panels.append(("before augmentation", {"synthetic": xs, "observed-like": _sample(raw, n_stars, rng, n_pixels)[0],
                                                **{k: v[0] for k, v in extra.items()}}))
    panels.append(("after augmentation", {"synthetic": xs, "observed-like": xo, **{k: v[0] for k, v in extra.items()}}))
    if model is not None:
        net, _, _, _ = cyclestarnet_train.load(model)
        if net.n_pixels != n_pixels:
            raise InputError(f"{model}: the model has {net.n_pixels} pixels, the spectra {n_pixels}")
        import torch

        with torch.no_grad():
            zs = net.encode_syn(torch.from_numpy(xs)).numpy()
        blocks = {"synthetic": zs, "observed-like": cyclestarnet_train.shared_latents(net, xo, wo)}
        blocks.update({k: cyclestarnet_train.shared_latents(net, f, i) for k, (f, i) in extra.items()})
        panels.append(("after Cycle-StarNet (shared latent)", blocks))
    maps = [(title, _embed(blocks, seed)) for title, blocks in panels]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps) + 1.6, 4.2), layout="constrained", squeeze=False)
    for ax, (title, (m, score)) in zip(axes[0], maps):
        for name, y in m.items():
            color, marker = STYLES[name]
            ax.scatter(y[:, 0], y[:, 1], s=60 if name == "real" else 6, c=color, marker=marker, alpha=0.6,
                       label=f"{name} ({len(y)})", edgecolors="none" if name != "real" else "white")
        ax.set_title(f"{title}\n5-NN domain accuracy {score:.2f} (0.5: mixed)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=9, markerscale=2)
    fig.suptitle(f"t-SNE: synthetic vs observed-like spectra ({os.path.basename(str(syn))}, "
                 f"{os.path.basename(str(obs))})", fontsize=10)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out, {title: score for title, (_, score) in maps}
