"""The benchmark report: ``report.md`` and its figures from a bench folder's results.

Figures (PNG, matplotlib):

* ``reconstruction.png``   the 2019 paper's Figure 1: the first 256 pixels of a validation
                           star, its reconstruction, and its reconstruction from its twin's latent
* ``rank_cdf.png``         cumulative doppelganger-rank distributions, one panel per scenario
* ``latent_map.png``       t-SNE of the fader and cae latents coloured by TEFF, LOGG and FE_H
                           (the title says what is shown; whether it is disentangled is for the
                           reader and the R² table to judge)
* ``training_curves.png``  validation rank-0 fraction, reconstruction error and adversary
                           accuracy against training time, from each model's ``history.csv``

The report's header gives the date, chemtwin's version and the git commit of the code that ran
(``software_record``; "unknown" outside a git checkout), and a short "What this run says" section
written from the numbers of the table (``run_summary``), not canned text; both in
``chemtwin.evaluation.summary``.  Stars in figures are
named by their ``star_id`` (APOGEE_ID for real spectra) or row, with TEFF and LOGG; legends sit
outside the data area, so that figures keep their layout with many curves or stars.

Row names and the published anchors (docs/science.md section 3) beside our rows are the
methods' own (``Method.label``, ``Method.published``); the files are found through
``chemtwin.evaluation.bench_folder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from chemtwin.core.files import atomic_output
from chemtwin.core.ranks import twin_pairs
from chemtwin.data.dataset import open_dataset
from chemtwin.evaluation.bench_folder import BenchFolder
from chemtwin.evaluation.metrics import draw_rank_cdf
from chemtwin.evaluation.spectra_figure import star_label
from chemtwin.evaluation.summary import label_of, pct, run_summary, software_record
from chemtwin.methods import METHODS
from chemtwin.tagging.estimator import ChemTwin
from chemtwin.tagging.model_folder import read_history

PIXELS_SHOWN = 256
MAP_STARS = 1500


def anchor_text(method: str, snr: float, mismatch: bool) -> str:
    if mismatch or method not in METHODS:
        return ""
    published = METHODS[method].published.get(snr, [])
    return "; ".join(f"{name}: {a:.1f} / {b:.1f} / {c:.1f}" for name, (a, b, c) in published)


def _trained_models() -> list[str]:
    """The registered methods that rank a trained model's own latents, in registry order."""
    return [name for name, m in METHODS.items() if m.model_kind is not None and m.base is None]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _reference_scenario(results: dict) -> str | None:
    """SNR inf when it was run (the paper's figures are noiseless), else the first."""
    names = [r["scenario"] for r in results["rows"]]
    return "snrinf" if "snrinf" in names else (names[0] if names else None)


def plot_reconstruction(model_dir: Path, data_path: Path, path: Path, pair: int = 0) -> Path | None:
    model = ChemTwin.load(model_dir)
    with open_dataset(data_path) as ds:
        qi, tj = twin_pairs(np.asarray(ds.group))
        if qi.size == 0:
            return None
        i, j = int(qi[pair]), int(tj[pair])
        b = ds.take(np.array(sorted((i, j))))
        wl = ds.wavelength
        cols = ds.label_columns(model.condition)
        ids = {k: (ds.column("star_id", k, k + 1)[0] if ds.has_star_id else None) for k in (i, j)}
        names = [n for n in ("TEFF", "LOGG") if n in ds.label_names]
        tl = ds.label_columns(names) if names else []
    rows = {i: 0, j: 1} if i < j else {i: 1, j: 0}

    def who(k):
        return star_label(ids[k], k, dict(zip(names, b.labels[rows[k], tl])) if names else {})

    flux, ivar, cond = b.flux.astype(np.float32), b.ivar.astype(np.float32), b.labels[:, cols].astype(np.float32)
    z = model.transform(flux, ivar, cond)
    own = model.swap(z[[rows[i]]], cond[[rows[i]]])[0]
    twin = model.swap(z[[rows[j]]], cond[[rows[i]]])[0]
    x = flux[rows[i]]
    n = min(PIXELS_SHOWN, len(wl))
    plt = _plt()
    fig, (ax, ax_res) = plt.subplots(2, 1, figsize=(9, 6.0), dpi=120, sharex=True, height_ratios=(3, 1.3),
                                     layout="constrained")
    ax.plot(wl[:n], x[:n], color="k", lw=1.2, label="spectrum x_i")
    ax.plot(wl[:n], own[:n], color="tab:blue", lw=1, label="D(E(x_i, u_i), u_i)")
    ax.plot(wl[:n], twin[:n], color="tab:orange", lw=1, ls="--", label="D(E(x_j, u_j), u_i)  (twin's latent)")
    ax.set_ylabel("normalized flux")
    ax.set_title(f"i = {who(i)}\nits twin j = {who(j)}; first {n} pixels", fontsize=9)
    fig.legend(loc="outside lower center", ncol=3, fontsize=8)
    ax_res.plot(wl[:n], own[:n] - x[:n], color="tab:blue", lw=0.8)
    ax_res.plot(wl[:n], twin[:n] - x[:n], color="tab:orange", lw=0.8, ls="--")
    ax_res.axhline(0, color="0.5", lw=0.6)
    ax_res.set_ylabel("residual")
    ax_res.set_xlabel("vacuum wavelength (Angstrom)")
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_rank_cdfs(root: Path, results: dict, path: Path) -> Path | None:
    folder = BenchFolder(root)
    by_scenario: dict[str, list] = {}
    bases = [name for name, m in METHODS.items() if m.base is None]
    for r in results["rows"]:
        ranks = folder.read_ranks(r["method"], r["scenario"])
        if ranks is not None:
            # a wrapped row (a learned metric): dashed, in its base method's colour
            method = METHODS.get(r["method"])
            base = method.base.name if method is not None and method.base is not None else r["method"]
            style = {"color": f"C{bases.index(base) % 10}" if base in bases else None,
                     "ls": "--" if base != r["method"] else "-"}
            by_scenario.setdefault(r["label"], []).append((label_of(r["method"]), ranks, r["n_stars"], style))
    if not by_scenario:
        return None
    plt = _plt()
    k = len(by_scenario)
    cols = min(k, 3)
    rws = -(-k // cols)
    fig, axes = plt.subplots(rws, cols, figsize=(5.4 * cols + 3.2, 4.2 * rws), dpi=110, squeeze=False,
                             layout="constrained")
    for ax, (label, curves) in zip(axes.ravel(), by_scenario.items()):
        draw_rank_cdf(ax, curves, label, legend=False)
    for ax in axes.ravel()[k:]:
        ax.set_visible(False)
    # one legend for all panels, outside them (each method once, in the order first drawn)
    handles = {}
    for ax in axes.ravel()[:k]:
        for h, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, h)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
               ncol=1 + len(handles) // (12 * rws + 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latent_map(root: Path, scenario: str, path: Path, seed: int = 0) -> Path | None:
    from sklearn.manifold import TSNE


    folder = BenchFolder(root)
    models = [m for m in _trained_models() if (folder.model(m, scenario) / "model.safetensors").is_file()]
    if not models:
        return None
    names = ("TEFF", "LOGG", "FE_H")
    units = {"TEFF": "TEFF (K)", "LOGG": "LOGG (dex)", "FE_H": "[Fe/H] (dex)"}
    with open_dataset(folder.dataset("val", scenario)) as ds:
        rows = np.sort(np.random.default_rng(seed).choice(ds.n_stars, min(MAP_STARS, ds.n_stars), replace=False))
        b = ds.take(rows)
        colour = ds.true_labels(names)[rows]
        plt = _plt()
        fig, axes = plt.subplots(len(models), 3, figsize=(13, 4 * len(models) + 0.6), dpi=110, squeeze=False,
                                 layout="constrained")
        for r, m in enumerate(models):
            model = ChemTwin.load(folder.model(METHODS[m].model_kind, scenario))
            cond = b.labels[:, ds.label_columns(model.condition)].astype(np.float32)
            z = model.transform(b.flux.astype(np.float32), b.ivar.astype(np.float32), cond)
            ok = np.isfinite(z).all(axis=1)
            xy = TSNE(n_components=2, perplexity=min(30.0, max(2.0, (ok.sum() - 1) / 3)), init="pca",
                      random_state=seed).fit_transform(z[ok])
            for c, name in enumerate(names):
                ax = axes[r, c]
                sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour[ok, c], s=4, cmap="viridis", edgecolors="none")
                fig.colorbar(sc, ax=ax, label=units[name])
                ax.set_title(f"{label_of(m)}: t-SNE of z, coloured by {name}", fontsize=9)
                ax.set_xlabel("t-SNE 1")
                ax.set_ylabel("t-SNE 2")
    fig.suptitle(f"Latent space of {len(rows)} validation stars ({scenario}), 2-D t-SNE of z, "
                 "coloured by the true TEFF, LOGG and [Fe/H]", fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return path


def _history(model_dir: Path) -> dict[str, np.ndarray]:
    rows = read_history(model_dir)
    return {k: np.array([r.get(k, np.nan) for r in rows])
            for k in ("time_s", "val_rank0", "train_recon", "val_swap", "val_adv_acc", "adv_chance")}


def plot_training_curves(root: Path, results: dict, path: Path) -> Path | None:
    folder = BenchFolder(root)
    trained = _trained_models()
    runs = [(r["method"], r["scenario"], r["label"]) for r in results["rows"] if r["method"] in trained
            and (folder.model(METHODS[r["method"]].model_kind, r["scenario"]) / "history.csv").is_file()]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    scen = sorted({s for _, s, _ in runs}, key=[s for _, s, _ in runs].index)
    for m, s, label in runs:
        h = _history(folder.model(METHODS[m].model_kind, s))
        kw = dict(color=colours[scen.index(s) % len(colours)], ls="-" if trained.index(m) == 0 else ":", marker=".", ms=3,
                  label=f"{m}, {label}")
        axes[0].plot(h["time_s"], h["val_rank0"], **kw)
        axes[1].plot(h["time_s"], h["train_recon"], **kw)
        axes[2].plot(h["time_s"], h["val_adv_acc"], **kw)
    axes[0].set_ylabel("validation fraction with rank 0")
    axes[1].set_ylabel("training reconstruction loss (normalized)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("adversary accuracy on validation latents")
    for ax in axes:
        ax.set_xlabel("training time (s)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7,
               ncol=1 + len(runs) // 16)
    fig.savefig(path)
    plt.close(fig)
    return path


def _table(results: dict) -> list[str]:
    lines = ["| method | scenario | rank 0 (%) | rank < 0.1% N (%) | rank < 1% N (%) | median rank | N stars "
             "| train (s) | published rank 0 / < 0.1% / < 1% (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        med = "-" if r.get("median_rank") is None else f"{r['median_rank']:g}"
        train_s = "" if r.get("train_s") is None else f"{r['train_s']:.0f}"
        lines.append(f"| {label_of(r['method'])} | {r['label']} | {pct(r['frac_rank0'])} "
                     f"| {pct(r['frac_rank_lt_0p1pct'])} | {pct(r['frac_rank_lt_1pct'])} | {med} | {r['n_stars']} "
                     f"| {train_s} | {anchor_text(r['method'], r['snr'], r['mismatch'])} |")
    return lines


def _disentanglement_table(results: dict) -> list[str]:
    rows = [r for r in results["rows"] if r.get("condition_r2")]
    if not rows:
        return []
    names = list(rows[0]["condition_r2"])
    regs = list(rows[0]["condition_r2"][names[0]])
    head = " | ".join(f"{n} R² ({reg})" for n in names for reg in regs)
    lines = ["How much of the conditioned labels the latent still carries (cross-validated R² of regressors "
             "predicting each label from z; 0 = nothing, 1 = everything) and the spectral errors "
             "(mean squared flux error over good pixels: the star's own latent, and its twin's latent with "
             "its own TEFF, LOGG):", "",
             f"| model | scenario | {head} | reconstruction MSE | swapped-latent MSE |",
             "|---|---|" + "---|" * (len(names) * len(regs) + 2)]
    for r in rows:
        r2 = " | ".join(f"{r['condition_r2'][n][reg]:.2f}" for n in names for reg in regs)
        lines.append(f"| {label_of(r['method'])} | {r['label']} | {r2} "
                     f"| {_sci(r.get('mse_reconstruction'))} | {_sci(r.get('mse_swapped'))} |")
    return lines + [""]


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def _information(cfg: dict) -> str:
    """What the methods were given: the bench's protocol (runs before protocols were the paper's)."""
    if cfg.get("protocol", "paper") == "paper":
        return ("Information: the **paper protocol**. Every method is given the exact TEFF and LOGG; The Cannon "
                "trains on the true labels; The Payne fits with an emulator of the synthesizer that made the spectra. "
                "The oracle's bound is that of a method given TEFF and LOGG exactly.")
    e = cfg.get("label_errors", {})
    return ("Information: the **survey protocol**, only what a survey has. TEFF and LOGG carry survey-like errors "
            f"wherever a method reads them (random {e.get('teff_random', '?'):g} K and {e.get('logg_random', '?'):g} "
            f"dex; systematic {e.get('teff_per_feh', '?'):g} K and {e.get('logg_per_feh', '?'):g} dex per dex of "
            "FE_H). The model-based methods have another code than the one that made the spectra, at every SNR: "
            "the synthesizer with other atomic data (log gf off by 0.1 dex per line, 10% of the lines missing). "
            "The Payne fits with an emulator of that code, and The Cannon trains on the labels that "
            f"pipeline fitted to {cfg.get('pipeline_label_stars', 0):,} training stars. The decoded-twin metric is "
            "told the random errors, as a survey quotes TEFF_ERR and LOGG_ERR. Only the scores and the "
            "oracle read the true labels; the oracle's bound is that of a method given TEFF and LOGG with the "
            "quoted random errors.")


def write_report(root, results: dict) -> Path:
    """Figures into ``root/figures`` and ``root/report.md``; returns the report's path."""
    root = Path(root)
    folder = BenchFolder(root)
    figures = folder.figures
    figures.mkdir(parents=True, exist_ok=True)
    ref = _reference_scenario(results)
    made = {}
    if ref is not None and (folder.model("fader", ref) / "model.safetensors").is_file():
        made["reconstruction"] = plot_reconstruction(folder.model("fader", ref), folder.dataset("val", ref),
                                                     figures / "reconstruction.png")
    made["rank_cdf"] = plot_rank_cdfs(root, results, figures / "rank_cdf.png")
    if ref is not None:
        made["latent_map"] = plot_latent_map(root, ref, figures / "latent_map.png",
                                             seed=results["config"].get("seed", 0))
    made["training_curves"] = plot_training_curves(root, results, figures / "training_curves.png")

    cfg, mach = results["config"], results.get("machine", {})
    soft = {**software_record(), **results.get("software", {})}  # what ran, else what writes the report
    summary = run_summary(results)
    lines = [
        "# chemtwin benchmark report",
        "",
        f"Date: {soft['date']}. chemtwin {soft['chemtwin']}, commit {soft['commit']}.",
        "",
        *(["## What this run says", "", *summary, ""] if summary else []),
        "## Protocol and results",
        "",
        f"Protocol: {cfg['n_train_pairs']:,} training and {cfg['n_val_pairs']:,} validation twin pairs per scenario, "
        f"models trained for {cfg['time_limit']:g} s each (preset `{cfg['preset']}`, latent dimension "
        f"{cfg['latent_dim']}), ranks with the {cfg['metric'].upper()} distance (the oracle, The Cannon and The Payne "
        "rank whitened abundances). Each model is trained at the SNR it is evaluated at. Rows marked *+ twin metric* "
        "rank the same tags with L2 after whitening them by the scatter between the training set's twins, "
        "supervision the published methods did not use. Rows marked *+ decoded-twin metric* whiten them by the "
        "scatter between twins the model makes itself (its decoder renders a training star at another star's "
        "TEFF/LOGG, noise is added, both are encoded again): no twin is used, so a survey can do the same."
        + (" **Quick run**: small sets and short training, a smoke test of the whole pipeline, "
           "not a measurement of the method." if cfg.get("quick") else ""),
        "",
        _information(cfg),
        "",
        f"Machine: {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, torch {mach.get('torch', '?')}"
        + (f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU")
        + f"; load average at start {', '.join(f'{x:.1f}' for x in mach.get('load_average_at_start', []))}. "
        f"Wall time of this run: {results.get('wall_s_this_run', float('nan')) / 60:.1f} min.",
        "",
        "Rank of a star: the number of other validation stars closer to it than its twin (ties count as closer); "
        "N is the number of validation stars. Published numbers (docs/science.md) come from other data and "
        "other synthesizers; they are beside ours for scale, not as a like-for-like comparison.",
        "",
        *_table(results),
        "",
        *_disentanglement_table(results),
    ]
    emu = results.get("payne_emulator")
    if emu:
        lines += [f"The Payne's emulator: {len(emu['label_names'])} labels -> flux, trained on {emu['n_train']:,} "
                  f"noiseless spectra for {emu['seconds']:.0f} s ({emu['epochs']} epochs); median |emulated - true| "
                  f"on {emu['n_val']:,} held-out spectra {emu['val_median_abs_error']:.4f} of the continuum.", ""]
    mism = [r for r in results["rows"] if r["mismatch"]]
    if mism:
        lines += ["The mismatch scenario: spectra made with perturbed atomic data (log gf jitter 0.1 dex, 10% of "
                  "lines removed), as observed stars differ from any line list. The Payne fits them with an emulator "
                  "of the unperturbed synthesizer (the wrong model); the fader and the data-driven baselines learn "
                  "from the observed-like spectra themselves with only TEFF and LOGG given.", ""]
    captions = {"reconstruction": "Figure 1 of the 2019 paper, ours: a validation star, its reconstruction and the "
                                  "reconstruction from its twin's latent.",
                "rank_cdf": "Cumulative doppelganger-rank distributions.",
                "latent_map": "t-SNE maps of the trained models' latents z, coloured by the true TEFF, LOGG and "
                              "[Fe/H]. A latent free of TEFF/LOGG shows no gradient in those panels; "
                              "compare with the R² table above.",
                "training_curves": "Training curves (history.csv)."}
    for key, p in made.items():
        if p is not None:
            lines += [f"![{key}](figures/{Path(p).name})", "", f"*{captions[key]}*", ""]
    report = folder.report
    with atomic_output(report) as tmp:
        tmp.write_text("\n".join(lines))
    return report

