"""LPIPS (AlexNet, v0.1) with the trunk read from the model registry.

The ``lpips`` package's own maths and its calibrated linear heads (shipped inside the wheel)
are used unchanged.  Its AlexNet trunk, which ``lpips`` would otherwise have torchvision download
on first use, is the registry's ``lpips`` weight file — torchvision's
``alexnet-owt-7be5be79.pth`` — read by :func:`clipinvert.checkpoints.load_alexnet_trunk`, so
nothing is fetched behind the user's back.

``lpips`` keeps torchvision's module indices inside its five slices (``slice1.0`` is
``features.0``, ``slice2.3`` is ``features.3``, … ``slice5.10`` is ``features.10``), so the
mapping is read off the built network: ``slice{s}.{N}.* ← features.{N}.*``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .directional import reduce


def lpips_trunk_state_dict(net: nn.Module, trunk: Mapping[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` tensors → the keys of ``lpips``'s ``alexnet`` module
    (``sliceK.N.*``); every key of ``net`` must be found."""
    out = {}
    for key in net.state_dict():
        _, rest = key.split(".", 1)  # "slice2.3.weight" -> "3.weight"
        name = f"features.{rest}"
        if name not in trunk:
            raise KeyError(f"the AlexNet trunk has no {name} (needed for lpips {key})")
        out[key] = trunk[name]
    return out


def build_lpips(trunk: Mapping[str, torch.Tensor]) -> nn.Module:
    """``lpips.LPIPS(net="alex", version="0.1")`` with its packaged linear heads and the given
    trunk (torchvision ``features.*`` names); frozen, eval mode, no network access.

    ``pnet_rand=True`` keeps ``lpips`` from asking torchvision for the ImageNet weights; the
    random trunk it builds is then overwritten, strictly, with ``trunk``.
    """
    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" chatter
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True,
                            verbose=False)
    model.net.load_state_dict(lpips_trunk_state_dict(model.net, trunk), strict=True)
    return model.eval().requires_grad_(False)


class LPIPSLoss(nn.Module):
    """LPIPS distance (AlexNet, v0.1), batch mean, images in [−1, 1].

    ``trunk``: the AlexNet ``features.*`` state dict, as
    :func:`clipinvert.checkpoints.load_alexnet_trunk` returns it (or use :meth:`from_file`).
    Frozen and always in eval mode; gradients flow to both images.
    """

    def __init__(self, trunk: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.lpips = build_lpips(trunk)

    @classmethod
    def from_file(cls, path: Path | str, *, trust: bool = False) -> LPIPSLoss:
        from ..checkpoints import load_alexnet_trunk

        return cls(load_alexnet_trunk(path, trust=trust))

    def train(self, mode: bool = True) -> LPIPSLoss:  # frozen: always eval (Dropout in heads)
        return super().train(False)

    def forward(self, output: torch.Tensor, target: torch.Tensor, *,
                reduction: str = "mean") -> torch.Tensor:
        """(B, 3, H, W) each, in [−1, 1] → 0-dim (or (B,) with ``reduction="none"``)."""
        d = self.lpips(output, target.to(output))
        return reduce(d.reshape(d.shape[0]), reduction)
