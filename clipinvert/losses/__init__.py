"""Training losses, also reused by evaluation (docs/losses.md).

* :class:`ClipImageInput` — image tensors in [−1, 1] → CLIP input (``"release"`` / ``"clip"``).
* :class:`DirectionalCLIPLoss` — the released directional CLIP loss.
* :class:`IdentityNet`, :class:`IdentityLoss` — ArcFace (faces) / MoCo-v2 (other domains).
* :class:`LPIPSLoss` — LPIPS AlexNet v0.1, the trunk read from the model registry.

Nothing here downloads anything: every network comes from a file the caller names (usually the
registry's ``clip``, ``arcface``, ``moco`` and ``lpips`` roles).
"""

from .clip_input import OPENAI_MEAN, OPENAI_STD, ClipImageInput, release_resample_matrix
from .directional import DirectionalCLIPLoss, unit
from .identity import ARCFACE_CROP, IdentityLoss, IdentityNet, arcface_crop
from .perceptual import LPIPSLoss, build_lpips

__all__ = [
    "ARCFACE_CROP", "OPENAI_MEAN", "OPENAI_STD", "ClipImageInput", "DirectionalCLIPLoss",
    "IdentityLoss", "IdentityNet", "LPIPSLoss", "arcface_crop", "build_lpips",
    "release_resample_matrix", "unit",
]
