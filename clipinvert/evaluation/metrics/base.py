"""What every metric shares: the batch it sees, the networks it may ask for, its result.

A metric is a small class in a file of its own (one per metric, as in NVlabs' StyleGAN3
metrics), registered by name in :mod:`clipinvert.evaluation.metrics`.  The scorer
(:mod:`clipinvert.evaluation.score`) reads each pair's images once, in batches, and hands every
batch to every requested metric; networks are loaded once, only when a metric asks for them,
and what two metrics both need for a batch (CLIP's embedding of the outputs) is computed once
(:attr:`Batch.cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image

from ..pairs import Pair


@dataclass
class EvalOptions:
    """Settings of the metrics (docs/evaluation.md#metrics); recorded in the report."""

    diff_range: str = "pm1"  # CMP's pixel difference in [−1, 1] units ("pm1") or [0, 1] ("01")
    ama_threshold: float = 0.5  # AMA-single: a success when the attribute's score is above it
    ama_multiple_threshold: float = 0.9  # AMA-multiple: every named attribute above it
    identity: str = "auto"  # auto (ArcFace where the domain has it, else MoCo), arcface, moco, dlib
    size: int = 256  # the size input and output are compared at (CMP diff, ID, LPIPS, MSE)


@dataclass
class Batch:
    """Pairs read together: both images at ``size`` in [−1, 1], and the output as saved."""

    pairs: list[Pair]
    index: list[int]  # positions in the scored pair list
    inputs: torch.Tensor  # (B, 3, size, size) in [−1, 1]
    outputs: torch.Tensor  # (B, 3, size, size) in [−1, 1]
    output_images: list[Image.Image]  # the outputs at their own size (FID reads those)
    input_images: list[Image.Image] = field(default_factory=list)  # what the method saw
    cache: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass
class MetricResult:
    """A metric's value, and what it was made of."""

    value: float | None  # None: nothing to score (e.g. no pair had a prompt)
    count: int  # pairs (or images) that went into it
    per_pair: dict[int, float] = field(default_factory=dict)  # pair position → its score
    per_attribute: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # thresholds, networks, parts
    notes: list[str] = field(default_factory=list)  # one line each, also printed

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "count": self.count, "per_attribute": self.per_attribute,
                **self.details, **({"notes": self.notes} if self.notes else {})}


class Metric:
    """One metric: ``update`` with every batch, then ``result``."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = False  # scored only on pairs with a prompt
    description: ClassVar[str] = ""

    def __init__(self, options: EvalOptions, networks: Any) -> None:
        self.options = options
        self.networks = networks

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        """The registry roles (weight files) this metric needs on ``domain``."""
        return []

    def wants(self, pair: Pair) -> bool:
        return pair.prompt is not None or not self.needs_prompt

    def update(self, batch: Batch) -> None:
        raise NotImplementedError

    def result(self) -> MetricResult:
        raise NotImplementedError


def mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


class PerPairMetric(Metric):
    """A metric that is the mean of one number per pair."""

    scale: ClassVar[float] = 1.0

    def __init__(self, options: EvalOptions, networks: Any) -> None:
        super().__init__(options, networks)
        self.values: dict[int, float] = {}
        self.targets: dict[int, str] = {}  # pair position → its target ("A" or "A+B")
        self.details: dict[str, Any] = {}

    def update(self, batch: Batch) -> None:
        keep = [i for i, p in enumerate(batch.pairs) if self.wants(p)]
        if not keep:
            return
        scores = self.score(batch, keep)
        for i, s in zip(keep, scores.tolist(), strict=True):
            self.values[batch.index[i]] = float(s) * self.scale
            if batch.pairs[i].attributes:
                self.targets[batch.index[i]] = "+".join(batch.pairs[i].attributes)

    def score(self, batch: Batch, keep: list[int]) -> torch.Tensor:
        """One number per pair of ``keep`` (positions in the batch)."""
        raise NotImplementedError

    def result(self) -> MetricResult:
        """The mean over pairs, and (where pairs name their targets) the mean per target."""
        by_target: dict[str, list[float]] = {}
        for i, target in self.targets.items():
            by_target.setdefault(target, []).append(self.values[i])
        per_target = {t: m for t, v in sorted(by_target.items()) if (m := mean(v)) is not None}
        return MetricResult(mean(list(self.values.values())), len(self.values),
                            per_pair=dict(self.values), per_attribute=per_target,
                            details=dict(self.details))
