"""AMA, Attribute Manipulation Accuracy (paper §4.3): did the edit apply what it named?

Each scored pair names its target attributes (``"attributes"`` in the manifest; the benchmark
sets them).  One attribute → ``ama_single``; two or more → ``ama_multiple``.  The accuracy is
computed per target (an attribute, or a combination such as ``Blond_Hair+Smiling``), and AMA is
the mean of those accuracies.

* Faces: the CelebA attribute classifier (registry role ``attributes``) reads the output resized
  square to its input size; a single edit succeeds when its attribute scores above
  ``ama_threshold`` (0.5), a multiple edit when every named attribute scores above
  ``ama_multiple_threshold`` (0.9, the paper's).
* Cats and birds: CLIP as a zero-shot classifier — the output against the captions of every
  class of each named attribute's category (:mod:`clipinvert.evaluation.protocol`); an
  attribute succeeds when its caption has the highest softmax probability (multiple: all do).

docs/evaluation.md#ama
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import torch

from ... import imaging
from ..protocol import ZERO_SHOT, zero_shot_probabilities
from .base import Batch, EvalOptions, Metric, MetricResult


class _AMA(Metric):
    multiple: ClassVar[bool]

    def __init__(self, options: EvalOptions, networks: Any) -> None:
        super().__init__(options, networks)
        self.zero_shot = ZERO_SHOT.get(networks.domain.name) if not _has_classifier(
            networks.domain) else None
        self.hits: dict[str, list[bool]] = defaultdict(list)
        self.per_pair: dict[int, float] = {}
        self.unknown: dict[str, list[str]] = defaultdict(list)  # attribute → pairs left out

    @classmethod
    def roles(cls, domain: Any, options: EvalOptions) -> list[str]:
        return ["attributes"] if _has_classifier(domain) else ["clip"]

    def wants(self, pair) -> bool:
        n = len(pair.attributes)
        return pair.prompt is not None and (n >= 2 if self.multiple else n == 1)

    def known(self, name: str) -> bool:
        """Whether the classifier can score attribute ``name`` on this domain."""
        if self.zero_shot is None:
            return name in self.networks.attributes.attributes
        try:
            self.zero_shot.attribute(name)
        except ValueError:
            return False
        return True

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        keep = []
        for i, pair in enumerate(batch.pairs):
            if not self.wants(pair):
                continue
            unknown = [a for a in pair.attributes if not self.known(a)]
            for a in unknown:  # left out of this AMA, named in its notes and details
                self.unknown[a].append(pair.key)
            if not unknown:
                keep.append(i)
        if not keep:
            return
        if self.zero_shot is None:
            ok = self._classifier_hits(batch, keep)
        else:
            ok = self._zero_shot_hits(batch, keep)
        for i, hit in zip(keep, ok, strict=True):
            self.hits["+".join(batch.pairs[i].attributes)].append(hit)
            self.per_pair[batch.index[i]] = float(hit)

    def _classifier_hits(self, batch: Batch, keep: list[int]) -> list[bool]:
        net = self.networks.attributes
        names = list(net.attributes)
        x = imaging.to_tensor([batch.output_images[i] for i in keep], net.input_size)
        probs = net.probabilities(x.to(self.networks.device)).cpu()
        threshold = self.threshold
        return [all(float(p[names.index(a)]) > threshold for a in batch.pairs[i].attributes)
                for p, i in zip(probs, keep, strict=True)]

    def _zero_shot_hits(self, batch: Batch, keep: list[int]) -> list[bool]:
        assert self.zero_shot is not None
        images = batch.cached("clip_image",
                              lambda: self.networks.image_embeddings(batch.output_images))
        hits = []
        for i in keep:
            ok = True
            for name in batch.pairs[i].attributes:
                attr = self.zero_shot.attribute(name)
                text = self.networks.text_embeddings(self.zero_shot.captions(attr.category))
                probs = zero_shot_probabilities(images[i:i + 1], text)[0]
                best = self.zero_shot.categories[attr.category][int(probs.argmax())]
                ok = ok and best == attr.label
            hits.append(ok)
        return hits

    @property
    def threshold(self) -> float:
        return self.options.ama_multiple_threshold if self.multiple \
            else self.options.ama_threshold

    def result(self) -> MetricResult:
        per_target = {k: sum(v) / len(v) for k, v in sorted(self.hits.items())}
        value = sum(per_target.values()) / len(per_target) if per_target else None
        details: dict[str, Any] = {"classifier": "CLIP zero-shot" if self.zero_shot
                                   else "CelebA attribute classifier",
                                   "targets": {k: len(v) for k, v in self.hits.items()}}
        if self.zero_shot is None:
            details["threshold"] = self.threshold
        notes = [f"{self.name}: {len(keys)} pair(s) name {name!r}, which the "
                 f"{details['classifier']} does not know (e.g. {keys[0]}): left out"
                 for name, keys in sorted(self.unknown.items())]
        if value is None and not self.unknown:
            what = "two or more attributes" if self.multiple else "one attribute"
            notes.append(f"{self.name}: no pair names {what} ('attributes' in the manifest): "
                         "not scored")
        if self.unknown:
            details["unknown_attributes"] = {k: v for k, v in sorted(self.unknown.items())}
        return MetricResult(value, len(self.per_pair), per_pair=dict(self.per_pair),
                            per_attribute=per_target, details=details, notes=notes)


class AMASingle(_AMA):
    name: ClassVar[str] = "ama_single"
    multiple: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = True
    description: ClassVar[str] = "edits naming one attribute that the classifier finds"


class AMAMultiple(_AMA):
    name: ClassVar[str] = "ama_multiple"
    multiple: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True
    description: ClassVar[str] = "edits naming 2-3 attributes, all found (score > 0.9)"


def _has_classifier(domain: Any) -> bool:
    """Faces are scored by the attribute classifier; domains with a zero-shot set by CLIP."""
    return domain.name not in ZERO_SHOT
