"""FID of the outputs against a reference set (default: the inputs), as pytorch-fid computes it
(Inception pool3 features, float64 statistics, the Fréchet distance of pytorch-fid).  The
reference set's statistics are cached by content (:mod:`clipinvert.evaluation.cache`).  When
the pairs' inputs are the reference and a run aligned them, the reference is the FFHQ crops the
method saw (re-made per pair), not the photos; those are not cached.
docs/evaluation.md#fid
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ... import imaging
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
        self.crops: dict[tuple[Path, Path | None], np.ndarray] = {}  # aligned inputs' features

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        return ["inception"]

    def update(self, batch: Batch) -> None:
        self.features.append(self.networks.inception.from_pil(batch.output_images))
        self.inputs.extend(p.input for p in batch.pairs)
        if self.reference is None:
            new = {}
            for pair, image in zip(batch.pairs, batch.input_images, strict=True):
                key = (pair.input, pair.transform)
                if pair.transform is not None and key not in self.crops:
                    new[key] = image
            if new:
                feats = self.networks.inception.from_pil(list(new.values()))
                self.crops.update(zip(new, feats, strict=True))

    def result(self) -> MetricResult:
        from ..fid import fid_statistics, frechet_distance, small_set_warning

        if not self.features:
            return MetricResult(None, 0)
        outputs = np.concatenate(self.features)
        notes: list[str] = []
        try:
            ref_stats, ref_count, kind = self._reference(notes)
            out_stats = fid_statistics(outputs)
        except ValueError as exc:  # a set of fewer than 2 images has no covariance
            notes.append(f"FID not computed: {exc}")
            return MetricResult(None, len(outputs), notes=notes)
        warning = small_set_warning(len(outputs), ref_count)
        if warning:
            notes.append(warning)
        value = frechet_distance(out_stats, ref_stats, notes=notes)
        return MetricResult(float(value), len(outputs), notes=notes, details={
            "reference": kind, "reference_count": ref_count})

    def _reference(self, notes: list[str]) -> tuple[Any, int, str]:
        """The reference statistics, their image count, and what they are."""
        from ..cache import reference_statistics
        from ..fid import fid_statistics

        if self.crops:  # the aligned crops the method saw; photos without a transform as read
            cropped = {k[0] for k in self.crops}
            plain = [p for p in dict.fromkeys(self.inputs) if p not in cropped]
            feats = np.stack(list(self.crops.values()))
            if plain:
                feats = np.concatenate([feats, self.networks.inception.from_pil(
                    [imaging.load_image(p) for p in plain])])
            return fid_statistics(feats), len(feats), "inputs (aligned crops)"
        reference = self.reference if self.reference is not None else list(
            dict.fromkeys(self.inputs))
        stats, count, ref_notes = reference_statistics(
            reference, self.networks.inception, self.networks.files["inception"])
        notes.extend(ref_notes)
        return stats, count, "inputs" if self.reference is None else "reference set"
