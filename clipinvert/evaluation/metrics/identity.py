"""ID: identity similarity of input and output, ``cos × 100`` (paper Table 1).

ArcFace IR-SE50 with the training loss's crop (:class:`~clipinvert.losses.IdentityNet`, the same
object the loss uses), MoCo-v2 on domains without ArcFace, or — asked for by name — dlib's
face-recognition network (an offline stand-in; the report names it).  docs/evaluation.md#id
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..networks import identity_kind
from .base import Batch, EvalOptions, PerPairMetric


class Identity(PerPairMetric):
    name: ClassVar[str] = "id"
    scale: ClassVar[float] = 100.0
    description: ClassVar[str] = "identity similarity of output and input (cos × 100)"

    def __init__(self, options: EvalOptions, networks: Any) -> None:
        super().__init__(options, networks)
        self.kind = identity_kind(networks.domain, options.identity)
        self.details = {"network": {"arcface": "ArcFace IR-SE50", "moco": "MoCo-v2 ResNet-50",
                                    "dlib": "dlib face recognition ResNet (not the paper's)"}
                        [self.kind], "identity": self.kind}

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        kind = identity_kind(domain, options.identity)
        return [] if kind == "dlib" else [kind]

    @torch.no_grad()
    def score(self, batch: Batch, keep: list[int]) -> torch.Tensor:
        net = self.networks.identity(self.kind)
        device = self.networks.device
        a = net.embed(batch.inputs[keep].to(device))
        b = net.embed(batch.outputs[keep].to(device))
        return (a * b).sum(dim=1).cpu()
