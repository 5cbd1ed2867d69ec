"""IR-SE ResNet blocks (InsightFace's ``bottleneck_IR_SE``), shared by the e4e encoder body and
the ArcFace identity backbone, in the published state-dict layout.

A body is described by its stages ``((in, depth, units), ...)``; the first unit of each stage
has stride 2, the others stride 1.  A state dict stores no strides, so stages are read back as
runs of equal width: consecutive stages must differ in width (every published IR-SE net does:
64, 128, 256, 512).  IR-SE50 is ``IR_SE50_STAGES``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

Stage = tuple[int, int, int]  # (in channels, depth, units)
IR_SE50_STAGES: tuple[Stage, ...] = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
SE_REDUCTION = 16


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from globally pooled features."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """``res_layer(x) + shortcut_layer(x)``; the shortcut is a strided 1×1 conv + BN when the
    width changes, else a (strided) identity."""

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
            SEModule(depth, SE_REDUCTION),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def check_stages(stages: Sequence[Sequence[int]]) -> tuple[Stage, ...]:
    """Validate a stage spec (chained widths, ≥ 1 unit, readable back from keys); as tuples."""
    spec = tuple((int(i), int(d), int(n)) for i, d, n in stages)
    if not spec:
        raise ValueError("an IR-SE body needs at least one stage")
    for k, (in_ch, depth, units) in enumerate(spec):
        if units < 1 or in_ch < 1 or depth < SE_REDUCTION:
            raise ValueError(f"IR-SE stage {k} {spec[k]}: needs ≥ 1 unit and a width ≥ "
                             f"{SE_REDUCTION} (the SE gate divides it by {SE_REDUCTION})")
        if k and in_ch != spec[k - 1][1]:
            raise ValueError(f"IR-SE stage {k} takes {in_ch} channels but stage {k - 1} gives "
                             f"{spec[k - 1][1]}")
        if k and depth == spec[k - 1][1]:
            raise ValueError(f"IR-SE stages {k - 1} and {k} are both {depth} wide: stages must "
                             "change width (a state dict stores no strides to tell them apart)")
    return spec


def input_layer(width: int = 64) -> nn.Sequential:
    """``input_layer``: 3×3 conv (3 → width, no bias), BatchNorm, PReLU."""
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                         nn.PReLU(width))


def irse_body(stages: Sequence[Sequence[int]] = IR_SE50_STAGES) -> nn.Sequential:
    """``body``: the units of every stage in order (``body.0`` … ``body.{sum(units)-1}``)."""
    units: list[nn.Module] = []
    for in_ch, depth, n in check_stages(stages):
        units.append(BottleneckIRSE(in_ch, depth, 2))
        units.extend(BottleneckIRSE(depth, depth, 1) for _ in range(n - 1))
    return nn.Sequential(*units)


def stage_ends(stages: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Body index of the last unit of each stage (IR-SE50: 2, 6, 20, 23)."""
    ends, total = [], 0
    for _, _, n in stages:
        total += n
        ends.append(total - 1)
    return tuple(ends)


def stages_from_state_dict(sd: Mapping[str, torch.Tensor],
                           what: str = "IR-SE") -> tuple[Stage, ...]:
    """The stage spec a state dict holds: widths from ``input_layer.0.weight`` and each unit's
    ``res_layer.1.weight`` (depth, in, 3, 3); a new stage wherever the width changes.

    Raises ``KeyError`` when the keys are not an IR-SE body, ``ValueError`` when they do not
    chain up (the strict load that follows names any other mismatch).
    """
    if "input_layer.0.weight" not in sd:
        raise KeyError(f"not an {what} state dict (no input_layer.0.weight)")
    width = int(sd["input_layer.0.weight"].shape[0])
    n = 0
    while f"body.{n}.res_layer.1.weight" in sd:
        n += 1
    if n == 0:
        raise KeyError(f"not an {what} state dict (no body.0.res_layer.1.weight)")
    stages: list[list[int]] = []
    for i in range(n):
        depth, in_ch = (int(s) for s in sd[f"body.{i}.res_layer.1.weight"].shape[:2])
        if in_ch != width:
            raise ValueError(f"{what} body.{i} takes {in_ch} channels but gets {width}")
        if i == 0 or depth != width:
            stages.append([in_ch, depth, 1])
        else:
            stages[-1][2] += 1
        width = depth
    return check_stages(stages)


class IRSEBackbone(nn.Module):
    """ArcFace IR-SE (``Backbone(112, 50, mode='ir_se')`` of InsightFace_Pytorch / pSp / e4e):
    a 112×112 face crop in [-1, 1] → an L2-normalised identity embedding.

    Keys as in the published ``model_ir_se50.pth``: ``input_layer.*``, ``body.0..23.*`` and
    ``output_layer.{0: BatchNorm2d, 1: Dropout, 2: Flatten, 3: Linear, 4: BatchNorm1d}``.
    """

    def __init__(self, stages: Sequence[Sequence[int]] = IR_SE50_STAGES, input_size: int = 112,
                 embedding_size: int = 512, *, drop_ratio: float = 0.6,
                 affine: bool = True) -> None:
        super().__init__()
        spec = check_stages(stages)
        scale = 2 ** len(spec)
        if input_size % scale:
            raise ValueError(f"ArcFace input size {input_size} is not a multiple of {scale} "
                             f"({len(spec)} stride-2 stages)")
        self.stages, self.input_size, self.embedding_size = spec, input_size, embedding_size
        width, side = spec[-1][1], input_size // scale
        # Built in the published order (input, output, body), so seeded weights match it.
        self.input_layer = input_layer(spec[0][0])
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(width), nn.Dropout(drop_ratio), nn.Flatten(),
            nn.Linear(width * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=affine))
        self.body = irse_body(spec)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> IRSEBackbone:
        """Widths, unit counts, input size and embedding size read off the keys."""
        stages = stages_from_state_dict(sd, "ArcFace IR-SE")
        if "output_layer.3.weight" not in sd:
            raise KeyError("not an ArcFace IR-SE state dict (no output_layer.3.weight)")
        embedding, flat = (int(s) for s in sd["output_layer.3.weight"].shape)
        width = stages[-1][1]
        side = math.isqrt(flat // width) if flat % width == 0 else 0
        if side == 0 or side * side * width != flat:
            raise ValueError(f"output_layer.3 takes {flat} features, not {width}×s×s for the "
                             f"last stage's {width} channels")
        return cls(stages, side * 2 ** len(stages), embedding,
                   affine="output_layer.4.weight" in sd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        assert x.ndim == 4 and tuple(x.shape[1:]) == (3, size, size), (
            f"expected (B,3,{size},{size}) face crops, got {tuple(x.shape)}")
        x = self.body(self.input_layer(x))
        x = self.output_layer(x)
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
