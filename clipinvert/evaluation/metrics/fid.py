"""FID of the outputs against a reference set (default: the inputs), as pytorch-fid computes it
(Inception pool3 features, float64 statistics, the Fréchet distance of pytorch-fid).  The
reference set's statistics are cached by content (:mod:`clipinvert.evaluation.cache`).
docs/evaluation.md#fid
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .base import Batch, EvalOptions, Metric, MetricResult


class FID(Metric):
    name: ClassVar[str] = "fid"
    higher_is_better: ClassVar[bool] = False
    description: ClassVar[str] = "Fréchet Inception Distance, outputs vs reference images"

    def __init__(self, options: EvalOptions, networks: Any, *,
                 reference: list[Path] | None = None) -> None:
        super().__init__(options, networks)
        self.reference = reference  # None: the inputs of the scored pairs
        self.features: list[np.ndarray] = []
        self.inputs: list[Path] = []

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        return ["inception"]

    def update(self, batch: Batch) -> None:
        self.features.append(self.networks.inception.from_pil(batch.output_images))
        self.inputs.extend(p.input for p in batch.pairs)

    def result(self) -> MetricResult:
        from ..cache import reference_statistics
        from ..fid import fid_statistics, frechet_distance, small_set_warning

        if not self.features:
            return MetricResult(None, 0)
        outputs = np.concatenate(self.features)
        reference = self.reference if self.reference is not None else list(
            dict.fromkeys(self.inputs))
        ref_stats, ref_count, ref_notes = reference_statistics(
            reference, self.networks.inception, self.networks.files["inception"])
        notes = list(ref_notes)
        warning = small_set_warning(len(outputs), ref_count)
        if warning:
            notes.append(warning)
        value = frechet_distance(fid_statistics(outputs), ref_stats, notes=notes)
        return MetricResult(float(value), len(outputs), notes=notes, details={
            "reference": "inputs" if self.reference is None else "reference set",
            "reference_count": ref_count})

