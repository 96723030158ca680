"""DDP helpers: one code path for a single process and for ``torchrun`` (NCCL on GPU, gloo on CPU).

Two pieces make a run of W processes with B frames each train like one process with W * B frames:

- :func:`mean_over_ranks` for loss normalisers: DDP averages gradients over ranks, so a loss divided by
  the mean over ranks of its count (not by the local count) gives every rank its share of the
  global-batch loss (see ``CenterHeadBase.loss``).
- :func:`convert_sync_batchnorm` for BatchNorm statistics over the global batch. torch's
  ``SyncBatchNorm`` refuses CPU tensors (torch 2.13: "SyncBatchNorm expected input tensor to be on
  GPU"), so gloo runs on the CPU use :class:`CpuSyncBatchNorm`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - torch.device is immutable

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and pick the device.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda was requested but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, torch_device)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without DDP)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``values`` over all ranks; ``values`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _channel_sums(t: torch.Tensor) -> torch.Tensor:
    """(C,) float64 sums of an (N, C, *) tensor over every dimension but the channels."""
    return t.sum([0, *range(2, t.dim())], dtype=torch.float64)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation of (N, C, *) inputs with statistics over the union of every rank's batch.

    The sums are all-reduced in float64: the mean first, then the centred squares (no cancellation
    as in E[x^2] - E[x]^2). The backward all-reduces the two per-channel sums the input gradient
    needs; weight and bias gradients stay local, as DDP averages them afterwards.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)  # broadcasts (C,) over (N, C, *)
        stats = torch.cat([_channel_sums(x), x.new_tensor([x.numel() // channels], dtype=torch.float64)])
        dist.all_reduce(stats)
        count = stats[channels].item()
        if count <= 1:
            raise ValueError(
                f"CpuSyncBatchNorm: expected more than 1 value per channel over all ranks, got {count:g}"
            )
        mean = stats[:channels] / count
        centred = x - mean.to(x.dtype).view(shape)
        var = _channel_sums(centred * centred)
        dist.all_reduce(var)
        var /= count  # biased: what normalises; the running estimate is unbiased
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = centred * invstd.view(shape)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count = count
        out = xhat if weight is None else xhat * weight.view(shape)
        return out if bias is None else out + bias.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, invstd, weight = ctx.saved_tensors
        channels = xhat.shape[1]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        grad_xhat = grad_out if weight is None else grad_out * weight.view(shape)
        sums = torch.cat([_channel_sums(grad_xhat), _channel_sums(grad_xhat * xhat)])
        dist.all_reduce(sums)
        mean_grad, mean_grad_xhat = (sums / ctx.count).to(xhat.dtype).view(2, *shape)
        grad_x = (grad_xhat - mean_grad - xhat * mean_grad_xhat) * invstd.view(shape)
        grad_weight = _channel_sums(grad_out * xhat).to(xhat.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = _channel_sums(grad_out).to(xhat.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) inputs whose training statistics span every rank's batch, on any
    backend (gloo included). Without a process group, in eval mode, or with one rank it is plain
    BatchNorm; parameters and buffers are those of ``nn.BatchNorm*d``, so checkpoints interchange."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm: expected (N, C, *) input, got {input.dim()} dimension(s)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        self._check_input_dim(input)
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as in nn.BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, momentum, self.eps,
        )

    @classmethod
    def from_batch_norm(cls, bn: _BatchNorm) -> CpuSyncBatchNorm:
        """A CpuSyncBatchNorm sharing ``bn``'s parameters and buffers."""
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        sync.weight, sync.bias = bn.weight, bn.bias
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
        sync.train(bn.training)
        return sync


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer replaced in place by a synchronised one: torch's
    ``SyncBatchNorm`` on accelerators, :class:`CpuSyncBatchNorm` on the CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm):
        return CpuSyncBatchNorm.from_batch_norm(module)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            module.add_module(name, converted)
    return module
