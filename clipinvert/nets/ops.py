"""Pure-PyTorch building blocks shared by the StyleGAN2 generator and the e4e encoder.

The released weights were trained with rosinality's CUDA kernels (``upfirdn2d``,
``fused_leaky_relu``).  Everything here reproduces the same maths with stock PyTorch ops so the
tool runs anywhere, CPU included, with nothing to compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)


def make_kernel(k: Sequence[float], gain: float = 1.0) -> torch.Tensor:
    """A separable FIR kernel as a 2-D tensor normalised to sum ``gain`` (``[1,3,3,1]`` → 4×4).

    Computed in numpy and only then made a tensor: modules are built on the meta device before
    their weights are assigned, and arithmetic on meta tensors makes PyTorch import its
    compiler stack (1.3 s of start-up).  For StyleGAN's kernels every step is exact.
    """
    a = np.asarray(k, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :] * a[:, None]
    return torch.tensor(a / a.sum() * gain, dtype=torch.float32)


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative = crop), FIR-filter, downsample.

    Output side is ``(H·up + p0 + p1 − kh) // down + 1``.  The filter is applied as a true
    convolution (kernel flipped), matching the CUDA op; the StyleGAN kernels are symmetric anyway.
    """
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, scale: float = SQRT2
) -> torch.Tensor:
    """``leaky_relu(x + bias) · √2`` with the bias broadcast over the channel dimension."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


class PixelNorm(nn.Module):
    """Normalise each feature vector to unit RMS over the channel dimension (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored unscaled, scaled at run time."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        w = torch.randn(out_dim, in_dim)
        # (no arithmetic on a meta tensor: see make_kernel; its values are assigned anyway)
        self.weight = nn.Parameter(w if w.is_meta else w / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            out = F.linear(x, self.weight * self.scale)
            if bias is None:
                return F.leaky_relu(out, 0.2) * SQRT2
            return fused_leaky_relu(out, bias)
        return F.linear(x, self.weight * self.scale, bias)


class FusedLeakyReLU(nn.Module):
    """Holds the per-channel bias that StyleGAN2 folds into its activation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)
