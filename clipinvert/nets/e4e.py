"""encoder4editing (e4e) with its IR-SE50 body, in the released state-dict layout.

The body's widths and unit counts, the FPN width and the style count/width are constructor
arguments (defaults: the released sizes) and :meth:`Encoder4Editing.from_state_dict` reads them
all off the keys, so narrow test encoders load through the same code as the released file.

The body and the heads are separate calls on purpose: CLIPInverter runs the expensive IR-SE50
body once per image (:meth:`Encoder4Editing.forward_features`) and the cheap FPN + style heads
twice (:meth:`Encoder4Editing.forward_styles`): on the plain features for the inversion and on the
text-modulated features for the residual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .irse import (
    IR_SE50_STAGES,
    check_stages,
    input_layer,
    irse_body,
    stage_ends,
    stages_from_state_dict,
)
from .ops import EqualLinear

COARSE_END, MEDIUM_END = 3, 7  # styles [0,3) read c3, [3,7) read p2, the rest p1


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

    ``stages`` is the IR-SE body (four stages; see :mod:`.irse`); its taps c1, c2, c3 are the
    ends of stages 2, 3 and 4 (body indices 6, 20, 23 in the released net).  The FPN adds
    upsampled c3 to its lateral layers, so ``fpn_width`` must be the last stage's width.
    """

    input_size = 256

    def __init__(self, n_styles: int = 18, style_dim: int = 512,
                 stages: Sequence[Sequence[int]] = IR_SE50_STAGES,
                 fpn_width: int | None = None) -> None:
        super().__init__()
        spec = check_stages(stages)
        if len(spec) != 4:
            raise ValueError(f"the e4e body has 4 IR-SE stages (taps c1, c2, c3 end stages 2-4), "
                             f"got {len(spec)}")
        c1_ch, c2_ch, c3_ch = (depth for _, depth, _ in spec[1:])
        fpn_width = c3_ch if fpn_width is None else int(fpn_width)
        if fpn_width != c3_ch:
            raise ValueError(f"e4e FPN width {fpn_width} must equal the last stage's width "
                             f"{c3_ch} (the FPN adds c3 to its lateral layers)")
        self.n_styles, self.style_dim = n_styles, style_dim
        self.stages, self.fpn_width = spec, fpn_width
        self.tap_widths = (c1_ch, c2_ch, c3_ch)
        self.taps = stage_ends(spec)[1:]
        self.input_layer = input_layer(spec[0][0])
        self.body = irse_body(spec)
        self.styles = nn.ModuleList()
        # The FPN is c3's width; only the style heads' output width follows style_dim.
        for i in range(n_styles):
            spatial = 16 if i < COARSE_END else 32 if i < MEDIUM_END else 64
            self.styles.append(GradualStyleBlock(fpn_width, style_dim, spatial))
        self.latlayer1 = nn.Conv2d(c2_ch, fpn_width, 1, 1, 0)
        self.latlayer2 = nn.Conv2d(c1_ch, fpn_width, 1, 1, 0)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Encoder4Editing:
        """Build with the sizes the checkpoint holds: style count and width (e.g. 18×512 at
        1024), body stage widths and unit counts, FPN width."""
        n = sum(1 for k in sd if k.startswith("styles.") and k.endswith(".linear.weight"))
        if n == 0 or "styles.0.linear.weight" not in sd:
            raise KeyError("not an e4e encoder state dict (no styles.*.linear keys)")
        if "latlayer1.weight" not in sd:
            raise KeyError("not an e4e encoder state dict (no latlayer1.weight)")
        stages = stages_from_state_dict(sd, "e4e encoder")
        return cls(n_styles=n, style_dim=int(sd["styles.0.linear.weight"].shape[0]),
                   stages=stages, fpn_width=int(sd["latlayer1.weight"].shape[0]))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The IR-SE body: returns the taps c1, c2, c3 — (128,64,64), (256,32,32), (512,16,16)
        for the released widths."""
        assert x.ndim == 4 and x.shape[1] == 3, f"expected (B,3,H,W) images, got {tuple(x.shape)}"
        x = self.input_layer(x)
        tap1, tap2, _ = self.taps
        c1 = c2 = None
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i == tap1:
                c1 = x
            elif i == tap2:
                c2 = x
        assert c1 is not None and c2 is not None
        assert (c1.shape[1], c2.shape[1], x.shape[1]) == self.tap_widths
        return c1, c2, x

    def forward_styles(self, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, *,
                       stage: int | None = None) -> torch.Tensor:
        """FPN + style heads: ``w[:,0]`` broadcast to all, plus per-index deltas.

        ``stage`` (e4e's progressive training, docs/training.md#e4e-stage): only the deltas
        ``1..stage`` are computed, every later index is ``w0`` alone — the heads (and lateral
        layers) not yet reached are not called at all, so they get no gradient, exactly as in
        e4e's ``ProgressiveStage``.  None (inference) computes every delta.
        """
        assert (c1.shape[1], c2.shape[1], c3.shape[1]) == self.tap_widths, (
            f"features of widths {(c1.shape[1], c2.shape[1], c3.shape[1])}, "
            f"expected {self.tap_widths}")
        last = self.n_styles - 1 if stage is None else min(int(stage), self.n_styles - 1)
        w0 = self.styles[0](c3)
        w = [w0]
        features = c3
        p2 = None
        for i in range(1, self.n_styles):
            if i > last:
                w.append(w0)
                continue
            if i == COARSE_END:
                p2 = _upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MEDIUM_END:
                assert p2 is not None
                features = _upsample_add(p2, self.latlayer2(c1))
            w.append(w0 + self.styles[i](features))
        return torch.stack(w, dim=1)

    def progressive_groups(self) -> list[list[nn.Parameter]]:
        """The parameters each progressive stage brings into training: group 0 the body and
        ``styles.0`` (w0), group ``i`` the head of delta ``i`` (plus ``latlayer1`` with delta 3
        and ``latlayer2`` with delta 7, the first to read them).  e4e's Ranger counts its
        steps per parameter, so a head reached at step 20000 starts its own count then; an
        optimizer that counts per group reproduces that when group ``i`` joins at stage ``i``."""
        groups: list[list[nn.Parameter]] = [
            [*self.input_layer.parameters(), *self.body.parameters(),
             *self.styles[0].parameters()]]
        for i in range(1, self.n_styles):
            params = list(self.styles[i].parameters())
            if i == COARSE_END:
                params += list(self.latlayer1.parameters())
            elif i == MEDIUM_END:
                params += list(self.latlayer2.parameters())
            groups.append(params)
        return groups

    def forward(self, x: torch.Tensor, *, stage: int | None = None) -> torch.Tensor:
        return self.forward_styles(*self.forward_features(x), stage=stage)
