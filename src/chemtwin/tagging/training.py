"""The training loop of the fader model: alternating updates, checkpoints, resume.

``train(source, out_dir, cfg)`` is all of it: the data are prepared (``training_data.prepare``:
validated, baseline statistics, batches), the model folder is (re)created
(``model_folder``), and a ``Trainer`` runs the steps.  Each step updates the adversary on the
current latents, then the autoencoder against the updated adversary (``fader.py``).  At every
epoch end (and at the time limit, and on Ctrl-C) the validation metrics go to history.csv and
the weights, optimizer and RNG states with the ``TrainState`` counters to the checkpoint, so
``resume=True`` continues exactly where it stopped, including after SIGKILL.  Under torchrun
the same loop runs on every rank (``distributed.py``); rank 0 writes the folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chemtwin import __version__
from chemtwin.core.files import check_free_space
from chemtwin.core.ranks import doppelganger_ranks
from chemtwin.data.dataset import label_columns
from chemtwin.errors import InputError
from chemtwin.tagging import model_folder
from chemtwin.tagging.depth import reference_statistics
from chemtwin.tagging.distributed import Ranks
from chemtwin.tagging.fader import FaderNet, adversary_loss, recon_loss
from chemtwin.tagging.fader_config import FaderConfig
from chemtwin.tagging.model_folder import FORMAT, FORMAT_VERSION, Status
from chemtwin.tagging.training_data import EvalSet, Loader, TrainingData, prepare

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda: this machine has no CUDA GPU", "device")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _nearest_twin_ranks(z: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each star's doppelganger rank against its closest group-mate (empty without twins)."""
    if not np.isfinite(z).all():
        return np.zeros(0, np.int64)
    try:
        return doppelganger_ranks(z, group, progress=False).nearest()[1]
    except InputError:  # no group with two members
        return np.zeros(0, np.int64)


@torch.no_grad()
def validation_metrics(model: FaderNet, ev: EvalSet, device, batch: int = 1024) -> dict:
    """Reconstruction and swapped-latent MSE, adversary accuracy and twin ranks on ``ev``."""
    model.eval()
    z, rec, swap, acc = [], 0.0, 0.0, 0.0
    n, n_swap = len(ev), int(ev.has_twin.sum())
    for a in range(0, n, batch):
        x, w, u = (t[a : a + batch].to(device) for t in (ev.flux, ev.w, ev.u))
        zb = model.encode(x, w, u)
        rec += recon_loss(model.decode(zb, u), x, w).item() * len(x)
        acc += adversary_loss(model.adversary, zb, model.u_bins(u))[1].item() * len(x)
        z.append(zb)
    z = torch.cat(z)
    for a in range(0, n, batch):
        i = torch.arange(a, min(a + batch, n))[ev.has_twin[a : a + batch]]
        if len(i):
            j = ev.partner[i]
            x_j, w_j, u_j = ev.flux[j].to(device), ev.w[j].to(device), ev.u[j].to(device)
            swap += recon_loss(model.decode(z[i.to(device)], u_j), x_j, w_j).item() * len(i)
    ranks = _nearest_twin_ranks(z.cpu().numpy(), ev.group)
    model.train()
    return {
        "val_recon": rec / max(n, 1), "val_swap": swap / max(n_swap, 1) if n_swap else float("nan"),
        "val_adv_acc": acc / max(n, 1),
        "val_rank0": float((ranks == 0).mean()) if ranks.size else float("nan"),
        "val_median_rank": float(np.median(ranks)) if ranks.size else float("nan"),
    }


def _residual_sample(loader: Loader, model: FaderNet, seed: int, n: int = 4096) -> torch.Tensor:
    """Encoder inputs of about ``n`` random training rows (own RNG: the run's is untouched)."""
    parts, got = [], 0
    for x, w, u in loader.epoch(torch.Generator().manual_seed(seed + 2), 1024):
        parts.append(model.residual(x, w, u))
        got += len(x)
        if got >= n:
            break
    return torch.cat(parts)


@dataclass
class Sums:
    """Running sums of the epoch's training losses (this rank's share of each global batch)."""

    loss: float = 0.0
    recon: float = 0.0
    adv_ce: float = 0.0
    adv_acc: float = 0.0
    n: int = 0

    def values(self) -> list[float]:
        return [self.loss, self.recon, self.adv_ce, self.adv_acc]


@dataclass
class TrainState:
    """The counters a checkpoint restores (its JSON layout: ``sums`` as [loss, recon, adv_ce, adv_acc, n])."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0          # seconds of training in all runs so far
    sums: Sums = field(default_factory=Sums)

    def to_dict(self) -> dict:
        return {**asdict(self), "sums": [*self.sums.values(), self.sums.n]}

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        *values, n = d["sums"]
        return cls(d["epoch"], d["step"], d["batch_in_epoch"], d["elapsed"], Sums(*values, n))


def check_out_dir(out: Path, resume: bool, overwrite: bool, read=model_folder.read_model_dir) -> bool:
    """Whether the run resumes; InputError when ``out`` may not be written (``read``: the reader
    of the model folder's config.json, which refuses a folder of another kind)."""
    check_free_space(out / "checkpoint.safetensors", what="a model folder")
    if resume:
        if out.is_dir() and not any(not p.name.startswith(".") for p in out.iterdir()):
            log.warning("%s: empty (stopped before config.json was written); training starts again", out)
            return False
        read(out)
        if not (out / "checkpoint.safetensors").is_file():
            # killed before its first checkpoint: nothing learnt is lost by starting again
            log.warning("%s: no checkpoint.safetensors yet (stopped before the first one); training starts again", out)
            return False
        return True
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} is not empty; pass overwrite=True to replace it or resume=True to continue",
                             "overwrite", "resume")
        if not (out / "config.json").exists():
            raise InputError(f"{out} is not empty and holds no chemtwin model; refusing to overwrite it")
    if not out.parent.is_dir():
        raise InputError(f"output folder {out.parent} does not exist")
    return False


class Trainer:
    """The model, its optimisers and the state of one training run into ``out``."""

    def __init__(self, cfg: FaderConfig, data: TrainingData, out: Path, ranks: Ranks, device, resume: bool, t0: float):
        self.cfg, self.data, self.out, self.ranks, self.device, self.t0 = cfg, data, out, ranks, device, t0
        self.ckpt_path, self.hist_path = out / "checkpoint.safetensors", out / "history.csv"
        net, opt = cfg.net, cfg.optim
        torch.manual_seed(cfg.run.seed)
        model = self.model = FaderNet(net, data.source.n_pixels)
        model.set_statistics(*data.u_range, data.scan.coef, data.scan.resid_std, net.standardize, net.normalize_loss)
        if opt.pca_init and not resume:
            model.init_from_pca(_residual_sample(data.loader, model, cfg.run.seed))
        model.to(device).train()
        opt_cls = torch.optim.AdamW if opt.optimizer == "adamw" else torch.optim.Adam
        ae_params = [p for name, p in model.named_parameters() if not name.startswith("adversary.")]
        self.opts = {
            "opt_ae": opt_cls(ae_params, lr=opt.lr, weight_decay=opt.weight_decay),
            "opt_adv": opt_cls(model.adversary.parameters(), lr=opt.lr * opt.adversary_lr_factor,
                               weight_decay=opt.weight_decay),
        }
        bins = model.u_bins(torch.from_numpy(data.u_train).to(device))
        self.adv_chance = float(torch.bincount(bins).max()) / len(bins)
        self.gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.state = TrainState()
        if resume:
            _check_same_data(out, data.summary())
            shuffle_state, saved = model_folder.load_checkpoint(self.ckpt_path, model, self.opts, device)
            self.state = TrainState.from_dict(saved)
            self.gen.set_state(shuffle_state)
            if ranks.main:
                model_folder.truncate_history(self.hist_path, self.state.step)
            log.info("resuming at epoch %d, step %d", self.state.epoch, self.state.step)
        self.ae, self.adversary = ranks.wrap(model)  # DDP modules under torchrun, the model's own otherwise
        ranks.reseed(cfg.run.seed, self.state.step)
        self.meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "chemtwin_version": __version__,
            "config": cfg.to_dict(), "n_pixels": data.source.n_pixels, "status": Status.TRAINING.value,
            "data": {**data.summary(), "adv_chance": self.adv_chance, "processes": ranks.world},
        }
        if ranks.main:
            model_folder.write_config(out, self.meta)
        self.steps_per_epoch = data.loader.steps(opt.batch_size)
        self.elapsed0, self.last_eval_cost = self.state.elapsed, 0.0
        self.lr, self.lam = opt.lr, 0.0

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.t0

    def progress_now(self) -> float:
        """Fraction of the run done: of its steps, or of its time limit when that is further on."""
        p = self.state.step / (self.cfg.run.epochs * self.steps_per_epoch)
        limit = self.cfg.run.time_limit
        return min(1.0, max(p, self.elapsed() / limit) if limit else p)

    def over_time(self) -> bool:
        limit = self.cfg.run.time_limit
        return bool(limit) and self.elapsed() + 1.5 * self.last_eval_cost >= limit

    def step(self, x, w, u, p: float) -> None:
        """One alternating update on a global batch at run progress ``p``."""
        opt, st, model, ranks, device = self.cfg.optim, self.state, self.model, self.ranks, self.device
        self.lr, self.lam = opt.lr * opt.lr_factor(p), opt.lambda_at(p, st.step)
        for name, optimizer in self.opts.items():
            base = opt.lr if name == "opt_ae" else opt.lr * opt.adversary_lr_factor
            for group in optimizer.param_groups:
                group["lr"] = base * opt.lr_factor(p)
        n_global = len(x)
        x, w, u = ranks.shard(x, w, u)  # this rank's rows of the global batch
        share = ranks.loss_weight(len(x), n_global)  # 1 in one process
        x, u = x.to(device, non_blocking=True), u.to(device)
        w = None if w is None else w.to(device)
        u_bin = model.u_bins(u)
        z, x_hat = self.ae(x, w, u)
        # 1) adversary step on the current latents
        ce_a, acc = adversary_loss(self.adversary, z.detach(), u_bin)
        self.opts["opt_adv"].zero_grad(set_to_none=True)
        (ce_a * share).backward()
        self.opts["opt_adv"].step()
        # 2) autoencoder step against the updated adversary (its own module: no gradient sync)
        rec = recon_loss(x_hat, x, w)
        loss = model.loss_scale * rec
        if self.lam > 0:
            loss = loss - self.lam * adversary_loss(model.adversary, z, u_bin)[0]
        self.opts["opt_ae"].zero_grad(set_to_none=True)
        (loss * share).backward()
        self.opts["opt_ae"].step()
        st.step += 1
        st.batch_in_epoch += 1
        s = st.sums  # averaged over ranks at the epoch's end: the global batch's mean
        s.loss += loss.item() * share
        s.recon += rec.item() * share
        s.adv_ce += ce_a.item() * share
        s.adv_acc += acc.item() * share
        s.n += 1

    def finish_epoch(self, complete: bool, epoch_start_state, interrupted: bool = False) -> dict:
        """The history row of the epoch so far (validation metrics included), then the checkpoint."""
        st, t = self.state, time.monotonic()
        n = max(st.sums.n, 1)
        sums = st.sums.values() if interrupted else self.ranks.mean(st.sums.values())  # no collective after Ctrl-C
        row = {"epoch": st.epoch + st.batch_in_epoch / self.steps_per_epoch, "step": st.step, "lr": self.lr,
               "lambda": self.lam, "train_loss": sums[0] / n, "train_recon": sums[1] / n,
               "train_adv_ce": sums[2] / n, "train_adv_acc": sums[3] / n, "adv_chance": self.adv_chance}
        if self.data.eval_set is not None:
            row.update(validation_metrics(self.model, self.data.eval_set, self.device))
        if complete:
            st.epoch, st.batch_in_epoch, st.sums = st.epoch + 1, 0, Sums()
            row["epoch"] = st.epoch
        row["time_s"] = st.elapsed = self.elapsed()
        if self.ranks.main:
            model_folder.append_history(self.hist_path, row)
            model_folder.save_checkpoint(self.ckpt_path, self.model, self.opts,
                                         self.gen.get_state() if complete else epoch_start_state, st.to_dict())
            model_folder.save_model(self.out, self.model, self.data.source.wavelength)
        self.last_eval_cost = time.monotonic() - t
        return row

    def run(self, progress: bool) -> dict:
        """Train to the last epoch or the time limit; returns the final metrics (also in config.json)."""
        cfg, st, ranks = self.cfg, self.state, self.ranks
        # The bar counts percent of the run (steps or time limit, whichever is further on), so that a
        # time-boxed run shows a true ETA instead of the steps of epochs it will never reach.
        bar = tqdm(total=100, disable=not progress, desc=cfg.model, unit="%", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}<{remaining}{postfix}]")

        def show_progress():
            bar.update(round(100 * self.progress_now(), 1) - bar.n)

        row, stopped = {}, False
        try:
            while st.epoch < cfg.run.epochs and not stopped:
                epoch_start_state = self.gen.get_state()
                for x, w, u in self.data.loader.epoch(self.gen, cfg.optim.batch_size, skip=st.batch_in_epoch):
                    over = self.over_time()
                    p, over = ranks.agree(self.progress_now(), over)  # rank 0's clock decides for every rank
                    if over:
                        stopped = True
                        break
                    if len(x) < ranks.world:  # a last batch too short to give every rank a row
                        continue
                    self.step(x, w, u, p)
                    if st.step % 10 == 0:
                        s = st.sums
                        show_progress()
                        bar.set_postfix(step=st.step, rec=f"{s.recon / s.n:.3g}", adv_ce=f"{s.adv_ce / s.n:.3g}",
                                        adv_acc=f"{s.adv_acc / s.n:.2f}", lam=f"{self.lam:.2g}", refresh=False)
                else:
                    row = self.finish_epoch(True, epoch_start_state)
                    show_progress()
                    bar.set_postfix(rec=f"{row['train_recon']:.3g}",
                                    val_rank0=f"{row.get('val_rank0', float('nan')):.3f}",
                                    adv_acc=f"{row['train_adv_acc']:.2f}", lam=f"{self.lam:.2g}")
                    continue
                if st.batch_in_epoch:  # stopped inside an epoch: checkpoint where we are
                    row = self.finish_epoch(False, epoch_start_state)
        except KeyboardInterrupt:
            if st.sums.n:
                self.finish_epoch(False, epoch_start_state, interrupted=True)
            raise
        finally:
            bar.close()
        status = Status.FINISHED if st.epoch >= cfg.run.epochs else Status.TIME_LIMIT
        self.meta["status"] = status.value
        self.meta["final"] = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.meta["final"].update(epoch=st.epoch, step=st.step, time_s=self.elapsed())
        if ranks.main:
            # what `chemtwin embed` compares new stars with (tagging/depth.py, docs/model.md "Out of depth")
            data = self.data
            self.meta["reference"] = reference_statistics(
                self.model, data.source, data.train_rows, label_columns(data.source, cfg.net.condition),
                data.u_train, seed=cfg.run.seed)
            model_folder.write_config(self.out, self.meta)
        ranks.barrier()  # MODEL_DIR is complete when train() returns, on every rank
        return self.meta["final"]


def _check_same_data(out: Path, now: dict) -> None:
    """InputError when a resumed run is given other data than the checkpoint was trained on: the
    split, the batches and the baseline statistics would silently change mid-run.  Counts are
    compared, not paths (a dataset may have been moved)."""
    before = model_folder.read_model_dir(out).get("data") or {}
    keys = ("n_train", "n_val", "skipped_rows")
    if any(k in before and before[k] != now[k] for k in keys):
        raise InputError(f"{out}: the checkpoint was trained on other data ({before.get('train')}: "
                         f"{before.get('n_train')} training / {before.get('n_val')} validation stars; now "
                         f"{now['n_train']} / {now['n_val']}); resume with the same dataset")


def train(source, out_dir, cfg: FaderConfig, val_source=None, resume=False, overwrite=False, progress=True) -> dict:
    """Train (or, with ``resume``, continue training) a model into ``out_dir``; returns the
    last validation metrics.  ``source``/``val_source``: a dataset or an ``ArraySource``."""
    t0 = time.monotonic()
    out = Path(out_dir)
    ranks, device = Ranks.setup(pick_device(cfg.run.device))  # several under torchrun (tagging/distributed.py)
    progress = progress and ranks.main
    resumable = check_out_dir(out, resume, overwrite)
    overwrite, resume = overwrite or (resume and not resumable), resumable  # killed before a checkpoint: restart
    ranks.barrier()  # every rank has looked at MODEL_DIR before rank 0 writes to it
    data = prepare(source, val_source, cfg, with_eval_set=ranks.main, progress=progress)
    if not ranks.main:
        return Trainer(cfg, data, out, ranks, device, resume, t0).run(progress)
    out.mkdir(exist_ok=True)  # the data are fine: (re)create the model folder (rank 0 alone writes it)
    with model_folder.exclusive(out):
        model_folder.remove_stale_temporaries(out)
        if not resume:
            if not overwrite and any(out.iterdir()):  # written by another run since the first look
                raise InputError(f"{out} is not empty; pass overwrite=True to replace it", "overwrite")
            model_folder.clear(out)
        return Trainer(cfg, data, out, ranks, device, resume, t0).run(progress)
