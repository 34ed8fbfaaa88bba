"""The case list of the fuzz campaign (benchmarks/fuzz_campaign.py).

A case is a JSON-able dict:

* ``id``        stable name ``category/command/variant``; ``--only ID`` reruns it
* ``category``  the issue's categories (structure, bytes, paths, model, options, latents,
                manifests, indexes, nonfinite, fits, disk, races, orphans, dataloss) plus
                ``kill`` and ``determinism`` (trials with their own runner)
* ``command``   the chemtwin command (``cannon test`` for subcommands)
* ``argv``      the command line after ``chemtwin -q``; ``{C}`` is the case folder, ``{name}``
                a seed input (fuzz_seeds), ``{RO}`` a read-only folder
* ``prepare``   steps that make the case's inputs in ``{C}`` before the run (copies of seeds
                and named mutations from fuzz_mutations)
* ``expect``    bad (only a one-line exit 2 is right), valid (exit 0), masked (exit 0; the docs
                say the input is masked or skipped), any (exit 0 or one-line exit 2)
* ``own``       paths the command may replace (its outputs under --overwrite, a model folder
                it resumes); any other file that existed before the run must be unchanged
* ``timeout``   seconds before the run counts as a hang
* ``disk``      full-disk cases: {"kind": "tmpfs"|"fsize", "bytes": N}
* ``kind``      plain (one run), race, signal, kill_resume, determinism

The list is a pure function of the campaign seed: random parts (byte offsets) are drawn in
the case's own generator ``rng`` at preparation time.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

import fuzz_mutations as mut

HUGE = str(mut.HUGE)
FULL = False  # fuzz_campaign --full: every consumer for every mutation
CORE_DATASET_CONSUMERS = ("info", "train", "embed", "evaluate-raw", "augment", "cannon-test", "payne-fit")
# mutations that also go through the slow Cannon row of `evaluate`
SLOW_VALUE_MUTATIONS = ("flux-nan-all", "flux-nan-one-row", "flux-nan-where-ivar0", "ivar-zero-all", "ivar-zero-one-row",
                        "ivar-zero-half-rows", "ivar-nan-one-pixel", "ivar-negative-one-pixel", "labels-nan-all",
                        "wavelength-nan")
BASE_NEEDS = frozenset({"structure", "integrity", "containment", "flux", "ivar", "wavelength", "ivar_all_zero", "rows"})


def _rng_seed(seed: int, case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "little")


def expectation(tags: set, needs: frozenset) -> str:
    for tag in ("valid", "masked", "any"):
        if tag in tags:
            return tag
    return "bad" if tags & needs else "any"


def case(cid, category, command, argv, *, prepare=(), expect="bad", own=(), timeout=60.0, disk=None, kind="plain",
         note="", **extra) -> dict:
    return {"id": cid, "category": category, "command": command, "argv": list(argv), "prepare": [list(s) for s in prepare],
            "expect": expect, "own": list(own), "timeout": timeout, "disk": disk, "kind": kind, "note": note, **extra}


# ------------------------------------------------------------------ consumers of each input kind
# name -> (command, argv with {D} for the input under test, needs, timeout)
DATASET_CONSUMERS = {
    "info": ("info", ["info", "{D}"], BASE_NEEDS - {"rows"}),
    "plot-spectra": ("plot-spectra", ["plot-spectra", "{D}", "--index", "0", "--out", "{C}/out.png"], BASE_NEEDS),
    "plot-gap": ("plot-gap", ["plot-gap", "{D}", "{train}", "--out", "{C}/out.png", "--max-spectra", "20"], BASE_NEEDS),
    "augment": ("augment", ["augment", "{D}", "-o", "{C}/out.h5", "--seed", "1", "--snr", "50", "--rv-max", "5",
                            "--bad-pixel-frac", "0.01"], BASE_NEEDS | {"star_id"}),
    "train": ("train", ["train", "{D}", "--out", "{C}/model", "--epochs", "1", "--threads", "1"],
              BASE_NEEDS | {"labels_tl"}),
    "train-val-data": ("train", ["train", "{train}", "--val-data", "{D}", "--out", "{C}/model", "--epochs", "1",
                                 "--threads", "1"], BASE_NEEDS | {"labels_tl"}),
    "embed": ("embed", ["embed", "{model}", "{D}", "--out", "{C}/z.h5"], BASE_NEEDS | {"labels_tl", "star_id"}),
    "evaluate-model": ("evaluate", ["evaluate", "{model}", "{D}", "--json", "{C}/e.json"],
                       BASE_NEEDS | {"labels_tl", "group"}),
    "evaluate-raw": ("evaluate", ["evaluate", "{D}", "--method", "raw", "--json", "{C}/e.json"], BASE_NEEDS | {"group"}),
    "evaluate-polyres": ("evaluate", ["evaluate", "{D}", "--method", "polyres", "--train", "{train}", "--components", "5",
                                      "--json", "{C}/e.json"], BASE_NEEDS | {"labels_tl", "group"}),
    "evaluate-polyres-train": ("evaluate", ["evaluate", "{data}", "--method", "polyres", "--train", "{D}",
                                            "--components", "5", "--json", "{C}/e.json"], BASE_NEEDS | {"labels_tl"}),
    "evaluate-oracle": ("evaluate", ["evaluate", "{D}", "--method", "oracle", "--json", "{C}/e.json"],
                        BASE_NEEDS | {"labels_tl", "labels_chem", "labels_all", "labels_range", "group", "generator"}),
    "evaluate-payne": ("evaluate", ["evaluate", "{D}", "--method", "payne", "--emulator", "{emulator}", "--train",
                                    "{train}", "--json", "{C}/e.json"], BASE_NEEDS | {"group"}),
    "cannon-train": ("cannon train", ["cannon", "train", "{D}", "--labels", "TEFF,LOGG,FE_H", "--out", "{C}/c.npz",
                                      "--threads", "1"], BASE_NEEDS | {"labels_tl", "labels_chem"}),
    "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{D}", "--out", "{C}/l.h5", "--threads", "1"],
                    BASE_NEEDS | {"star_id"}),
    "payne-train": ("payne train", ["payne", "train", "{D}", "--labels", "TEFF", "LOGG", "FE_H", "--hidden", "8",
                                    "--epochs", "2", "--out", "{C}/e.npz", "--threads", "1"],
                    BASE_NEEDS | {"labels_tl", "labels_chem"}),
    "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{D}", "--out", "{C}/f.h5", "--threads", "1",
                                "--candidates", "64"], BASE_NEEDS | {"star_id"}),
}
# The Cannon row of `evaluate` costs ~10 s a run: only the value corruptions go through it.
SLOW_DATASET_CONSUMERS = {
    "evaluate-cannon": ("evaluate", ["evaluate", "{D}", "--method", "cannon", "--train", "{train_big}", "--train-stars",
                                     "250", "--json", "{C}/e.json"], BASE_NEEDS | {"group"}),
}
LATENT_NEEDS = frozenset({"structure", "values", "rows", "integrity", "containment"})
LATENT_CONSUMERS = {
    "index": ("index", ["index", "{D}", "--out", "{C}/idx"], LATENT_NEEDS),
    "index-hnsw": ("index", ["index", "{D}", "--out", "{C}/idx", "--kind", "hnsw", "--M", "8"], LATENT_NEEDS),
    "whiten": ("whiten", ["whiten", "{D}", "--train", "{train_latents}", "--out", "{C}/w.h5"], LATENT_NEEDS | {"dim"}),
    "whiten-train": ("whiten", ["whiten", "{latents}", "--train", "{D}", "--out", "{C}/w.h5"],
                     LATENT_NEEDS | {"group", "group_in_file", "dim"}),
    "cluster": ("cluster", ["cluster", "{D}", "--out", "{C}/c.h5", "--min-cluster-size", "2"], LATENT_NEEDS),
    "evaluate-latents": ("evaluate", ["evaluate", "--latents", "{D}", "--json", "{C}/e.json"],
                         LATENT_NEEDS | {"group", "group_in_file"}),
    # with the dataset given, the groups come from it (methods/latents.py): the file's own are checked, not needed
    "evaluate-latents-data": ("evaluate", ["evaluate", "--latents", "{D}", "{data}", "--json", "{C}/e.json"],
                              LATENT_NEEDS | {"group"}),
    "search-query": ("search", ["search", "{index}", "--query", "{D}", "-k", "3"], LATENT_NEEDS | {"dim"}),
}
MODEL_NEEDS = frozenset({"structure", "weights"})
MODEL_CONSUMERS = {
    "embed": ("embed", ["embed", "{D}", "{data}", "--out", "{C}/z.h5"], MODEL_NEEDS),
    "evaluate": ("evaluate", ["evaluate", "{D}", "{data}", "--json", "{C}/e.json"], MODEL_NEEDS),
    "embed-fits": ("embed", ["embed", "{D}", "{apstar}", "--catalog", "{catalog}", "--out", "{C}/z.h5"], MODEL_NEEDS),
    "train-resume": ("train", ["train", "{train}", "--out", "{D}", "--resume", "--epochs", "3", "--threads", "1"],
                     MODEL_NEEDS | {"checkpoint"}),
}
SHARD_CONSUMERS = {
    "info": ("info", ["info", "{D}"], BASE_NEEDS),
    "train": ("train", ["train", "{D}", "--out", "{C}/model", "--epochs", "1", "--threads", "1"], BASE_NEEDS),
    "embed": ("embed", ["embed", "{model}", "{D}", "--out", "{C}/z.h5"], BASE_NEEDS),
    "evaluate-model": ("evaluate", ["evaluate", "{model}", "{D}", "--json", "{C}/e.json"], BASE_NEEDS),
    "evaluate-raw": ("evaluate", ["evaluate", "{D}", "--method", "raw", "--json", "{C}/e.json"], BASE_NEEDS),
    "augment": ("augment", ["augment", "{D}", "-o", "{C}/out.h5", "--seed", "1"], BASE_NEEDS),
    "cannon-train": ("cannon train", ["cannon", "train", "{D}", "--labels", "TEFF,LOGG", "--out", "{C}/c.npz"], BASE_NEEDS),
    "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{D}", "--out", "{C}/f.h5", "--threads", "1",
                                "--candidates", "64"], BASE_NEEDS),
    "plot-spectra": ("plot-spectra", ["plot-spectra", "{D}", "--index", "20", "--out", "{C}/p.png"], BASE_NEEDS),
}
LATENT_SHARD_CONSUMERS = {
    "info": ("info", ["info", "{D}"], LATENT_NEEDS),
    "index": ("index", ["index", "{D}", "--out", "{C}/idx"], LATENT_NEEDS),
    "whiten": ("whiten", ["whiten", "{D}", "--train", "{train_latents}", "--out", "{C}/w.h5"], LATENT_NEEDS),
    "cluster": ("cluster", ["cluster", "{D}", "--out", "{C}/c.h5", "--min-cluster-size", "2"], LATENT_NEEDS),
    "evaluate-latents": ("evaluate", ["evaluate", "--latents", "{D}", "--json", "{C}/e.json"], LATENT_NEEDS),
}
INDEX_NEEDS = frozenset({"structure", "star_id"})
INDEX_CONSUMERS = {
    "search-star": ("search", ["search", "{D}", "--star", "0", "-k", "3"], INDEX_NEEDS),
    "search-query": ("search", ["search", "{D}", "--query", "{latents}", "-k", "3"], INDEX_NEEDS),
    "search-json": ("search", ["search", "{D}", "--star", "0", "1", "-k", "3", "--json", "{C}/s.json"], INDEX_NEEDS),
}
FITS_NEEDS = frozenset({"structure", "flux", "labels_tl"})
FITS_CONSUMERS = {
    "ingest": ("ingest", ["ingest", "{D}", "--catalog", "{catalog}", "--out", "{C}/i.h5"], FITS_NEEDS),
    "embed": ("embed", ["embed", "{model}", "{D}", "--catalog", "{catalog}", "--out", "{C}/z.h5"], FITS_NEEDS),
}
CATALOG_CONSUMERS = {
    "ingest": ("ingest", ["ingest", "{apstar}", "{apvisit}", "--catalog", "{D}", "--out", "{C}/i.h5"], FITS_NEEDS),
    "embed": ("embed", ["embed", "{model}", "{apstar}", "--catalog", "{D}", "--out", "{C}/z.h5"], FITS_NEEDS),
}


def _family(cases, category, kind_name, seed_name, dst, registry, consumers, seed, timeouts=None, only=None,
            core=None, sampled=0):
    """One case per (mutation, consumer): copy the seed to ``{C}/in/dst``, apply mutation ``registry[name]``
    (``registry`` names one of fuzz_mutations.REGISTRIES; ``only`` keeps the names it accepts), run.
    With ``core``, each mutation goes through the ``core`` consumers and ``sampled`` others drawn
    for it from the campaign seed (``--full`` in the campaign: every consumer)."""
    for mname, (_, tags) in mut.REGISTRIES[registry].items():
        if only is not None and not only(mname):
            continue
        chosen = consumers
        if core is not None and not FULL:
            others = sorted(set(consumers) - set(core))
            pick = np.random.default_rng(_rng_seed(seed, f"{category}/{mname}")).choice(others, sampled, replace=False)
            chosen = {k: v for k, v in consumers.items() if k in core or k in set(pick)}
        for cname, (command, argv, needs) in chosen.items():
            cid = f"{category}/{kind_name}/{mname}/{cname}"
            path = "{C}/in/" + dst
            own = [path] if cname == "train-resume" else []
            timeout = (timeouts or {}).get(mname, 60.0)
            cases.append(case(cid, category, command, [a.replace("{D}", path) for a in argv],
                              prepare=[["copy", seed_name, "in/" + dst], ["mutate", registry, mname, "in/" + dst]],
                              expect=expectation(tags, needs), own=own, timeout=timeout, rng=_rng_seed(seed, cid)))


# ------------------------------------------------------------------ paths
PATH_COMMANDS = {
    # name: (command, argv with {IN}/{OUT}, seed of IN (None: no input), output kind (None: writes nothing))
    "info": ("info", ["info", "{IN}"], "data", None),
    "plot-spectra": ("plot-spectra", ["plot-spectra", "{IN}", "--index", "0", "--out", "{OUT}"], "data", "out.png"),
    "plot-gap": ("plot-gap", ["plot-gap", "{IN}", "{train}", "--out", "{OUT}", "--max-spectra", "20"], "data", "out.png"),
    "augment": ("augment", ["augment", "{IN}", "-o", "{OUT}", "--seed", "1"], "data", "out.h5"),
    "train": ("train", ["train", "{IN}", "--out", "{OUT}", "--epochs", "1", "--threads", "1"], "data", "model/"),
    "train-val-data": ("train", ["train", "{train}", "--val-data", "{IN}", "--out", "{OUT}", "--epochs", "1",
                                 "--threads", "1"], "data", "model/"),
    "embed": ("embed", ["embed", "{model}", "{IN}", "--out", "{OUT}"], "data", "z.h5"),
    "embed-model": ("embed", ["embed", "{IN}", "{data}", "--out", "{OUT}"], "model", "z.h5"),
    "embed-fits": ("embed", ["embed", "{model}", "{IN}", "--catalog", "{catalog}", "--out", "{OUT}"], "apstar", "z.h5"),
    "embed-catalog": ("embed", ["embed", "{model}", "{apstar}", "--catalog", "{IN}", "--out", "{OUT}"], "catalog", "z.h5"),
    "embed-file-list": ("embed", ["embed", "{model}", "--file-list", "{IN}", "--catalog", "{catalog}", "--out", "{OUT}"],
                        "filelist", "z.h5"),
    "evaluate-model": ("evaluate", ["evaluate", "{model}", "{IN}", "--json", "{OUT}"], "data", "e.json"),
    "evaluate-model-dir": ("evaluate", ["evaluate", "{IN}", "{data}", "--json", "{OUT}"], "model", "e.json"),
    "evaluate-raw": ("evaluate", ["evaluate", "{IN}", "--method", "raw", "--json", "{OUT}"], "data", "e.json"),
    "evaluate-latents": ("evaluate", ["evaluate", "--latents", "{IN}", "--json", "{OUT}"], "latents", "e.json"),
    "evaluate-polyres-train": ("evaluate", ["evaluate", "{data}", "--method", "polyres", "--train", "{IN}",
                                            "--components", "5", "--json", "{OUT}"], "train", "e.json"),
    "evaluate-payne-emulator": ("evaluate", ["evaluate", "{data}", "--method", "payne", "--emulator", "{IN}", "--train",
                                             "{train}", "--json", "{OUT}"], "emulator", "e.json"),
    "evaluate-jacobians": ("evaluate", ["evaluate", "{data}", "--method", "oracle", "--jacobians", "{IN}", "--json",
                                        "{OUT}"], "jacobians", "e.json"),
    "evaluate-plots": ("evaluate", ["evaluate", "{data}", "--method", "raw", "--json", "{C}/e.json", "--plots", "{OUT}"],
                       None, "plots/"),
    "whiten": ("whiten", ["whiten", "{IN}", "--train", "{train_latents}", "--out", "{OUT}"], "latents", "w.h5"),
    "whiten-train": ("whiten", ["whiten", "{latents}", "--train", "{IN}", "--out", "{OUT}"], "train_latents", "w.h5"),
    "ingest": ("ingest", ["ingest", "{IN}", "--catalog", "{catalog}", "--out", "{OUT}"], "apstar", "i.h5"),
    "ingest-catalog": ("ingest", ["ingest", "{apstar}", "--catalog", "{IN}", "--out", "{OUT}"], "catalog", "i.h5"),
    "ingest-file-list": ("ingest", ["ingest", "--file-list", "{IN}", "--catalog", "{catalog}", "--out", "{OUT}"],
                         "filelist", "i.h5"),
    "index": ("index", ["index", "{IN}", "--out", "{OUT}"], "latents", "idx/"),
    "search-star": ("search", ["search", "{IN}", "--star", "0", "-k", "3", "--json", "{OUT}"], "index", "s.json"),
    "search-query": ("search", ["search", "{index}", "--query", "{IN}", "-k", "3"], "latents", None),
    "cluster": ("cluster", ["cluster", "{IN}", "--out", "{OUT}", "--min-cluster-size", "2"], "train_latents", "c.h5"),
    "cluster-plot": ("cluster", ["cluster", "{train_latents}", "--out", "{C}/c.h5", "--min-cluster-size", "2", "--plot",
                                 "{OUT}"], None, "c.png"),
    "payne-train": ("payne train", ["payne", "train", "{IN}", "--labels", "TEFF", "LOGG", "--hidden", "8", "--epochs", "1",
                                    "--out", "{OUT}", "--threads", "1"], "train", "e.npz"),
    "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{IN}", "--out", "{OUT}", "--threads", "1", "--candidates",
                                "64"], "data", "f.h5"),
    "payne-fit-emulator": ("payne fit", ["payne", "fit", "{IN}", "{data}", "--out", "{OUT}", "--threads", "1",
                                         "--candidates", "64"], "emulator", "f.h5"),
    "cannon-train": ("cannon train", ["cannon", "train", "{IN}", "--labels", "TEFF,LOGG", "--out", "{OUT}"], "train", "c.npz"),
    "cannon-train-mask": ("cannon train", ["cannon", "train", "{train}", "--labels", "TEFF,LOGG", "--pixel-mask", "{IN}",
                                           "--out", "{OUT}"], "mask", "c.npz"),
    "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{IN}", "--out", "{OUT}"], "data", "l.h5"),
    "cannon-test-model": ("cannon test", ["cannon", "test", "{IN}", "{data}", "--out", "{OUT}"], "cannon", "l.h5"),
    "generate": ("generate", ["generate", "-o", "{OUT}", "--n-groups", "2", "--threads", "1"], None, "g.h5"),
    "generate-emulator": ("generate", ["generate", "-o", "{OUT}", "--emulator", "{IN}", "--n-groups", "2"], "emulator", "g.h5"),
    "bench": ("bench", ["bench", "-o", "{OUT}", "--n-train-pairs", "20", "--n-val-pairs", "10", "--methods", "raw", "--snr",
                        "100", "--protocol", "paper", "--mismatch-snr", "none", "--time-limit", "1"], None, "bench/"),
}
IS_DIR_SEED = {"model", "index", "shards", "latent_shards"}

# name: (steps making {C}/x, path given, expect)
INPUT_VARIANTS = {
    "missing": ([], "{C}/missing-file", "bad"),
    "empty-dir": ([["mkdir", "adir"]], "{C}/adir", "bad"),
    "char-device-null": ([["mknod", "devnull", 1, 3]], "{C}/devnull", "bad"),
    "char-device-zero": ([["mknod", "devzero", 1, 5]], "{C}/devzero", "bad"),
    "fifo": ([["mkfifo", "fifo"]], "{C}/fifo", "bad"),
    "proc-file": ([], "/proc/self/status", "bad"),
    "dangling-symlink": ([["symlink", "{C}/nowhere", "dangling"]], "{C}/dangling", "bad"),
    "symlink-loop": ([["symlink", "{C}/loop", "loop"]], "{C}/loop", "bad"),
    "name-too-long": ([], "{C}/" + "x" * 300, "bad"),
    "path-too-long": ([], "{C}/" + "/".join(["d" * 200] * 25), "bad"),
    "nul-free-binary": ([["write_bytes", "binary", "random"]], "{C}/binary", "bad"),
    "newline-in-name": ([["copy", "{seed}", "we ird\nname{ext}"]], "{C}/we ird\nname{ext}", "valid"),
    "unicode-name": ([["copy", "{seed}", "données-✓{ext}"]], "{C}/données-✓{ext}", "valid"),
    "symlink-to-seed": ([["symlink", "{{seed}}", "link{ext}"]], "{C}/link{ext}", "valid"),
    "dotdot-path": ([["mkdir", "sub"], ["copy", "{seed}", "in{ext}"]], "{C}/sub/../in{ext}", "valid"),
}
# name: (steps, OUT path (with {name} = the command's output name), extra argv, expect)
OUTPUT_VARIANTS = {
    "parent-missing": ([], "{C}/no/such/folder/{name}", [], "bad"),
    "parent-is-file": ([["write", "afile", "x"]], "{C}/afile/{name}", [], "bad"),
    "out-is-dir": ([["mkdir", "{stem}"]], "{C}/{stem}", [], "bad"),
    "out-is-dir-overwrite": ([["mkdir", "{stem}"], ["write", "{stem}/keep.txt", "user data"]], "{C}/{stem}", ["--overwrite"], "bad"),
    "read-only-folder": ([], "{RO}/{name}", [], "bad"),
    "sysfs": ([], "/sys/kernel/{name}", [], "bad"),
    "procfs": ([], "/proc/self/{name}", [], "bad"),
    "char-device-overwrite": ([["mknod", "{stem}", 1, 3]], "{C}/{stem}", ["--overwrite"], "bad"),
    "fifo-overwrite": ([["mkfifo", "{stem}"]], "{C}/{stem}", ["--overwrite"], "bad"),
    "exists-no-overwrite": ([["write", "{stem}", "user data"]], "{C}/{stem}", [], "bad"),
    "name-too-long": ([], "{C}/" + "y" * 300 + "{ext}", [], "bad"),
    "trailing-slash": ([], "{C}/{stem}/", [], "any"),
    "symlink-to-foreign-overwrite": ([["write", "foreign.dat", "user data"], ["symlink", "{C}/foreign.dat", "{stem}"]],
                                     "{C}/{stem}", ["--overwrite"], "any"),
    "dangling-symlink": ([["symlink", "{C}/elsewhere/target", "{stem}"]], "{C}/{stem}", ["own"], "any"),
    "unicode-name": ([], "{C}/sortie-✓{ext}", [], "valid"),
}


def _path_cases(cases, seed):
    for cname, (command, argv, seed_name, out_kind) in PATH_COMMANDS.items():
        default_out = "{C}/" + out_kind.rstrip("/") if out_kind else None
        base = [a.replace("{OUT}", default_out) if default_out else a for a in argv]
        if seed_name is not None:
            ext = "" if seed_name in IS_DIR_SEED else Path(_SEED_FILES.get(seed_name, "x.h5")).suffix
            for vname, (steps, given, expect) in INPUT_VARIANTS.items():
                if seed_name in IS_DIR_SEED and vname in ("nul-free-binary",):
                    continue
                given_p = given.replace("{ext}", ext)
                steps = [[str(x).replace("{seed}", seed_name).replace("{ext}", ext) if isinstance(x, str) else x for x in s]
                         for s in steps]
                cid = f"paths/{cname}/in-{vname}"
                cases.append(case(cid, "paths", command, [a.replace("{IN}", given_p) for a in base], prepare=steps,
                                  expect=expect, rng=_rng_seed(seed, cid), timeout=45.0))
        if out_kind is None:
            continue
        name = out_kind.rstrip("/")
        stem, ext = name, Path(name).suffix
        for vname, (steps, given, extra, expect) in OUTPUT_VARIANTS.items():
            out = given.replace("{name}", name).replace("{stem}", stem).replace("{ext}", ext)
            steps = [[x.replace("{stem}", stem) if isinstance(x, str) else x for x in s] for s in steps]
            cid = f"paths/{cname}/out-{vname}"
            in_path = "{" + seed_name + "}" if seed_name else ""
            own = [out] if "--overwrite" in extra or "own" in extra else []
            extra = [x for x in extra if x != "own"]
            full = [a.replace("{IN}", in_path).replace("{OUT}", out) for a in argv] + extra
            cases.append(case(cid, "paths", command, full, prepare=steps, expect=expect, own=own,
                              rng=_rng_seed(seed, cid), timeout=45.0))


_SEED_FILES = {"data": "data.h5", "train": "train.h5", "latents": "latents.h5", "train_latents": "train_latents.h5",
               "apstar": "a.fits", "catalog": "c.fits", "filelist": "f.txt", "emulator": "e.npz", "jacobians": "j.h5",
               "mask": "m.npy", "cannon": "c.npz"}


# ------------------------------------------------------------------ options
def _opts() -> list[tuple]:
    """(command id, command, base argv, [(extra argv, expect), ...])."""
    gen = ["generate", "-o", "{C}/out.h5", "--n-groups", "2", "--threads", "1"]
    train = ["train", "{train}", "--out", "{C}/m", "--epochs", "1", "--threads", "1"]
    embed = ["embed", "{model}", "{data}", "--out", "{C}/z.h5"]
    embed_fits = ["embed", "{model}", "{apstar}", "--catalog", "{catalog}", "--out", "{C}/z.h5"]
    ev = ["evaluate", "{model}", "{data}", "--json", "{C}/e.json"]
    raw = ["evaluate", "{data}", "--method", "raw", "--json", "{C}/e.json"]
    poly = ["evaluate", "{data}", "--method", "polyres", "--train", "{train}", "--components", "5", "--json", "{C}/e.json"]
    payne_ev = ["evaluate", "{data}", "--method", "payne", "--emulator", "{emulator}", "--train", "{train}", "--json",
                "{C}/e.json"]
    whiten = ["whiten", "{latents}", "--train", "{train_latents}", "--out", "{C}/w.h5"]
    index = ["index", "{train_latents}", "--out", "{C}/idx"]
    search = ["search", "{index}", "--star", "0", "-k", "3"]
    cluster = ["cluster", "{train_latents}", "--out", "{C}/c.h5", "--min-cluster-size", "2"]
    augment = ["augment", "{data}", "-o", "{C}/a.h5", "--seed", "1"]
    plot = ["plot-spectra", "{data}", "--index", "0", "--out", "{C}/p.png"]
    gap = ["plot-gap", "{data}", "{train}", "--out", "{C}/g.png", "--max-spectra", "20"]
    ptrain = ["payne", "train", "{train}", "--labels", "TEFF", "LOGG", "--hidden", "8", "--epochs", "1", "--out",
              "{C}/e.npz", "--threads", "1"]
    pfit = ["payne", "fit", "{emulator}", "{data}", "--out", "{C}/f.h5", "--threads", "1", "--candidates", "64"]
    ctrain = ["cannon", "train", "{train}", "--labels", "TEFF,LOGG", "--out", "{C}/c.npz"]
    ctest = ["cannon", "test", "{cannon}", "{data}", "--out", "{C}/l.h5"]
    ingest = ["ingest", "{apstar}", "--catalog", "{catalog}", "--out", "{C}/i.h5"]
    bench = ["bench", "-o", "{C}/b", "--n-train-pairs", "20", "--n-val-pairs", "10", "--methods", "raw", "--snr", "100",
             "--protocol", "paper", "--mismatch-snr", "none", "--time-limit", "1"]
    B, A = "bad", "any"

    def o(flag, *values_expect):
        return [([flag, *str(v).split(" ")] if isinstance(v, str) and " " in str(v) and not str(v).startswith("'")
                 else [flag, str(v)], e) for v, e in values_expect]

    return [
        ("generate", "generate", gen,
         o("--n-groups", ("0", B), ("-1", B), (HUGE, B), (str(10**9), B), (str(2**63), B))
         + o("--group-size", ("0", B), ("-3", B), (HUGE, B), (str(10**7), B))
         + o("--snr", ("0", B), ("-5", B), ("nan", B), ("-inf", B), ("1e-300", A), ("1e308", A))
         + o("--teff", ("6000 4000", B), ("100 200", B), ("nan nan", B), ("inf inf", B), ("4000 4000", A))
         + o("--logg", ("5 9", B), ("-1 2", B), ("nan 1", B))
         + o("--seed", ("-1", A), (HUGE, B), (str(2**64), B), (str(2**63), A), (str(2**32), A))
         + o("--threads", ("0", B), ("-1", B), (str(10**6), B))
         + o("--grid", ("bogus", B))
         + [(["--mismatch-seed", "5"], B), (["--mismatch", "--mismatch-seed", "-1"], A),
            (["--mismatch", "--mismatch-seed", HUGE], B), (["--mismatch", "--emulator", "{emulator}"], B)]
         + [(["--workers", "0"], B), (["--workers", "-1"], B), (["--workers", "1", "--shard-size", "0"], B),
            (["--workers", "1", "--shard-size", "-4"], B), (["--scheduler", "tcp://127.0.0.1:1"], B),
            (["--scheduler", "bogus"], B), (["--scheduler", "tcp://256.1.1.1:8786", "--connect-timeout", "1"], B),
            (["--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", "0"], B),
            (["--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", "nan"], B),
            (["--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", "-1"], B)]
         + [(["--emulator", "{emulator}", "--label-range", "TEFF", "5000", "4000"], B),
            (["--emulator", "{emulator}", "--label-range", "FOO", "0", "1"], B),
            (["--emulator", "{emulator}", "--label-range", "TEFF", "nan", "nan"], B),
            (["--emulator", "{emulator}", "--label-range", "TEFF", "-inf", "inf"], B),
            (["--emulator", "{emulator}", "--chemical-labels", "FOO"], B),
            (["--emulator", "{emulator}", "--label-names", "A"], B),
            (["--emulator", "{emulator}", "--n-groups", HUGE], B),
            (["--emulator", "{emulator}", "--teff", "4000", "5000"], B)]),
        ("train", "train", train,
         o("--batch-size", ("0", B), ("1", A), (HUGE, A), ("2", A))
         + o("--epochs", ("0", A))
         + [(["--epochs", HUGE, "--time-limit", "3"], A), (["--epochs", "3", "--time-limit", "1e-9"], A),
            (["--time-limit", "inf"], A)]
         + o("--lr", ("1e10", B), ("inf", B), ("0", A), ("nan", B), ("1e-300", A))
         + o("--latent-dim", ("0", B), (HUGE, B), (str(10**7), B), ("1", A))
         + o("--lambda", ("1e10", A), ("inf", B), ("nan", B))
         + o("--lambda-warmup", ("5", A), ("inf", A))
         + o("--n-cat", ("0", B), ("1", A), (HUGE, B), (str(10**6), B))
         + o("--time-limit", ("0", B))
         + o("--val-fraction", ("1", B), ("0.999", A), ("5", B), ("inf", B), ("0", A))
         + o("--max-memory-gb", ("0", A), ("1e-9", A), ("inf", A))
         + o("--seed", ("-1", A), (HUGE, B), (str(2**64), B), (str(2**63), A))
         + o("--threads", ("0", A), (str(10**6), B))
         + o("--condition", ("", B), ("FOO", B), ("TEFF,TEFF", B), ("TEFF", A), ("TEFF,LOGG,FE_H", A), (",,,", B))
         + [(["--model", "cae", "--lambda", "1"], A), (["--device", "cuda"], B), (["--resume"], B),
            (["--val-data", "{C}/missing.h5"], B), (["--preset", "paper"], A)]),
        ("embed", "embed", embed,
         o("--batch-size", ("0", B), ("-1", B), (HUGE, A), ("1", A))
         + [(["--device", "cuda"], B), (["--workers", "0"], B), (["--workers", "-1"], B),
            (["--workers", "1", "--shard-size", "0"], B), (["--workers", "1", "--batch-size", "0"], B)]),
        ("embed-fits", "embed", embed_fits,
         o("--min-good", ("-1", B), ("2", B), ("nan", B), ("1", A))
         + o("--degree", ("-1", B), ("100", B), (HUGE, B))
         + o("--row", ("x", B), ("99", B), ("-99", B), ("visit99", B), ("", B), ("global", A))
         + o("--grid", ("apstar", B))
         + o("--batch-size", ("0", B))),
        ("evaluate", "evaluate", ev,
         o("--max-queries", ("0", B), ("-1", B), (HUGE, A), ("1", A))
         + o("--batch-size", ("0", B), (HUGE, A), ("1", A))
         + o("--metric", ("bogus", B), ("cosine", A), ("l2", A))
         + o("--seed", ("-1", A), (HUGE, B))
         + o("--method", ("bogus", B))
         + [(["--device", "cuda"], B), (["--plots", "{model}/config.json"], B), (["--twin-metric"], B),
            (["--twin-metric", "--train", "{train}"], A)]),
        ("evaluate-raw", "evaluate", raw,
         o("--max-queries", ("1", A), (HUGE, A))
         + o("--metric", ("cosine", A))),
        ("evaluate-polyres", "evaluate", poly,
         o("--degree", ("-1", B), ("50", A), (HUGE, B))
         + o("--components", ("0", B), (HUGE, A), ("1", A))
         + o("--condition", ("", B), ("FOO", B), ("TEFF,TEFF", B), (",", B))),
        ("evaluate-payne", "evaluate", payne_ev,
         o("--time-limit", ("0", B), ("nan", B), ("-1", B))
         + o("--train-stars", ("0", B), ("1", B), (HUGE, A))),
        ("evaluate-oracle", "evaluate", ["evaluate", "{data}", "--method", "oracle", "--json", "{C}/e.json"],
         [(["--jacobians", "{C}"], B), (["--max-queries", "0"], B), (["--metric", "l1"], A)]),
        ("whiten", "whiten", whiten, o("--chunk-rows", ("0", B), ("-1", B), (HUGE, A), ("1", A))),
        ("index", "index", index,
         [(["--kind", "ivf", "--nlist", HUGE], B), (["--kind", "ivf", "--nlist", "1000"], B),
          (["--kind", "ivf", "--nlist", "1"], A), (["--kind", "ivf", "--nprobe", HUGE], A),
          (["--kind", "hnsw", "--M", HUGE], B), (["--kind", "hnsw", "--M", str(10**6)], B),
          (["--kind", "hnsw", "--ef-construction", HUGE], B), (["--kind", "hnsw", "--ef-search", HUGE], A),
          (["--chunk-rows", HUGE], A), (["--threads", HUGE], B), (["--threads", str(10**6)], B),
          (["--seed", "-1"], A), (["--seed", HUGE], B), (["--M", "0"], B), (["--kind", "flat", "--nlist", "4"], A)]),
        ("search", "search", search,
         o("-k", ("0", B), (HUGE, A), ("41", A), ("60", A))
         + o("--show", ("-5", A), ("0", A), (HUGE, A))
         + o("--star", ("nonexistent", B), ("", B), ("-1", B), (HUGE, B), ("40", B))
         + o("--nprobe", ("4", B)) + o("--ef-search", ("4", B)) + o("--threads", (HUGE, B), (str(10**6), B))),
        ("search-ivf", "search", ["search", "{index_ivf}", "--star", "0", "-k", "3"],
         o("--nprobe", (HUGE, A), ("1", A)) + o("-k", (HUGE, A))),
        ("search-hnsw", "search", ["search", "{index_hnsw}", "--star", "0", "-k", "3"],
         o("--ef-search", (HUGE, B), ("1", A)) + o("-k", (HUGE, A))),
        ("cluster", "cluster", cluster,
         o("--min-cluster-size", ("0", B), ("1", B), (HUGE, B), ("-1", B), ("1000", A))
         + o("--min-samples", ("0", B), ("-1", B), (HUGE, B))
         + [(["--method", "dbscan", "--eps", v], e) for v, e in
            (("0", B), ("-1", B), ("nan", B), ("inf", A), ("auto", A), ("abc", B), ("1e300", A))]
         + o("--n-jobs", ("0", B), ("-2", A), (HUGE, B), (str(10**6), B))
         + [(["--scale", "standard"], A), (["--eps", "1"], B)]),
        ("augment", "augment", augment,
         o("--snr", ("0", B), ("-1", B), ("nan", B), ("10:1", B), ("1:inf", B), ("0:10", B), ("abc", B), ("1e400", B),
           ("1e-300", A), ("inf", A))
         + o("--rv-max", ("-1", B), ("nan", B), ("1e9", B), ("inf", B))
         + o("--vsini-max", ("-1", B), ("1e9", B), ("nan", B))
         + o("--limb-darkening", ("2", B), ("-1", B), ("nan", B))
         + o("--vmacro-max", ("-1", B), ("1e9", B), ("nan", B))
         + o("--bad-pixel-frac", ("1", A), ("2", B), ("-1", B), ("nan", B))
         + o("--persistence", ("-1", B), ("1e9", A), ("nan", B))
         + [(["--telluric", "--telluric-rv-max", v], e) for v, e in (("-1", B), ("nan", B), ("1e9", B))]
         + o("--batch-size", ("0", B), (HUGE, A), ("1", A))
         + o("--seed", ("-1", A), (HUGE, B))),
        ("plot-spectra", "plot-spectra", plot,
         o("--index", ("-1", A), (HUGE, B), ("40", B))
         + o("--range", ("15950 15700", B), ("nan nan", B), ("0 1", B), ("inf -inf", B), ("-inf inf", A))),
        ("plot-gap", "plot-gap", gap,
         o("--max-spectra", ("0", B), ("1", B), (HUGE, A), ("-5", B))
         + o("--perplexity", ("0", B), ("nan", B), (HUGE, A), ("-1", B), ("inf", B))
         + o("--seed", (HUGE, B), ("-1", A)) + o("--out", ("{C}/g.txt", B))),
        ("payne-train", "payne train", ptrain,
         o("--hidden", (HUGE, B), (str(10**7), B))
         + [(["--epochs", HUGE, "--time-limit", "2"], A)]
         + o("--lr", ("1e10", B))
         + o("--batch-size", ("1", A), (HUGE, A))
         + o("--val-fraction", ("0", A), ("0.99", A))
         + o("--max-stars", ("1", B), ("2", A))
         + o("--seed", (HUGE, B), ("-1", A))
         + [(["--labels", "FOO"], B), (["--labels", "TEFF", "TEFF"], B), (["--device", "cuda"], B),
            (["--loss", "mse"], A), (["--threads", str(10**6)], B), (["--time-limit", "1e-9"], A)]),
        ("payne-fit", "payne fit", pfit,
         o("--starts", (HUGE, B), ("1000", A))
         + o("--retries", ("-1", B), (HUGE, B))
         + o("--candidates", (HUGE, B), (str(10**9), B))
         + o("--max-iter", (HUGE, B))
         + o("--rv-max", ("1e9", B))
         + [(["--rv", "--rv-max", "1e-30"], A), (["--rv", "--rv-max", "1e9"], B)]
         + o("--batch-size", (HUGE, A), ("1", A))
         + o("--threads", (HUGE, B), (str(10**6), B))
         + o("--seed", (HUGE, B), ("-1", A))
         + [(["--label-names", "FOO", "BAR", "BAZ"], B), (["--label-names", "A"], B)]),
        ("cannon-train", "cannon train", ctrain,
         o("--order", (HUGE, B), ("10", B), ("3", A))
         + o("--rows", ("5:2", B), ("a:b", B), ("0:0", B), ("-5:", B), ("0:" + HUGE, B), (":", A))
         + o("--threads", (HUGE, B), (str(10**6), B))
         + [(["--labels", "FOO"], B), (["--labels", "TEFF,TEFF"], B), (["--pixel-mask", "{data}"], B),
            (["--pixel-mask", "{catalog}"], B)]),
        ("cannon-test", "cannon test", ctest,
         o("--rows", ("0:" + HUGE, B), ("10:5", B), ("39:40", A))
         + o("--batch-size", (HUGE, A), ("1", A))
         + o("--threads", (HUGE, B))
         + [(["--labels", "FOO"], B)]),
        ("ingest", "ingest", ingest,
         o("--degree", ("11", B), ("-1", B), (HUGE, B))
         + o("--min-good", ("2", B), ("nan", B), ("-0.5", B))
         + o("--row", ("visit99", B), ("99", B), ("-99", B), ("", B), (HUGE, B))
         + o("--labels", ("FOO", B), ("", B), ("TEFF,TEFF", B))
         + [(["--grid", "apstar"], A), (["--workers", "0"], B), (["--workers", "-1"], B),
            (["--workers", "1", "--shard-size", "0"], B)]),
        ("bench", "bench", bench,
         o("--n-train-pairs", ("0", B), ("-1", B), (HUGE, B))
         + o("--n-val-pairs", ("0", B), (HUGE, B))
         + o("--snr", ("abc", B), ("0", B), ("-1", B), ("", B), ("nan", B))
         + o("--mismatch-snr", ("abc", B), ("0", B))
         + o("--protocol", ("bogus", B), ("survey", B))
         + o("--teff-error", ("-1", B), ("nan", B))
         + o("--methods", ("bogus", B), ("", B))
         + o("--time-limit", ("0", B), ("nan", B), ("-1", B))
         + o("--latent-dim", ("0", B), (HUGE, B))
         + o("--metric", ("bogus", B))
         + o("--seed", (HUGE, B))
         + o("--threads", (HUGE, B))),
    ]


def _option_cases(cases, seed):
    for cname, command, base, variants in _opts():
        for extra, expect in variants:
            label = "=".join(x if len(x) < 24 else x[:8] + "..." for x in extra).replace("{", "").replace("}", "")
            cid = f"options/{cname}/{label or 'empty'}"
            n = sum(1 for c in cases if c["id"].startswith(cid))
            cid = cid if n == 0 else f"{cid}#{n}"
            cases.append(case(cid, "options", command, base + extra, expect=expect, rng=_rng_seed(seed, cid), timeout=40.0))


# ------------------------------------------------------------------ full disk
DISK_COMMANDS = {
    # name: (command, argv writing into {OUT}/...)
    "generate": ("generate", ["generate", "-o", "{OUT}/g.h5", "--n-groups", "20", "--threads", "1"]),
    "generate-sharded": ("generate", ["generate", "-o", "{OUT}/g", "--n-groups", "20", "--workers", "1", "--shard-size", "8"]),
    "augment": ("augment", ["augment", "{data}", "-o", "{OUT}/a.h5", "--seed", "1"]),
    "train": ("train", ["train", "{train}", "--out", "{OUT}/m", "--epochs", "1", "--threads", "1"]),
    "embed": ("embed", ["embed", "{model}", "{data}", "--out", "{OUT}/z.h5"]),
    "embed-fits": ("embed", ["embed", "{model}", "{apstar}", "--catalog", "{catalog}", "--out", "{OUT}/z.h5"]),
    "evaluate": ("evaluate", ["evaluate", "{data}", "--method", "raw", "--json", "{OUT}/e.json", "--plots", "{OUT}/p"]),
    "evaluate-jacobians": ("evaluate", ["evaluate", "{data}", "--method", "oracle", "--jacobians", "{OUT}/j.h5", "--json",
                                        "{OUT}/e.json"]),
    "whiten": ("whiten", ["whiten", "{latents}", "--train", "{train_latents}", "--out", "{OUT}/w.h5"]),
    "ingest": ("ingest", ["ingest", "{apstar}", "{apvisit}", "--catalog", "{catalog}", "--out", "{OUT}/i.h5"]),
    "index": ("index", ["index", "{train_latents}", "--out", "{OUT}/idx"]),
    "search": ("search", ["search", "{index}", "--star", "0", "-k", "3", "--json", "{OUT}/s.json"]),
    "cluster": ("cluster", ["cluster", "{train_latents}", "--out", "{OUT}/c.h5", "--min-cluster-size", "2", "--plot",
                            "{OUT}/c.png", "--json", "{OUT}/c.json"]),
    "plot-spectra": ("plot-spectra", ["plot-spectra", "{data}", "--index", "0", "--out", "{OUT}/p.png"]),
    "plot-gap": ("plot-gap", ["plot-gap", "{data}", "{train}", "--out", "{OUT}/g.png", "--max-spectra", "20"]),
    "payne-train": ("payne train", ["payne", "train", "{train}", "--labels", "TEFF", "LOGG", "--hidden", "8", "--epochs",
                                    "1", "--out", "{OUT}/e.npz", "--json", "{OUT}/e.json"]),
    "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{data}", "--out", "{OUT}/f.h5", "--threads", "1",
                                "--candidates", "64"]),
    "cannon-train": ("cannon train", ["cannon", "train", "{train}", "--labels", "TEFF,LOGG", "--out", "{OUT}/c.npz"]),
    "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{data}", "--out", "{OUT}/l.h5"]),
    "bench": ("bench", ["bench", "-o", "{OUT}/b", "--n-train-pairs", "20", "--n-val-pairs", "10", "--methods", "raw", "--snr",
                        "100", "--mismatch-snr", "none", "--time-limit", "1"]),
}
# Free bytes left: 0 (nothing fits: must refuse), 4 KiB and 64 KiB (small outputs fit: either is right,
# but a failure must be one line with nothing left behind); RLIMIT_FSIZE of 64 KiB (EFBIG).
DISK_SIZES = {"tmpfs": (0, 4 * 1024, 64 * 1024), "fsize": (64 * 1024,)}


def _disk_cases(cases, seed):
    for cname, (command, argv) in DISK_COMMANDS.items():
        for kind, sizes in DISK_SIZES.items():
            for size in sizes:
                cid = f"disk/{cname}/{kind}-{'free-' if kind == 'tmpfs' else ''}{size // 1024}k"
                out = "{C}/disk" if kind == "tmpfs" else "{C}/out"
                cases.append(case(cid, "disk", command, [a.replace("{OUT}", out) for a in argv],
                                  prepare=[] if kind == "tmpfs" else [["mkdir", "out"]],
                                  expect="bad" if size == 0 else "any",
                                  disk={"kind": kind, "bytes": size}, rng=_rng_seed(seed, cid), timeout=90.0,
                                  note="a full disk: one line, exit 2, no temporary file left"))


# ------------------------------------------------------------------ data loss: files that are not the command's own
def _dataloss_cases(cases, seed):
    def add(name, command, argv, prepare, expect, own=(), note=""):
        cid = f"dataloss/{name}"
        cases.append(case(cid, "dataloss", command, argv, prepare=prepare, expect=expect, own=list(own),
                          rng=_rng_seed(seed, cid), timeout=90.0, note=note))

    jac = ["evaluate", "{data}", "--method", "oracle", "--json", "{C}/e.json", "--jacobians"]
    add("jacobians-foreign-h5", "evaluate", jac + ["{C}/foreign.h5"], [["copy", "train", "foreign.h5"]], "bad",
        note="--jacobians names an unrelated HDF5 file: refuse, do not overwrite it")
    add("jacobians-foreign-npz", "evaluate", jac + ["{C}/foreign.npz"], [["copy", "cannon", "foreign.npz"]], "bad")
    add("jacobians-foreign-text", "evaluate", jac + ["{C}/notes.txt"], [["write", "notes.txt", "my notes\n"]], "bad")
    add("jacobians-is-the-dataset", "evaluate", ["evaluate", "{C}/d.h5", "--method", "oracle", "--json", "{C}/e.json",
                                                 "--jacobians", "{C}/d.h5"], [["copy", "data", "d.h5"]], "bad")
    add("jacobians-latent-file", "evaluate", jac + ["{C}/z.h5"], [["copy", "latents", "z.h5"]], "bad")
    add("jacobians-stale-own-cache", "evaluate", ["evaluate", "{C}/d.h5", "--method", "oracle", "--json", "{C}/e.json",
                                                  "--jacobians", "{C}/j.h5"],
        [["copy", "noiseless", "d.h5"], ["copy", "jacobians", "j.h5"]], "valid", own=["{C}/j.h5"],
        note="a stale cache of its own kind may be rewritten")
    add("train-out-foreign-folder", "train", ["train", "{train}", "--out", "{C}/mine", "--epochs", "1", "--threads", "1"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "bad")
    add("train-out-foreign-folder-overwrite", "train", ["train", "{train}", "--out", "{C}/mine", "--epochs", "1",
                                                        "--threads", "1", "--overwrite"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "any",
        own=["{C}/mine/config.json", "{C}/mine/model.safetensors", "{C}/mine/checkpoint.safetensors", "{C}/mine/history.csv"])
    add("index-out-foreign-folder-overwrite", "index", ["index", "{latents}", "--out", "{C}/mine", "--overwrite"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "any",
        own=["{C}/mine/index.faiss", "{C}/mine/meta.json", "{C}/mine/ids.npz"])
    add("index-out-foreign-folder", "index", ["index", "{latents}", "--out", "{C}/mine"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "bad")
    add("bench-out-foreign-folder", "bench", ["bench", "-o", "{C}/mine", "--n-train-pairs", "20", "--n-val-pairs", "10",
                                              "--methods", "raw", "--snr", "100", "--mismatch-snr", "none", "--time-limit",
                                              "1"], [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "any",
        note="bench into a folder holding unrelated files: it may add its own, never touch thesis.tex")
    add("bench-out-foreign-folder-overwrite", "bench", ["bench", "-o", "{C}/mine", "--n-train-pairs", "20", "--n-val-pairs", "10",
                                                        "--methods", "raw", "--snr", "100", "--mismatch-snr", "none",
                                                        "--time-limit", "1", "--overwrite"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"], ["mkdir", "mine/data"],
         ["write", "mine/data/mine.h5", "mine"]], "any")
    add("generate-sharded-foreign-folder-overwrite", "generate", ["generate", "-o", "{C}/mine", "--n-groups", "4", "--workers",
                                                                  "1", "--shard-size", "4", "--overwrite"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"], ["write", "mine/shard-00000.h5", "mine"]], "any",
        own=["{C}/mine/shard-00000.h5"])
    add("embed-sharded-foreign-folder-overwrite", "embed", ["embed", "{model}", "{data}", "--out", "{C}/mine", "--workers",
                                                            "1", "--overwrite"],
        [["mkdir", "mine"], ["write", "mine/thesis.tex", "years of work"]], "any")
    add("evaluate-plots-foreign-png", "evaluate", ["evaluate", "{data}", "--method", "raw", "--json", "{C}/e.json",
                                                   "--plots", "{C}/figs"],
        [["mkdir", "figs"], ["write", "figs/rank_cdf.png", "my own figure"]], "bad",
        note="--plots DIR with a rank_cdf.png the command did not write, and no --overwrite")
    add("cluster-plot-foreign", "cluster", ["cluster", "{train_latents}", "--out", "{C}/c.h5", "--min-cluster-size", "2",
                                            "--plot", "{C}/mine.png"], [["write", "mine.png", "my figure"]], "bad")
    add("cluster-json-foreign", "cluster", ["cluster", "{train_latents}", "--out", "{C}/c.h5", "--min-cluster-size", "2",
                                            "--json", "{C}/mine.json"], [["write", "mine.json", "{}"]], "bad")
    add("payne-train-json-foreign", "payne train", ["payne", "train", "{train}", "--labels", "TEFF", "LOGG", "--hidden",
                                                    "8", "--epochs", "1", "--out", "{C}/e.npz", "--json", "{C}/mine.json"],
        [["write", "mine.json", "{}"]], "bad")
    add("search-json-foreign", "search", ["search", "{index}", "--star", "0", "--json", "{C}/mine.json"],
        [["write", "mine.json", "{}"]], "bad")
    add("train-resume-other-data", "train", ["train", "{data}", "--out", "{C}/m", "--resume", "--epochs", "3",
                                             "--threads", "1"], [["copy", "model", "m"]], "bad", own=["{C}/m"],
        note="--resume with another dataset than the checkpoint's")
    for cname, (command, argv) in {
        "augment": ("augment", ["augment", "{C}/d.h5", "-o", "{C}/d.h5", "--seed", "1", "--overwrite"]),
        "whiten": ("whiten", ["whiten", "{C}/d.h5", "--train", "{train_latents}", "--out", "{C}/d.h5", "--overwrite"]),
        "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{C}/d.h5", "--out", "{C}/d.h5", "--overwrite"]),
        "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{C}/d.h5", "--out", "{C}/d.h5", "--overwrite",
                                    "--threads", "1", "--candidates", "64"]),
        "embed": ("embed", ["embed", "{model}", "{C}/d.h5", "--out", "{C}/d.h5", "--overwrite"]),
        "cluster": ("cluster", ["cluster", "{C}/d.h5", "--out", "{C}/d.h5", "--overwrite", "--min-cluster-size", "2"]),
        "index-over-model": ("index", ["index", "{latents}", "--out", "{C}/d.h5", "--overwrite"]),
        "cannon-train-over-input": ("cannon train", ["cannon", "train", "{C}/d.h5", "--labels", "TEFF,LOGG", "--out",
                                                     "{C}/d.h5", "--overwrite"]),
    }.items():
        src = "latents" if cname in ("whiten", "cluster") else "data"
        add(f"out-is-input-{cname}", command, argv, [["copy", src, "d.h5"]], "bad",
            note="the output named as the input with --overwrite: the input is destroyed or read while replaced")


# ------------------------------------------------------------------ races, orphans, kill -9, determinism
def _special_cases(cases, seed):
    def add(cid, category, command, argv, kind, expect="bad", **kw):
        cases.append(case(cid, category, command, argv, kind=kind, expect=expect, rng=_rng_seed(seed, cid),
                          mode="subprocess", **kw))

    races = {
        "generate": ("generate", ["generate", "-o", "{C}/g.h5", "--n-groups", "60", "--threads", "1"]),
        "augment": ("augment", ["augment", "{train}", "-o", "{C}/a.h5", "--seed", "1", "--snr", "50"]),
        "embed": ("embed", ["embed", "{model}", "{train}", "--out", "{C}/z.h5"]),
        "train": ("train", ["train", "{train}", "--out", "{C}/m", "--epochs", "2", "--threads", "1"]),
        "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{train}", "--out", "{C}/l.h5"]),
        "whiten": ("whiten", ["whiten", "{train_latents}", "--train", "{train_latents}", "--out", "{C}/w.h5"]),
    }
    for name, (command, argv) in races.items():
        for k in range(3):
            add(f"races/{name}/two-writers-{k}", "races", command, argv, "race", timeout=120.0,
                note="two runs to one output without --overwrite: at most one may exit 0")
    signal_runs = {
        "generate": ("generate", ["generate", "-o", "{C}/g.h5", "--n-groups", "400", "--threads", "1"], ".g.h5.tmp-"),
        "augment": ("augment", ["augment", "{train_big}", "-o", "{C}/a.h5", "--seed", "1", "--snr", "50", "--batch-size", "16"],
                    ".a.h5.tmp-"),
        "train": ("train", ["train", "{train}", "--out", "{C}/m", "--epochs", "30", "--threads", "1"], "."),
        "embed": ("embed", ["embed", "{model}", "{train_big}", "--out", "{C}/z.h5", "--batch-size", "8"], ".z.h5.tmp-"),
        "embed-fits": ("embed", ["embed", "{model}", "{fits}/*.fits", "--catalog", "{catalog}", "--out", "{C}/z.h5"],
                       ".z.h5."),
        "ingest": ("ingest", ["ingest", "{fits}/*.fits", "--catalog", "{catalog}", "--out", "{C}/i.h5"], ".i.h5.tmp-"),
        "payne-fit": ("payne fit", ["payne", "fit", "{emulator}", "{train_big}", "--out", "{C}/f.h5", "--threads", "1",
                                    "--candidates", "64", "--batch-size", "16"], "."),
        "payne-train": ("payne train", ["payne", "train", "{train_big}", "--labels", "TEFF", "LOGG", "--hidden", "64",
                                        "--epochs", "40", "--out", "{C}/e.npz", "--threads", "1"], "."),
        "cannon-test": ("cannon test", ["cannon", "test", "{cannon}", "{train_big}", "--out", "{C}/l.h5", "--batch-size",
                                        "8"], "."),
        "evaluate-jacobians": ("evaluate", ["evaluate", "{train}", "--method", "oracle", "--jacobians", "{C}/j.h5",
                                            "--json", "{C}/e.json"], "."),
        "generate-sharded": ("generate", ["generate", "-o", "{C}/g", "--n-groups", "200", "--workers", "1", "--shard-size",
                                          "50"], "g/."),
    }
    for name, (command, argv, watch) in signal_runs.items():
        for sig in ("KILL", "TERM", "INT"):
            add(f"orphans/{name}/sig{sig}-at-write", "orphans", command, argv, "signal", signal=sig, watch=watch,
                timeout=120.0, note="signal when the first temporary file appears, then rerun the same command: "
                                    "no temporary file may remain")
    for k in range(12):
        add(f"kill/train/trial-{k:02d}", "kill", "train", [], "kill_resume", expect="valid", timeout=300.0,
            trial=k, at="checkpoint" if k % 2 == 0 else "random")
    for name in ("generate-same-seed", "train-same-seed", "train-threads-1-vs-2", "embed-same-model"):
        add(f"determinism/{name}", "determinism", name.split("-")[0], [], "determinism", expect="valid", timeout=300.0)


# ------------------------------------------------------------------ the whole list
def make_cases(seed: int = 0) -> list[dict]:
    cases: list[dict] = []
    _family(cases, "structure", "dataset", "data", "data.h5", "dataset_structure", DATASET_CONSUMERS, seed,
            timeouts={"rows-huge": 30.0, "pixels-huge": 30.0}, core=CORE_DATASET_CONSUMERS, sampled=3)
    _family(cases, "nonfinite", "dataset", "data", "data.h5", "dataset_values", DATASET_CONSUMERS, seed)
    _family(cases, "nonfinite", "dataset", "data", "data.h5", "dataset_values", SLOW_DATASET_CONSUMERS, seed,
            only=lambda n: FULL or n in SLOW_VALUE_MUTATIONS)
    _family(cases, "bytes", "dataset", "data", "data.h5", "dataset_bytes", DATASET_CONSUMERS, seed,
            core=CORE_DATASET_CONSUMERS, sampled=3)
    _family(cases, "latents", "latents", "latents", "latents.h5", "latents", LATENT_CONSUMERS, seed,
            timeouts={"z-rows-huge": 30.0})
    _family(cases, "model", "model", "model", "model", "model", MODEL_CONSUMERS, seed)
    _family(cases, "manifests", "shards", "shards", "shards", "dataset_manifest", SHARD_CONSUMERS, seed)
    _family(cases, "manifests", "latent-shards", "latent_shards", "latent_shards", "latent_manifest",
            LATENT_SHARD_CONSUMERS, seed)
    for seed_name in ("index", "index_hnsw", "index_ivf"):
        only = None if seed_name == "index" else (lambda n: n.startswith(("faiss", "meta-kind", "control")))
        _family(cases, "indexes", seed_name.replace("_", "-"), seed_name, "index", "index", INDEX_CONSUMERS, seed,
                only=only)
    _family(cases, "fits", "apstar", "apstar", "apStar-dr17-2M19485057+5005279.fits", "fits", FITS_CONSUMERS, seed)
    _family(cases, "fits", "apvisit", "apvisit", "apVisit-r13-5095-55844-128.fits", "fits", FITS_CONSUMERS, seed)
    _family(cases, "fits", "catalog", "catalog", "catalog.fits", "catalog", CATALOG_CONSUMERS, seed)
    _path_cases(cases, seed)
    _option_cases(cases, seed)
    _disk_cases(cases, seed)
    _dataloss_cases(cases, seed)
    _special_cases(cases, seed)
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    return cases


# ------------------------------------------------------------------ preparing a case's inputs
def fill(text: str, seeds: dict, case_dir: Path, ro_dir: str | None) -> str:
    if not isinstance(text, str) or "{" not in text:
        return text
    out = text.replace("{C}", str(case_dir)).replace("{RO}", ro_dir or str(case_dir / "no-read-only-folder"))
    for name, path in seeds.items():
        out = out.replace("{" + name + "}", path)
    return out


def prepare(c: dict, seeds: dict, case_dir: Path, ro_dir: str | None) -> None:
    import os

    ctx = mut.Ctx(seeds=seeds, case_dir=case_dir, rng=np.random.default_rng(c.get("rng", 0)))
    for step in c["prepare"]:
        op, args = step[0], [fill(a, seeds, case_dir, ro_dir) for a in step[1:]]
        if op == "copy":
            src, dst = Path(seeds.get(args[0], args[0])), case_dir / args[1]
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
        elif op == "mutate":
            registry, name, target = mut.REGISTRIES[args[0]], args[1], case_dir / args[2]
            registry[name][0](target, ctx)
        elif op == "mkdir":
            (case_dir / args[0]).mkdir(parents=True, exist_ok=True)
        elif op == "write":
            (case_dir / args[0]).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / args[0]).write_text(args[1])
        elif op == "write_bytes":
            (case_dir / args[0]).write_bytes(ctx.rng.integers(1, 256, 4096, dtype=np.uint8).tobytes())
        elif op == "mknod":
            import stat

            os.mknod(case_dir / args[0], 0o666 | stat.S_IFCHR, os.makedev(int(args[1]), int(args[2])))
        elif op == "mkfifo":
            os.mkfifo(case_dir / args[0])
        elif op == "symlink":
            (case_dir / args[1]).symlink_to(args[0])
        else:
            raise ValueError(f"unknown preparation step {op!r}")
