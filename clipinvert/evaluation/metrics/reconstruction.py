"""How much of the input an output keeps: ``lpips`` (AlexNet v0.1, the training loss's network)
and ``mse``, both between the aligned input and the output at 256 px in [−1, 1].
docs/evaluation.md#lpips-mse
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Batch, EvalOptions, PerPairMetric


class LPIPS(PerPairMetric):
    name: ClassVar[str] = "lpips"
    higher_is_better: ClassVar[bool] = False
    description: ClassVar[str] = "LPIPS (AlexNet) distance of output to input"

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        return ["lpips"]

    @torch.no_grad()
    def score(self, batch: Batch, keep: list[int]) -> torch.Tensor:
        net = self.networks.lpips
        device = self.networks.device
        return net(batch.outputs[keep].to(device), batch.inputs[keep].to(device),
                   reduction="none").cpu()


class MSE(PerPairMetric):
    name: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False
    description: ClassVar[str] = "mean squared error of output to input, [-1,1] units"

    def score(self, batch: Batch, keep: list[int]) -> torch.Tensor:
        d = batch.outputs[keep].float() - batch.inputs[keep].float()
        return d.pow(2).flatten(1).mean(dim=1).cpu()
