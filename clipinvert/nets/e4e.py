"""encoder4editing (e4e) with its IR-SE50 body, in the released state-dict layout.

The body and the heads are separate calls on purpose: CLIPInverter runs the expensive IR-SE50
body once per image (:meth:`Encoder4Editing.forward_features`) and the cheap FPN + style heads
twice (:meth:`Encoder4Editing.forward_styles`): on the plain features for the inversion and on the
text-modulated features for the residual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .ops import EqualLinear

# IR-SE50: (in, depth, units) per stage; the first unit of each stage has stride 2.
IR_SE50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
TAP_C1, TAP_C2, TAP_C3 = 6, 20, 23  # body indices whose outputs feed the FPN
COARSE_END, MEDIUM_END = 3, 7  # styles [0,3) read c3, [3,7) read p2, the rest p1
FPN_WIDTH = 512


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_ch: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_ch, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def ir_se50_body() -> nn.Sequential:
    units = []
    for in_ch, depth, n in IR_SE50_STAGES:
        units.append(BottleneckIRSE(in_ch, depth, 2))
        units.extend(BottleneckIRSE(depth, depth, 1) for _ in range(n - 1))
    return nn.Sequential(*units)


def ir_input_layer() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))


class GradualStyleBlock(nn.Module):
    """log2(spatial) stride-2 convs down to 1×1, then an equalised linear layer → one style."""

    def __init__(self, in_ch: int, out_ch: int, spatial: int) -> None:
        super().__init__()
        n = int(math.log2(spatial))
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(n - 1):
            layers += [nn.Conv2d(out_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        self.out_ch = out_ch
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_ch, out_ch, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_ch))


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class Encoder4Editing(nn.Module):
    """e4e: image (B,3,256,256) in [-1,1] → W+ offsets (B, n_styles, style_dim).

    ``latent_avg`` is *not* added here; the pipeline adds it (the released
    ``start_from_latent_avg``) because CLIPInverter's residual Δ goes through the same heads
    without it.
    """

    input_size = 256

    def __init__(self, n_styles: int = 18, style_dim: int = 512) -> None:
        super().__init__()
        self.n_styles, self.style_dim = n_styles, style_dim
        self.input_layer = ir_input_layer()
        self.body = ir_se50_body()
        self.styles = nn.ModuleList()
        # The FPN is 512 wide (c3's width); only the style heads' width follows style_dim.
        for i in range(n_styles):
            spatial = 16 if i < COARSE_END else 32 if i < MEDIUM_END else 64
            self.styles.append(GradualStyleBlock(FPN_WIDTH, style_dim, spatial))
        self.latlayer1 = nn.Conv2d(256, FPN_WIDTH, 1, 1, 0)
        self.latlayer2 = nn.Conv2d(128, FPN_WIDTH, 1, 1, 0)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Encoder4Editing:
        """Build with the style count and width the checkpoint holds (e.g. 18×512 at 1024)."""
        n = sum(1 for k in sd if k.startswith("styles.") and k.endswith(".linear.weight"))
        if n == 0 or "styles.0.linear.weight" not in sd:
            raise KeyError("not an e4e encoder state dict (no styles.*.linear keys)")
        return cls(n_styles=n, style_dim=int(sd["styles.0.linear.weight"].shape[0]))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The IR-SE50 body: returns the taps c1 (128,64,64), c2 (256,32,32), c3 (512,16,16)."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W) images, got {tuple(x.shape)}"
        x = self.input_layer(x)
        c1 = c2 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == TAP_C1:
                c1 = x
            elif i == TAP_C2:
                c2 = x
        assert c1 is not None and c2 is not None
        return c1, c2, x

    def forward_styles(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
        """FPN + style heads: ``w[:,0]`` broadcast to all, plus per-index deltas."""
        w0 = self.styles[0](c3)
        w = [w0]
        features = c3
        p2 = None
        for i in range(1, self.n_styles):
            if i == COARSE_END:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MEDIUM_END:
                assert p2 is not None
                features = _upsample_add(p2, self.latlayer2(c1))
            w.append(w0 + self.styles[i](features))
        return torch.stack(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_styles(*self.forward_features(x))
