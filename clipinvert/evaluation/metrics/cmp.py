"""CMP, CLIP Manipulative Precision (paper §4.3, eq. 14): ``sim · (1 − diff)`` per edit, mean.

``sim``: cosine of CLIP's embedding of the output (CLIP's own preprocessing) with the target
prompt's.  ``diff``: the mean absolute difference of the aligned input and the output, both at
256 px, in [−1, 1] units (the authors' convention; ``diff_range="01"`` gives [0, 1] units, half
of it).  docs/evaluation.md#cmp
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Batch, EvalOptions, PerPairMetric


class CMP(PerPairMetric):
    name: ClassVar[str] = "cmp"
    needs_prompt: ClassVar[bool] = True
    description: ClassVar[str] = "CLIP similarity to the prompt × (1 − pixel difference)"

    def __init__(self, options: EvalOptions, networks: Any) -> None:
        super().__init__(options, networks)
        if options.diff_range not in ("pm1", "01"):
            raise ValueError(f"diff_range must be 'pm1' or '01', not {options.diff_range!r}")
        self.details = {"diff_range": "[-1,1]" if options.diff_range == "pm1" else "[0,1]",
                        "size": options.size}
        self.sims: dict[int, float] = {}
        self.diffs: dict[int, float] = {}

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        return ["clip"]

    def score(self, batch: Batch, keep: list[int]) -> torch.Tensor:
        image = batch.cached(
            "clip_image", lambda: self.networks.image_embeddings(batch.output_images))
        text = self.networks.text_embeddings([batch.pairs[i].prompt for i in keep])
        sim = (image[keep] * text.to(image)).sum(dim=1).cpu()
        diff = cmp_diff(batch.inputs[keep], batch.outputs[keep], self.options.diff_range)
        for i, s, d in zip(keep, sim.tolist(), diff.tolist(), strict=True):
            self.sims[batch.index[i]], self.diffs[batch.index[i]] = s, d
        return sim * (1 - diff)

    def result(self):
        res = super().result()
        n = len(self.sims) or 1
        res.details.update(sim=sum(self.sims.values()) / n, diff=sum(self.diffs.values()) / n)
        return res


def cmp_diff(inputs: torch.Tensor, outputs: torch.Tensor, diff_range: str = "pm1"
             ) -> torch.Tensor:
    """Per-pair mean |input − output| of images in [−1, 1]; halved for [0, 1] units."""
    d = (inputs.float() - outputs.float()).abs().flatten(1).mean(dim=1).cpu()
    return d if diff_range == "pm1" else d / 2
