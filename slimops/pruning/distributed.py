"""Data-parallel training with PyTorch's own engine: ``torchrun`` + DDP (gloo on CPU, nccl on GPU).

Under ``torchrun`` every rank trains on its share of each global batch (``DistributedSampler``'s
round-robin split, dealt per batch: see :mod:`slimops.pruning.train`) and DDP averages the gradients. BatchNorm must see the *global* batch too, or the slimmed BN statistics
would depend on the number of processes: on CUDA that is ``nn.SyncBatchNorm``; it refuses CPU tensors,
so on CPU :class:`GlobalBatchNorm2d` computes the same global statistics with an autograd-aware
all-reduce. With both, N processes reproduce the 1-process run on the same global batch.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


DIST_TIMEOUT_S = 600.0  # SLIMOPS_DIST_TIMEOUT overrides (seconds)


@dataclass
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: torch.device) -> DistInfo:
    """Joins the process group ``torchrun`` describes in the environment (nothing without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # A peer that dies or hangs turns into an error on the others after this long, not gloo's/NCCL's default
        # 30 minutes (torchrun also tears the group down when a worker exits with an error). It bounds the
        # longest gap between two collectives: an epoch's checkpoint write on rank 0 while the others wait.
        timeout = datetime.timedelta(seconds=float(os.environ.get("SLIMOPS_DIST_TIMEOUT", DIST_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))



def init_run(device: str):
    """(device, DistInfo) of a run: :func:`init_from_env` on ``device``; under torchrun with CUDA, each rank takes
    cuda:LOCAL_RANK (and makes it current)."""
    dev = torch.device(device)
    info = init_from_env(dev)
    if info.enabled and dev.type == "cuda":
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    return dev, info

def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    mean = sum(x)/N and var = sum(x^2)/N - mean^2 with the sums all-reduced (``torch.distributed.nn``'s
    all_reduce, whose backward all-reduces the gradient, so the backward is the global batch's too).
    Running statistics follow nn.BatchNorm2d (unbiased variance, momentum). Eval mode is local.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings

        with warnings.catch_warnings():  # its replacement (functional collectives) has no autograd
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

        xf = x.float()
        c = x.shape[1]
        dims = (0, 2, 3)
        n_local = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        # Two passes (mean, then the centred sum of squares) rather than E[x^2] - mean^2, which loses
        # precision in float32 when |mean| >> std.
        s1 = all_reduce(torch.cat([xf.sum(dim=dims), n_local]))
        n = s1[c]
        mean = s1[:c] / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dim=dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm for data-parallel training, in place: SyncBatchNorm on CUDA,
    GlobalBatchNorm2d on CPU. Only the class changes (parameters, buffers and module names stay), so
    state_dicts, slim_groups and the optimizer's parameter references are untouched."""
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            if device.type == "cuda":
                m.__class__ = nn.SyncBatchNorm
                m.process_group = None  # the default (world) group
            else:
                m.__class__ = GlobalBatchNorm2d
    return model


def restore_batchnorm(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert_batchnorm` (before saving or compacting a plain model)."""
    for m in model.modules():
        if type(m) in (GlobalBatchNorm2d, nn.SyncBatchNorm):
            m.__class__ = nn.BatchNorm2d
            m.__dict__.pop("process_group", None)
    return model
