"""Data-parallel training over processes (``torchrun`` + DistributedDataParallel), kept out of
the training loop's way: in one process every helper here is the identity.

``torchrun --nproc-per-node N chemtwin train ...`` starts N copies with RANK / WORLD_SIZE /
LOCAL_RANK in their environment; ``Ranks.setup`` joins them into a process group (gloo on the
CPU, nccl on CUDA, one GPU per local rank).  How N processes stay one model:

* every rank builds the same model from the same seed (DDP also broadcasts rank 0's weights);
* every rank draws the same global batch (the shuffle generator is seeded alike) and keeps
  rows ``rank::N`` of it: DistributedSampler's split.  ``--batch-size`` keeps its meaning (the
  global batch), so N processes follow the trajectory of one, up to float rounding;
* the autoencoder and the adversary are two DDP modules, so each of the two backward passes
  of a step all-reduces exactly its own gradients and both optimizers step on the gradient of
  the global batch;
* the losses are means over rows: each rank scales its loss by rows_r * N / rows_global, so
  DDP's average of gradients is the gradient of the global mean, also for a short last batch;
* the latent BatchNorm normalises with the global batch's statistics (``SyncLatentNorm``;
  torch's SyncBatchNorm is GPU-only), with gradients through them;
* rank 0's clock decides the learning-rate schedule and the time-limit stop (wall clocks
  differ by rank); only rank 0 evaluates and writes the model folder.

Dropout masks are drawn per rank (each rank > 0 reseeds from (seed, rank, step) at start and
resume), so a run with adversary dropout matches one process in distribution, not bit for bit.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: d(sum)/d(part) sends every rank's gradient back to each."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncLatentNorm(nn.BatchNorm1d):
    """BatchNorm1d (no affine) whose training statistics are those of the batch of all ranks."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(z)
        total = _SumOverRanks.apply
        n = total(torch.tensor([float(len(z))], device=z.device, dtype=z.dtype))[0]
        mean = total(z.sum(0)) / n
        var = total((z - mean).pow(2).sum(0)) / n  # two passes: no cancellation
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        return (z - mean) / torch.sqrt(var + self.eps)


class Autoencoder(nn.Module):
    """Encoder and decoder of a FaderNet as one module (the adversary left out): what DDP
    wraps for the autoencoder step.  Returns (z, reconstruction)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parts = nn.ModuleDict({name: m for name, m in model.named_children() if name != "adversary"})
        self._model = [model]  # a list: not registered again, its methods do the work

    def forward(self, x, w, u):
        model = self._model[0]
        z = model.encode(x, w, u)
        return z, model.decode(z, u)


@dataclass
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: torch.device) -> tuple["Ranks", torch.device]:
        """Join the process group torchrun describes in the environment (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return cls(), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():  # kept for the process's life: a second train() reuses it
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            atexit.register(dist.destroy_process_group)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank), device

    def wrap(self, model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(autoencoder, adversary) to train with: DDP modules when there are several ranks."""
        ae, adversary = Autoencoder(model), model.adversary
        if self.world == 1:
            return ae, adversary
        old = model.latent_norm
        if isinstance(old, nn.BatchNorm1d):  # same state-dict keys: checkpoints do not change
            sync = SyncLatentNorm(old.num_features, affine=False, momentum=old.momentum).to(old.running_mean.device)
            sync.load_state_dict(old.state_dict())
            model.latent_norm = ae.parts["latent_norm"] = sync
        ids = None if next(model.parameters()).device.type == "cpu" else [self.local_rank]
        return DistributedDataParallel(ae, device_ids=ids), DistributedDataParallel(adversary, device_ids=ids)

    def reseed(self, seed: int, step: int) -> None:
        """Dropout masks of their own on ranks > 0 (rank 0 keeps the checkpointed RNG)."""
        if self.rank:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]))

    def shard(self, *tensors):
        """This rank's rows (rank::world) of a global batch."""
        return tuple(None if t is None else t[self.rank :: self.world] for t in tensors)

    def loss_weight(self, n_local: int, n_global: int) -> float:
        """Factor of this rank's mean loss so that DDP's gradient average is the global mean's."""
        return n_local * self.world / n_global

    def agree(self, *values: float) -> list[float]:
        """Rank 0's values, on every rank."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.broadcast(t, 0)
        return t.tolist()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (running training losses for the history)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
