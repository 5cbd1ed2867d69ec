"""BatchNorm over the global batch of a data-parallel run, on any device and backend.

Why: the e4e encoder trains with its IR-SE50 BatchNorm layers in training mode, so under DDP
each process would normalise with the statistics of its own few images — a different model
from the single-process recipe (batch 8), and a broken one at one image per GPU.  PyTorch's
``SyncBatchNorm`` fixes that only on CUDA/XPU (it refuses CPU tensors, so a gloo run — and
every test on a CPU — could not use it).  :class:`GlobalBatchNorm2d` computes the same
statistics with two autograd-aware all-reduces (``torch.distributed.nn.functional``), so a
step of N processes × b images equals one process with N·b images, to rounding, on any device.

:func:`synchronise_batchnorm` switches a module's ``BatchNorm2d`` layers in place (their class
only): parameters stay the same objects (optimizers keep them) and state-dict keys do not
change (checkpoints keep e4e's layout).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the whole global batch.

    Mean first, then the variance of the centred values (two passes, as ``BatchNorm2d``'s own
    kernel is precise), each summed over processes; the running statistics move as
    ``BatchNorm2d``'s do (unbiased variance, ``momentum`` or the cumulative average).  Outside
    training, or outside a process group, it *is* ``BatchNorm2d``.  Every process must run
    the forward in training mode together (work done by rank 0 alone — validation, image
    grids — runs in eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        # The count stays a tensor: no host sync per layer on CUDA.
        n = torch.tensor([float(x.numel() // x.shape[1])], device=x.device, dtype=x.dtype)
        dist.all_reduce(n)
        mean = dist_fn.all_reduce(x.sum(dims)) / n
        centred = x - mean[None, :, None, None]
        var = dist_fn.all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)
                            if self.momentum is None else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean), momentum)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var), momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def synchronise_batchnorm(module: nn.Module) -> int:
    """Make every ``BatchNorm2d`` in ``module`` a :class:`GlobalBatchNorm2d`, in place.
    Returns how many were switched."""
    switched = 0
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
            switched += 1
    return switched
