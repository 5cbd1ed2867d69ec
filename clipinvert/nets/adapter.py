"""CLIPAdapter: text-conditioned modulation of the e4e feature maps (docs/forward-pass.md#adapter).

Three ``SubTextMapper`` s modulate the IR-SE50 taps c3 (coarse, 512 ch), c2 (medium, 256 ch) and
c1 (fine, 128 ch) with a raw CLIP embedding; e4e's own frozen FPN and style heads then turn the
modulated maps into the residual Δ of the edit.  (Those are the released widths; a narrower
encoder's adapter has its taps' widths, read off the keys.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import PixelNorm

GROUPS = 32  # TextModulationModule's GroupNorm, as released
MAPPINGS = ("fine_mapping", "medium_mapping", "coarse_mapping")  # modulate c1, c2, c3


def _film_mlp(text_dim: int, hidden: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(text_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(0.01),
                         nn.Linear(hidden, channels))


class TextModulationModule(nn.Module):
    """``leaky_relu(GN(conv(x))·(1 + exp(γ(t))) + β(t))`` — the released weights' exact form."""

    def __init__(self, channels: int, text_dim: int = 512, hidden: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = nn.GroupNorm(GROUPS, channels)
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
    """Modulates (c1, c2, c3) with a text (or image) embedding ``(B, text_dim)``.

    ``widths`` are the channel counts of (c1, c2, c3) — fine, medium, coarse; the released
    (128, 256, 512) by default.  Each must be a multiple of 32: the GroupNorm keeps 32 groups.
    """

    def __init__(self, text_dim: int = 512, hidden: int = 512,
                 widths: Sequence[int] = (128, 256, 512)) -> None:
        super().__init__()
        fine, medium, coarse = (int(w) for w in widths)
        for name, w in zip(MAPPINGS, (fine, medium, coarse), strict=True):
            if w <= 0 or w % GROUPS:
                raise ValueError(f"CLIPAdapter {name.split('_')[0]} width {w} is not a multiple "
                                 f"of {GROUPS} (its GroupNorm keeps {GROUPS} groups)")
        self.text_dim = text_dim
        self.widths = (fine, medium, coarse)
        # Built coarse → fine, as released (seeded test weights depend on the order).
        self.coarse_mapping = SubTextMapper(coarse, text_dim, hidden)
        self.medium_mapping = SubTextMapper(medium, text_dim, hidden)
        self.fine_mapping = SubTextMapper(fine, text_dim, hidden)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> CLIPAdapter:
        """Text width, hidden width and the three channel widths read off the keys."""
        key = "coarse_mapping.modulation_module_list.0.gamma_function.0.weight"
        if key not in sd:
            raise KeyError("not a CLIPAdapter state dict (no coarse_mapping keys)")
        hidden, text_dim = (int(s) for s in sd[key].shape)
        widths = []
        for name in MAPPINGS:  # each width from γ's output layer; the strict load checks the rest
            out = f"{name}.modulation_module_list.0.gamma_function.3.weight"
            if out not in sd:
                raise KeyError(f"not a CLIPAdapter state dict (no {out})")
            widths.append(int(sd[out].shape[0]))
        return cls(text_dim=text_dim, hidden=hidden, widths=widths)

    def forward(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        got = (c1.shape[1], c2.shape[1], c3.shape[1])
        assert got == self.widths, f"features of widths {got}, adapter built for {self.widths}"
        text = text.to(c3.dtype)
        return (self.fine_mapping(c1, text), self.medium_mapping(c2, text),
                self.coarse_mapping(c3, text))
