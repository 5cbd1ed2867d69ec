"""Scoring a set of pairs with the chosen metrics: the Python API under `clipinvert eval metrics`.

Each pair's images are read once, in batches; every metric sees every batch
(:mod:`clipinvert.evaluation.metrics`).  Comparisons happen at 256 px in [−1, 1]: both images
are resized square with the e4e transform (:func:`clipinvert.imaging.to_tensor`).  A pair whose
image cannot be read, or whose input and output differ in aspect ratio, is one line, skipped and
counted — the rest is scored.  docs/evaluation.md#metrics
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import imaging
from ..errors import ClipInvertError, UsageError, first_line
from .metrics import METRICS, RECONSTRUCTION, Batch, EvalOptions, Metric, MetricResult
from .pairs import Pair, PairSet

ASPECT_TOLERANCE = 0.02  # input and output may differ in size, not in shape


@dataclass
class Scores:
    """What a scoring run found: each metric's result, and what was skipped and why."""

    results: dict[str, MetricResult]
    pairs: list[Pair]
    scored: list[bool]  # per pair: read and scored
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    notes: list[str] = field(default_factory=list)
    unprompted: int = 0  # pairs without a prompt: the prompt metrics leave them out
    resized: list[str] = field(default_factory=list)  # pairs whose input and output sizes differ

    def values(self) -> dict[str, float | None]:
        return {name: r.value for name, r in self.results.items()}


def parse_metrics(text: str | Sequence[str] | None, has_prompts: bool) -> list[str]:
    """``--metrics fid,cmp,…`` → names in registry order; default: all that the pairs allow."""
    if text is None or text == "all":
        names = list(METRICS) if has_prompts else list(RECONSTRUCTION)
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
        names = [n.strip() for n in items if n.strip()]
        unknown = [n for n in names if n not in METRICS]
        if unknown or not names:
            raise UsageError(f"--metrics: unknown {', '.join(unknown) or '(empty)'}; choose "
                             f"from {', '.join(METRICS)}")
    return [n for n in METRICS if n in names]


def needed_roles(names: Sequence[str], domain: Any, options: EvalOptions) -> list[str]:
    """Every registry role the metrics need (so missing files are named at once)."""
    roles: list[str] = []
    for name in names:
        roles += [r for r in METRICS[name].roles(domain, options) if r not in roles]
    return roles


def score_pairs(pair_set: PairSet, names: Sequence[str], networks: Any, *,
                options: EvalOptions | None = None, batch_size: int = 16,
                reference: list[Path] | None = None,
                log: Callable[[str], None] = print,
                progress: Callable[[int], None] | None = None) -> Scores:
    """Score ``pair_set`` with the metrics ``names``; ``networks`` supplies the models
    (:class:`~clipinvert.evaluation.networks.Networks`).  ``reference``: FID's reference
    images (default: the pairs' inputs)."""
    options = options or EvalOptions()
    metrics: dict[str, Metric] = {}
    for name in names:
        cls = METRICS[name]
        metrics[name] = cls(options, networks, reference=reference) if name == "fid" \
            else cls(options, networks)
    pairs = pair_set.pairs
    scored = [False] * len(pairs)
    skipped = list(pair_set.skipped)
    for where, why in pair_set.skipped:
        log(f"skipped {where}: {why}")
    unprompted = sum(p.prompt is None for p in pairs)
    notes = []
    prompt_only = [n for n in names if METRICS[n].needs_prompt]
    if unprompted and prompt_only:
        notes.append(f"{unprompted} pair(s) have no prompt: {', '.join(prompt_only)} leave "
                     "them out")
    resized: list[str] = []
    for batch in _batches(pairs, batch_size, options.size, skipped, log, resized):
        for metric in metrics.values():
            metric.update(batch)
        for i in batch.index:
            scored[i] = True
        if progress:
            progress(len(batch.index))
    if resized:
        notes.append(f"{len(resized)} pair(s) have an input and output of different sizes "
                     f"(e.g. {resized[0]}): both were resized to {options.size}² to compare "
                     "them (the report lists them)")
    results = {name: m.result() for name, m in metrics.items()}
    for r in results.values():
        notes.extend(r.notes)
    for line in notes:
        log(f"note: {line}")
    return Scores(results, pairs, scored, skipped, notes, unprompted=unprompted if prompt_only
                  else 0, resized=resized)


def _batches(pairs: Sequence[Pair], batch_size: int, size: int,
             skipped: list[tuple[str, str]], log: Callable[[str], None],
             resized: list[str]) -> Iterator[Batch]:
    chunk: list[tuple[int, Pair, Image.Image, Image.Image]] = []
    # An edit folder lists each input once per prompt, one after another: read (and re-align)
    # it once for all of them.
    source_of = functools.lru_cache(maxsize=8)(read_source)
    for i, pair in enumerate(pairs):
        try:
            source, output = read_pair(pair, source_of)
        except (ClipInvertError, OSError, ValueError) as exc:
            why = first_line(exc)
            skipped.append((pair.key, why))
            log(f"skipped {pair.key}: {why}")
            continue
        if source.size != output.size:
            resized.append(f"{pair.key}: input {source.width}×{source.height}, output "
                           f"{output.width}×{output.height}")
        chunk.append((i, pair, source, output))
        if len(chunk) == batch_size:
            yield _batch(chunk, size)
            chunk = []
    if chunk:
        yield _batch(chunk, size)


def _batch(chunk: list[tuple[int, Pair, Image.Image, Image.Image]], size: int) -> Batch:
    return Batch(pairs=[c[1] for c in chunk], index=[c[0] for c in chunk],
                 inputs=imaging.to_tensor([c[2] for c in chunk], size),
                 outputs=imaging.to_tensor([c[3] for c in chunk], size),
                 output_images=[c[3] for c in chunk], input_images=[c[2] for c in chunk])


def read_source(path: Path, transform: Path | None, resize: str | None = None) -> Image.Image:
    """The image the method saw: the input squared by the run's ``resize`` policy
    (:func:`~clipinvert.imaging.fit_square`; None, unknown, leaves it as it is), or the FFHQ
    crop the run made of it (re-made from the transform it saved)."""
    source = imaging.load_image(path)
    if transform is not None:
        return realign(source, transform)
    return source if resize is None else imaging.fit_square(source, resize)


def read_pair(pair: Pair,
              source_of: Callable[[Path, Path | None, str | None], Image.Image] = read_source
              ) -> tuple[Image.Image, Image.Image]:
    """The image the method saw and the output; their shapes must agree, unless the run's
    domain is known to have stretched the input to its square (both are then compared at one
    square size, as the model saw the input)."""
    source = source_of(pair.input, pair.transform, pair.resize)
    output = imaging.load_image(pair.output)
    a, b = source.width / source.height, output.width / output.height
    stretched = pair.resize == "stretch" and pair.transform is None
    if not stretched and abs(a - b) > ASPECT_TOLERANCE * max(a, b):
        raise ValueError(f"input {source.width}×{source.height} and output "
                         f"{output.width}×{output.height} differ in shape")
    return source, output


def realign(photo: Image.Image, transform_file: Path) -> Image.Image:
    """The FFHQ crop a run made of ``photo``, from the landmarks it saved (docs/alignment.md)."""
    from ..align.ffhq import align_ffhq

    try:
        t = json.loads(Path(transform_file).read_text(encoding="utf-8"))
        landmarks = np.asarray(t["landmarks"], dtype=np.float64)
        size = int(t["output_size"])
        warp = int(t.get("transform_size", max(256, size)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot re-make the aligned input from {transform_file}: "
                         f"{first_line(exc)}") from None
    crop, _ = align_ffhq(photo, landmarks, output_size=size, transform_size=warp)
    return crop
