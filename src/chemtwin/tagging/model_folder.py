"""The model folder (``chemtwin train --out MODEL_DIR``): its files, read and written here only.

Layout (``FORMAT`` "chemtwin-fader", ``FORMAT_VERSION`` 1; docs/model.md):

* ``config.json``             ``format``, ``format_version``, ``chemtwin_version``, ``config`` (the
                              flat ``FaderConfig.to_dict()``), ``n_pixels``, ``status`` (``Status``),
                              ``data`` (what it was trained on) and, once finished, ``final``
                              (the last validation metrics, epoch, step, time_s) and ``reference``
                              (the out-of-depth reference of ``tagging/depth.py``: training label
                              range, latent mean/covariance and distance threshold, model error
                              variance and chi^2 threshold; absent in folders trained before it,
                              and while training: ``read_reference`` then gives None)
* ``model.safetensors``       weights and preprocessing buffers (+ ``data.wavelength``)
* ``checkpoint.safetensors``  weights, optimizer state, RNG state and the ``TrainState`` counters
                              (JSON metadata in the safetensors header); written atomically at
                              every epoch end, at the time limit and on Ctrl-C
* ``history.csv``             one row per epoch (``HISTORY_COLUMNS``)

Nothing is unpickled: safetensors and JSON only.  A folder that is not a model gives an
InputError naming what is wrong; a StarNet model folder (``OTHER_FORMATS``: the same file
names, its own content, owned by ``tagging/starnet_training.py``) is refused by name.  The
checkpoint, history, lock and clean-up functions here serve both kinds.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chemtwin.core.files import atomic_output, describe_error, write_json
from chemtwin.errors import InputError
from chemtwin.tagging.fader import FaderNet
from chemtwin.tagging.fader_config import FaderConfig

log = logging.getLogger(__name__)

FORMAT = "chemtwin-fader"
FORMAT_VERSION = 1
# Model folders of other kinds that share this layout's files (their owners read them).
OTHER_FORMATS = {"chemtwin-starnet": "a StarNet model folder (chemtwin starnet predict reads it)"}
MODEL_FILES = ("config.json", "model.safetensors", "checkpoint.safetensors", "history.csv")
HISTORY_COLUMNS = ("epoch", "step", "time_s", "lr", "lambda", "train_loss", "train_recon", "train_adv_ce",
                   "train_adv_acc", "val_recon", "val_swap", "val_adv_acc", "adv_chance", "val_rank0", "val_median_rank")


class Status(str, Enum):
    """``config.json``'s ``status``: where training stands."""

    TRAINING = "training"
    FINISHED = "finished"                     # every epoch asked for
    TIME_LIMIT = "stopped at the time limit"

    @property
    def done(self) -> bool:
        return self is not Status.TRAINING


def model_status(model_dir) -> Status | None:
    """The training status of a model folder; None when it holds no readable config.json."""
    path = Path(model_dir) / "config.json"
    try:
        return Status(json.loads(path.read_text()).get("status"))
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def write_config(out_dir, meta: dict) -> None:
    write_json(Path(out_dir) / "config.json", meta)


def save(out_dir, model: FaderNet, meta: dict, wavelength=None, history=()) -> Path:
    """A whole model folder (``ChemTwin.save``): weights, config.json (``meta`` with the format
    fields first) and, when there is one, the training history."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, wavelength)
    write_config(out, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    if history:
        with atomic_output(out / "history.csv") as tmp:
            write_history(tmp, [{k: r.get(k, "") for k in HISTORY_COLUMNS} for r in history])
    return out


@contextmanager
def exclusive(out_dir) -> Iterator[None]:
    """Hold the model folder for one training run (an advisory lock on the folder itself, so no
    lock file is left behind); InputError when another run holds it."""
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_dir}: another training run is writing this model folder") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def clear(out_dir) -> None:
    """Remove a model's files (and nothing else) from ``out_dir``."""
    for name in MODEL_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)


# safetensors' save_file writes through a sibling named by Rust's tempfile crate (".tmp" and six
# characters) and renames it: a run killed inside save_file leaves that file behind.
_SAVE_FILE_TEMPORARY = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def remove_stale_temporaries(out_dir) -> None:
    """Delete what a killed ``save_file`` left in a model folder: ``.tmpXXXXXX`` files that are empty
    or begin as a safetensors file does (a little-endian header length, then ``{``).  A training
    run owns its model folder, so no other writer's file can match (a user's file cannot be
    empty and named so by accident, or it is no loss)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if not (_SAVE_FILE_TEMPORARY.match(path.name) and path.is_file()):
            continue
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9 or (head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000):
            path.unlink(missing_ok=True)
            log.info("%s: removed a temporary file left by a killed run", path)


def save_model(out_dir: Path, model: FaderNet, wavelength=None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_finite(tensors, f"{out_dir}: refusing to save a model")
    if wavelength is not None:
        tensors["data.wavelength"] = torch.as_tensor(np.asarray(wavelength, dtype=np.float64))
    # The condition order is recorded with the weights too: config.json alone could be edited to
    # feed TEFF as LOGG, and nothing in the weights would tell.
    with atomic_output(Path(out_dir) / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"condition": json.dumps(list(model.condition))})


def read_model_dir(model_dir) -> dict:
    """config.json of a model directory; InputError when the directory is not a model."""
    d = Path(model_dir)
    path = d / "config.json"
    if not d.is_dir():
        raise InputError(f"{d}: no such model directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise InputError(f"{d}: not a chemtwin model (no readable config.json)") from None
    if isinstance(meta, dict) and meta.get("format") in OTHER_FORMATS:
        raise InputError(f"{d}: {OTHER_FORMATS[meta['format']]}, not a fader model folder")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{d}: not a chemtwin model (config.json has no format {FORMAT!r})")
    check_config(d, meta, FaderConfig)
    return meta


def check_config(d: Path, meta: dict, config_class) -> None:
    """The ``config`` of a model folder's config.json builds a ``config_class`` and ``n_pixels`` is
    positive; InputError (one line, naming the folder) otherwise."""
    try:
        config_class.from_dict(meta["config"])
        if int(meta["n_pixels"]) < 1:
            raise ValueError("n_pixels < 1")
    except InputError as exc:
        raise InputError(f"{d}: config.json is invalid ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise InputError(f"{d}: config.json is invalid ({exc.__class__.__name__}: {exc})") from None


REFERENCE_KEYS = ("label_min", "label_max", "latent_mean", "latent_cov", "latent_distance_threshold",
                  "model_variance", "recon_chi2_threshold")


def read_reference(meta: dict, model_dir="model") -> dict | None:
    """config.json's out-of-depth ``reference`` (``tagging/depth.py``), checked against the model's
    condition labels and latent dimension; None when the folder has none (trained before it, or
    not finished); InputError when it is damaged."""
    ref = meta.get("reference")
    if ref is None:
        return None
    cfg = FaderConfig.from_dict(meta["config"])
    k, d = len(cfg.net.condition), cfg.net.latent_dim
    try:
        shapes = {"label_min": (k,), "label_max": (k,), "latent_mean": (d,), "latent_cov": (d, d)}
        for key in REFERENCE_KEYS:
            value = np.asarray(ref[key], dtype=float)
            if value.shape != shapes.get(key, ()) or not np.isfinite(value).all():
                raise ValueError(f"{key} has shape {value.shape}, expected {shapes.get(key, ())}, or is not finite")
        np.linalg.cholesky(np.asarray(ref["latent_cov"], float))
    except (KeyError, TypeError, ValueError, np.linalg.LinAlgError) as exc:
        raise InputError(f"{model_dir}: config.json's out-of-depth reference is invalid ({describe_error(exc)})") from None
    return ref


def read_weights(model_dir, record_key: str, missing: str) -> tuple[dict, str | None, torch.Tensor | None]:
    """(tensors, the metadata entry ``record_key`` the weights were saved with or None, the wavelength
    grid or None) of ``model_dir/model.safetensors``, for every kind of model folder; InputError naming
    the folder when the file is absent (``missing`` says what that means), unreadable or not finite."""
    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise InputError(f"{model_dir}: {missing}")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            recorded = (f.metadata() or {}).get(record_key)
    except Exception as exc:  # safetensors raises its own error type for truncated/garbled files
        raise InputError(f"{model_dir}: model.safetensors is unreadable ({describe_error(exc)})") from None
    wavelength = tensors.pop("data.wavelength", None)
    _check_finite(tensors, f"{model_dir}: model.safetensors is unusable")
    if wavelength is not None and not bool(torch.isfinite(wavelength).all()):
        raise InputError(f"{model_dir}: model.safetensors is unusable (data.wavelength is not finite)")
    return tensors, recorded, wavelength


def load_model(model_dir, device="cpu") -> tuple[FaderNet, dict, np.ndarray | None]:
    """(model, config.json contents, wavelength or None) of a trained model directory."""
    meta = read_model_dir(model_dir)
    cfg = FaderConfig.from_dict(meta["config"])
    tensors, recorded, wavelength = read_weights(
        model_dir, "condition", "not a chemtwin model (no model.safetensors; training never reached a checkpoint)")
    if recorded is not None and recorded != json.dumps(list(cfg.net.condition)):
        raise InputError(f"{model_dir}: config.json conditions on {', '.join(cfg.net.condition)}, the weights were "
                         f"trained on {recorded}")
    # The network config.json describes, built without memory first: a damaged config.json can
    # ask for any size, and only the weights on disk say what is real.
    with torch.device("meta"):
        expected = dict(FaderNet(cfg.net, int(meta["n_pixels"])).state_dict())
    for key, want in expected.items():
        got = tensors.get(key)
        if got is not None and (got.shape != want.shape or got.dtype != want.dtype):
            raise InputError(f"{model_dir}: model.safetensors does not match config.json ({key} is {got.dtype} "
                             f"{tuple(got.shape)}, config.json asks for {want.dtype} {tuple(want.shape)})")
    model = FaderNet(cfg.net, int(meta["n_pixels"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"{model_dir}: model.safetensors does not match config.json ({describe_error(exc)})") from None
    return model.to(device).eval(), meta, None if wavelength is None else wavelength.numpy()


def save_checkpoint(path: Path, model, opts: dict, shuffle_state, state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"state": state, "optim": {}}
    for name, opt in opts.items():
        sd = opt.state_dict()
        scalars = {}
        for idx, st in sd["state"].items():
            for key, val in st.items():
                if torch.is_tensor(val):
                    tensors[f"{name}.{idx}.{key}"] = val.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = val
        meta["optim"][name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = shuffle_state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"chemtwin": json.dumps(meta)})


def load_checkpoint(path: Path, model, opts: dict, device) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["chemtwin"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated or garbled file, or no chemtwin metadata
        raise InputError(f"{path}: unreadable checkpoint ({describe_error(exc)})") from None
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:  # e.g. resumed on data with another number of pixels
        raise InputError(f"{path}: the checkpoint does not fit this data and model ({describe_error(exc)})") from None
    for name, opt in opts.items():
        m = meta["optim"][name]
        state: dict = {}
        for key, val in tensors.items():
            if key.startswith(name + "."):
                idx, sub = key[len(name) + 1 :].split(".", 1)
                state.setdefault(int(idx), {})[sub] = val.to(device) if sub != "step" else val
        for key, val in m["scalars"].items():
            idx, sub = key.split(".", 1)
            state.setdefault(int(idx), {})[sub] = val
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return tensors["rng.shuffle"], meta["state"]


def append_history(path: Path, row: dict, columns=HISTORY_COLUMNS) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        fh.flush()
        os.fsync(fh.fileno())


def read_history(model_dir) -> list[dict]:
    """The training log; a damaged one is only a lost log (a warning), never a broken model."""
    path = Path(model_dir) / "history.csv"
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(fh)]
    except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("%s: unreadable training log, ignored (%s)", path, exc.__class__.__name__)
        return []


def _check_finite(tensors: dict, context: str) -> None:
    """A NaN or inf weight (a diverged run) makes every latent garbage: refuse it, naming the tensor."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise InputError(f"{context}: non-finite weights in {bad[0]}"
                         + (f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else "") + " (a diverged run?)")


def truncate_history(path: Path, step: int, columns=HISTORY_COLUMNS) -> None:
    """Drop rows written after the checkpoint (the process died between the two)."""
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= step]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        log.warning("%s: unreadable training log, started again (%s)", path, exc.__class__.__name__)
        rows = []
    with atomic_output(path) as tmp:
        write_history(tmp, rows, columns)


def write_history(path, rows, columns=HISTORY_COLUMNS) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
