"""The CelebA face-attribute classifier of the AMA metric: MobileNet-v1 with mish activations.

The paper scores attribute edits with the classifier of Nie et al. (2021, LACE): a MobileNet-v1
trunk (a 3×3 stem, then 13 depthwise-separable blocks) whose ReLUs are replaced by mish, global
average pooling and one linear layer with an output per CelebA attribute.  No trained weights
were ever published, so ``clipinvert eval train-classifier`` trains it
(:mod:`clipinvert.evaluation.classifier`, docs/attribute-classifier.md).

State-dict layout, as the reference code's ``nn.Sequential`` numbering gives it (mish and the
pooling hold no tensors, so their indices are simply absent): ``features.0.{0: conv, 1: bn}``
for the stem; ``features.{1..13}.{0: depthwise conv, 1: bn, 3: pointwise conv, 4: bn}`` for the
blocks; ``fc.{weight, bias}``.  A state dict stores no strides, so they are fixed by position
(:data:`MOBILENET_STRIDES`) and only the widths are read back from the tensor shapes — which is
what lets tests train a narrow copy of the same network in milliseconds.

:meth:`AttributeNet.forward` returns logits, because training uses ``BCEWithLogits`` (the
reference's sigmoid followed by ``BCELoss`` loses precision where the sigmoid saturates); the
per-attribute probabilities are :meth:`AttributeNet.probabilities`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The 40 CelebA attributes, in the order of ``list_attr_celeba.txt`` (and of the outputs).
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)

#: Output widths of the stem and of the 13 depthwise-separable blocks (standard MobileNet-v1).
MOBILENET_WIDTHS: tuple[int, ...] = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512,
                                     1024, 1024)
#: Stride of the stem and of each block's depthwise convolution (fixed by position).
MOBILENET_STRIDES: tuple[int, ...] = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)

#: Input side the classifier is trained and evaluated at (a square resize of the image).
INPUT_SIZE = 224
#: ``Normalize(mean, std)`` applied to every channel of [0, 1] pixels: the input is in [-1, 1].
NORMALIZE: tuple[float, float] = (0.5, 0.5)
#: The ``format`` value of a file written by the trainer (docs/attribute-classifier.md).
ATTRIBUTES_FORMAT = "clipinvert-celeba-attributes-v1"


def mobilenet_widths(multiplier: float = 1.0) -> tuple[int, ...]:
    """MobileNet-v1's widths scaled by ``multiplier`` (at least 1 channel each): the width
    multiplier of the MobileNet paper, used here for tiny test networks."""
    if not multiplier > 0:
        raise ValueError(f"the width multiplier must be above 0, got {multiplier}")
    return tuple(max(1, round(w * multiplier)) for w in MOBILENET_WIDTHS)


def _stem(out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.Mish())


def _separable(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    """Depthwise 3×3 (one filter per channel) then pointwise 1×1, each with BN and mish."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch),
        nn.Mish(),
        nn.Conv2d(in_ch, out_ch, 1, 1, 0, bias=False), nn.BatchNorm2d(out_ch), nn.Mish())


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    spec = tuple(int(w) for w in widths)
    if len(spec) != len(MOBILENET_STRIDES):
        raise ValueError(f"MobileNet-v1 has {len(MOBILENET_STRIDES)} widths (stem + 13 blocks), "
                         f"got {len(spec)}")
    if min(spec) < 1:
        raise ValueError(f"every width must be at least 1, got {spec}")
    return spec


class AttributeNet(nn.Module):
    """MobileNet-v1 (mish) → one logit per attribute.

    ``attributes`` names the outputs (default: :data:`CELEBA_ATTRIBUTES` for 40 outputs);
    ``input_size`` is the square side the network was trained at — :meth:`probabilities` resizes
    to it.  Neither is a tensor, so the loader sets them from the file.
    """

    def __init__(self, widths: Sequence[int] = MOBILENET_WIDTHS,
                 num_attributes: int = len(CELEBA_ATTRIBUTES), *,
                 attributes: Sequence[str] | None = None, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.widths = _check_widths(widths)
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be at least 1, got {num_attributes}")
        if attributes is None:
            attributes = (CELEBA_ATTRIBUTES if num_attributes == len(CELEBA_ATTRIBUTES)
                          else tuple(f"attribute_{i}" for i in range(num_attributes)))
        self.attributes: tuple[str, ...] = tuple(str(a) for a in attributes)
        if len(self.attributes) != num_attributes:
            raise ValueError(f"{len(self.attributes)} attribute names for {num_attributes} "
                             "outputs")
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = int(input_size)
        layers = [_stem(self.widths[0], MOBILENET_STRIDES[0])]
        for k in range(1, len(self.widths)):
            layers.append(_separable(self.widths[k - 1], self.widths[k], MOBILENET_STRIDES[k]))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(self.widths[-1], num_attributes)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> AttributeNet:
        """Widths and the number of outputs read off the tensor shapes (raises ``KeyError``
        when the keys are not this network's, ``ValueError`` when the shapes do not chain)."""
        if "features.0.0.weight" not in sd or "fc.weight" not in sd:
            raise KeyError("not a MobileNet attribute classifier (no features.0.0.weight / "
                           "fc.weight)")
        widths = [int(sd["features.0.0.weight"].shape[0])]
        for k in range(1, len(MOBILENET_STRIDES)):
            key = f"features.{k}.3.weight"
            if key not in sd:
                raise KeyError(f"not a 13-block MobileNet-v1 (no {key})")
            out_ch, in_ch = (int(s) for s in sd[key].shape[:2])
            if in_ch != widths[-1]:
                raise ValueError(f"{key} takes {in_ch} channels but block {k - 1} gives "
                                 f"{widths[-1]}")
            widths.append(out_ch)
        n_out, n_in = (int(s) for s in sd["fc.weight"].shape)
        if n_in != widths[-1]:
            raise ValueError(f"fc takes {n_in} features but the last block gives {widths[-1]}")
        return cls(widths, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → logits (B, attributes).

        The mean over the final feature map is the reference's ``AvgPool2d(7)`` at S = 224
        (a 7×7 map) and keeps working for the small inputs of tests.
        """
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,S,S) images, got {tuple(x.shape)}"
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Per-attribute probabilities (B, attributes) of images (B, 3, H, W) in [-1, 1].

        Images of another size are resized to :attr:`input_size` first (bilinear with
        antialiasing, close to the PIL resize the training data went through).
        """
        size = self.input_size
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return torch.sigmoid(self(images))
