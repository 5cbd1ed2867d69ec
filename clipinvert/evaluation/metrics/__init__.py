"""The metrics, by the names ``--metrics`` and the report use (docs/evaluation.md#metrics).

One small file per metric; this registry maps each name to its class.
"""

from __future__ import annotations

from .ama import AMAMultiple, AMASingle
from .base import Batch, EvalOptions, Metric, MetricResult
from .cmp import CMP, cmp_diff
from .fid import FID
from .identity import Identity
from .reconstruction import LPIPS, MSE

METRICS: dict[str, type[Metric]] = {m.name: m for m in (
    FID, CMP, AMASingle, AMAMultiple, Identity, LPIPS, MSE)}
# Without prompts (reconstructions, e.g. `clipinvert invert` outputs) only these make sense.
RECONSTRUCTION = ("lpips", "id", "mse", "fid")

__all__ = ["METRICS", "RECONSTRUCTION", "Batch", "EvalOptions", "Metric", "MetricResult",
           "cmp_diff"]
