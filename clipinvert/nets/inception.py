"""The FID Inception v3 of pytorch-fid (the network the CLIPInverter paper's FIDs were measured
with), built without downloading anything.

pytorch-fid's ``InceptionV3(use_fid_inception=True)`` fetches its weights inside its
constructor (``fid_inception_v3()`` → ``load_state_dict_from_url``), so it cannot be built from
a file we located ourselves.  :class:`FIDInceptionV3` is the same network from pytorch-fid's
own parts: torchvision's ``Inception3`` with 1008 classes and no auxiliary head, whose blocks
5b-5d, 6b-6e, 7b and 7c are replaced by pytorch-fid's ``FIDInceptionA`` / ``FIDInceptionC`` /
``FIDInceptionE_1`` / ``FIDInceptionE_2`` exactly as ``fid_inception_v3()`` does.  Its state
dict therefore has the names of the published ``pt_inception-2015-12-05-6726825d.pth``
(``Conv2d_1a_3x3.conv.weight`` … ``Mixed_7c.*``, ``fc.weight`` (1008, 2048), ``fc.bias``) and
loads from it unchanged.

:meth:`FIDInceptionV3.forward` is pytorch-fid's ``InceptionV3.forward`` with
``output_blocks=[3]``, ``resize_input=True``, ``normalize_input=True``: bilinear resize to
299×299 (``align_corners=False``), ``2x − 1``, blocks 0-3, global average pool → the 2048-d
pool3 features.  tests/test_fid.py checks the two networks agree bit for bit on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torchvision.models.inception import Inception3

FID_SIZE = 299  # pytorch-fid resizes every image to this before the network
FID_DIMS = 2048  # pool3 features (pytorch-fid's block 3, its default)
FID_CLASSES = 1008  # the TF 2015-12-05 graph's logits; unused, but the file holds them


class FIDInceptionV3(Inception3):
    """pytorch-fid's FID Inception v3, pool3 output: images in [0, 1] → (B, 2048) features.

    Random weights until a state dict in ``pt_inception-2015-12-05-6726825d.pth``'s layout is
    loaded (:func:`clipinvert.checkpoints.load_inception` does that).  ``AuxLogits`` is absent
    and ``fc`` / ``dropout`` are never run, as in pytorch-fid.
    """

    def __init__(self) -> None:
        # torchvision's own (truncated-normal) initialisation is skipped, as pytorch-fid skips
        # it: the weights are always loaded over it.
        super().__init__(num_classes=FID_CLASSES, aux_logits=False, init_weights=False)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 3, H, W) floats in [0, 1], any H and W → (B, 2048) pool3 features.

        The steps and their order are pytorch-fid's ``InceptionV3.forward`` (block 3 only).
        The range is not checked here (that would cost a device sync per batch); see
        :class:`clipinvert.evaluation.fid.InceptionFeatures`.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception takes RGB images (B, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"FID Inception takes float images in [0, 1], got {images.dtype}")
        x = F.interpolate(images, size=(FID_SIZE, FID_SIZE), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1  # [0, 1] → [-1, 1], the range of the TF graph's input
        # block 0: input → first max pool
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        # block 1: → second max pool
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        # block 2: → the auxiliary classifier's input
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        # block 3: → final average pool
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(self.avgpool(x), 1)
