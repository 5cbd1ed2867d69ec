"""CLIPAdapter: text-conditioned modulation of the e4e feature maps (formats.md §3).

Three ``SubTextMapper`` s modulate the IR-SE50 taps c3 (coarse, 512 ch), c2 (medium, 256 ch) and
c1 (fine, 128 ch) with a raw CLIP embedding; e4e's own frozen FPN and style heads then turn the
modulated maps into the residual Δ of the edit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .ops import PixelNorm


def _film_mlp(text_dim: int, hidden: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(text_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.01),
                         nn.Linear(hidden, channels))


class TextModulationModule(nn.Module):
    """``leaky_relu(GN(conv(x))·(1 + exp(γ(t))) + β(t))`` — the released weights' exact form."""

    def __init__(self, channels: int, text_dim: int = 512, hidden: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = nn.GroupNorm(32, channels)
        self.gamma_function = _film_mlp(text_dim, hidden, channels)
        self.beta_function = _film_mlp(text_dim, hidden, channels)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma_function(text)[:, :, None, None]
        beta = self.beta_function(text)[:, :, None, None]
        return F.leaky_relu(self.norm(self.conv(x)) * (1 + torch.exp(gamma)) + beta, 0.01)


class SubTextMapper(nn.Module):
    def __init__(self, channels: int, text_dim: int = 512, hidden: int = 512) -> None:
        super().__init__()
        self.pixelnorm = PixelNorm()
        self.modulation_module_list = nn.ModuleList(
            [TextModulationModule(channels, text_dim, hidden)])

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.pixelnorm(x)
        for module in self.modulation_module_list:
            x = module(x, text)
        return x


class CLIPAdapter(nn.Module):
    """Modulates (c1, c2, c3) with a text (or image) embedding ``(B, text_dim)``."""

    def __init__(self, text_dim: int = 512, hidden: int = 512) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.coarse_mapping = SubTextMapper(512, text_dim, hidden)
        self.medium_mapping = SubTextMapper(256, text_dim, hidden)
        self.fine_mapping = SubTextMapper(128, text_dim, hidden)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> CLIPAdapter:
        key = "coarse_mapping.modulation_module_list.0.gamma_function.0.weight"
        if key not in sd:
            raise KeyError("not a CLIPAdapter state dict (no coarse_mapping keys)")
        hidden, text_dim = (int(s) for s in sd[key].shape)
        return cls(text_dim=text_dim, hidden=hidden)

    def forward(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = text.to(c3.dtype)
        return (self.fine_mapping(c1, text), self.medium_mapping(c2, text),
                self.coarse_mapping(c3, text))
