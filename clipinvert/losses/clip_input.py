"""The one way image *tensors* become CLIP image-tower input: :class:`ClipImageInput`.

Two modes, both taking images in [−1, 1] (B, 3, H, W):

``"release"`` — what the released training code feeds CLIP in its losses (StyleCLIP's
    ``AvgPool2d(kernel_size=size // 32)(Upsample(scale_factor=7)(x))``): nearest upsampling ×7,
    then average pooling to 224×224 (for a 256 input, ×7 = 1792 = 8·224: 8×8 pooling).  Values
    stay in [−1, 1] (no clamping) and CLIP's mean/std normalisation is **not** applied — the
    released loss weights were trained that way.
``"clip"`` — CLIP's own evaluation preprocessing applied to the tensor: map to [0, 1] and clamp
    (what a saved 8-bit image holds), bicubic resize (antialiased) of the shorter side to 224,
    centre crop 224×224, clamp again (PIL's bicubic output is 8-bit, so it cannot overshoot),
    normalise with OpenAI's mean and std.  For metrics comparable with
    ``ClipEncoder.encode_image`` on the saved picture.

Both are linear maps (plus clamps) and differentiable: gradients reach the input.

The release mode is computed as two small matrices, ``A_h · x · A_wᵀ``, where ``A = P · U`` is
the 1-D nearest-×7 upsampling ``U`` followed by PyTorch's adaptive average pooling ``P``; both
steps are separable, so this is exactly ``adaptive_avg_pool2d(interpolate(x, scale_factor=7),
224)`` — and, whenever 7·H is a multiple of 224, exactly the release's ``AvgPool2d(7·H/224)``
— without materialising the 49-times larger upsampled image (1.2 GB for one 1024² image).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# open_clip.OPENAI_DATASET_MEAN / _STD (copied so that importing this module stays light).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

UPSAMPLE = 7  # the release's torch.nn.Upsample(scale_factor=7)
MODES = ("release", "clip")


def release_resample_matrix(size: int, out: int = 224, *, dtype: torch.dtype = torch.float64,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """(out, size): nearest ×7 upsampling then adaptive average pooling to ``out``, in 1-D."""
    n = UPSAMPLE * size
    up = torch.zeros(n, size, dtype=torch.float64)
    up[torch.arange(n), torch.arange(n) // UPSAMPLE] = 1.0
    pool = torch.zeros(out, n, dtype=torch.float64)
    for i in range(out):  # PyTorch's adaptive pooling bins
        start, end = (i * n) // out, math.ceil((i + 1) * n / out)
        pool[i, start:end] = 1.0 / (end - start)
    return (pool @ up).to(device=device, dtype=dtype)


class ClipImageInput(nn.Module):
    """Images in [−1, 1], (B, 3, H, W) → CLIP input (B, 3, image_size, image_size).

    ``mode="release"``: ×7 nearest + average pooling, no clamping, no normalisation (training
    losses); ``mode="clip"``: CLIP's bicubic resize, centre crop and OpenAI mean/std (metrics).
    See the module docstring.  Has no parameters or state.
    """

    def __init__(self, mode: str = "release", image_size: int = 224,
                 mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ClipImageInput mode must be one of {', '.join(MODES)}, "
                             f"not {mode!r}")
        self.mode, self.image_size = mode, int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, image_size={self.image_size}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W) in [-1,1], got {tuple(images.shape)}")
        if self.mode == "release":
            return self._release(images)
        return self._clip(images)

    def _matrix(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (size, like.device, like.dtype)
        if key not in self._matrices:
            self._matrices[key] = release_resample_matrix(
                size, self.image_size, dtype=like.dtype, device=like.device)
        return self._matrices[key]

    def _release(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise ValueError("ClipImageInput expects floating-point images in [-1, 1]")
        a_h = self._matrix(x.shape[2], x)
        a_w = self._matrix(x.shape[3], x)
        return torch.einsum("ih,bchw,jw->bcij", a_h, x, a_w)

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        x = ((x + 1) / 2).clamp(0, 1)
        h, w = x.shape[2:]
        # torchvision's Resize(size) on the shorter side, then CenterCrop(size), as open_clip's
        # image_transform does.
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[:, :, top:top + size, left:left + size]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
