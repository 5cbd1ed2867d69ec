"""What `clipinvert eval metrics` scores: (input, output, prompt) triples.

(docs/evaluation.md#pairs)

Two sources:

* a JSONL manifest, one ``{"input": path, "output": path, "prompt": text}`` per line, with an
  optional ``"attributes": [...]`` (the AMA labels the edit aims at; one name for AMA-single,
  two or more for AMA-multiple).  Relative paths are relative to the manifest's folder, so a
  manifest travels with its images.  ``"prompt"`` may be absent or null for reconstructions
  (``clipinvert invert`` outputs): those pairs get only the reconstruction metrics.
* the folder ``clipinvert edit`` (or ``invert``) wrote: its ``clipinvert-report.json`` says which
  input made which output under which prompt.  When that run aligned faces itself, the input
  the edit really saw is the FFHQ crop; it is re-made from the landmarks the run saved beside
  each output (``<stem>.json``), exactly as the run made it.  When its domain squared
  non-square inputs by a ``resize`` policy other than ``stretch``, the report says which, and
  the input is squared the same way before it is scored.

A line that cannot be used (bad JSON, no input or output, an empty prompt) is one note naming
the line, skipped and counted; nothing is silently dropped.  Images themselves are read later,
when scored, and an unreadable one is skipped and counted there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

REPORT_NAME = "clipinvert-report.json"


@dataclass(frozen=True)
class Pair:
    """One scored edit: the image the method saw, what it made, and what it was asked."""

    input: Path
    output: Path
    prompt: str | None = None
    attributes: tuple[str, ...] = ()
    transform: Path | None = None  # the run's FFHQ transform: re-crop ``input`` with it
    # How the run's domain squared ``input`` (imaging.fit_square); None when unknown (a
    # manifest of another method's outputs): then shapes must agree to be compared.
    resize: str | None = None

    @property
    def key(self) -> str:
        """Names the pair in reports and notes."""
        return f"{self.output}"


@dataclass
class PairSet:
    pairs: list[Pair]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def __len__(self) -> int:
        return len(self.pairs)


def read_pairs(source: Path | str) -> PairSet:
    """The pairs of a manifest (``.jsonl``) or of an output folder of ``clipinvert edit``."""
    source = Path(source)
    if source.is_dir():
        if (source / REPORT_NAME).is_file():
            return pairs_from_report(source / REPORT_NAME)
        raise UsageError(f"{source} holds no {REPORT_NAME}: give the folder `clipinvert edit` "
                         "wrote, or a JSONL manifest of input/output/prompt lines")
    if not source.is_file():
        raise UsageError(f"pairs not found: {source}")
    if source.name == REPORT_NAME or source.suffix == ".json":
        return pairs_from_report(source)
    return pairs_from_manifest(source)


def pairs_from_manifest(path: Path) -> PairSet:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the manifest {path}: {exc}") from None
    base = path.parent
    result = PairSet([], str(path))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            result.skipped.append((where, f"not JSON ({exc.msg})"))
            continue
        problem = _check_record(rec)
        if problem:
            result.skipped.append((where, problem))
            continue
        prompt = rec.get("prompt")
        result.pairs.append(Pair(
            input=_resolve(base, rec["input"]), output=_resolve(base, rec["output"]),
            prompt=prompt.strip() if isinstance(prompt, str) else None,
            attributes=tuple(rec.get("attributes") or ())))
    if not result.pairs:
        raise UsageError(f"the manifest {path} holds no usable line"
                         + (f" ({len(result.skipped)} skipped: {result.skipped[0][1]}, …)"
                            if result.skipped else ""))
    return result


def _check_record(rec: object) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key in ("input", "output"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            return f"no {key!r} path"
    prompt = rec.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        return "an empty 'prompt' (leave it out for a reconstruction)"
    attributes = rec.get("attributes")
    if attributes is not None and (not isinstance(attributes, list) or not all(
            isinstance(a, str) and a for a in attributes)):
        return "'attributes' must be a list of attribute names"
    if attributes and prompt is None:
        return "'attributes' without a 'prompt'"
    return None


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def manifest_path(target: Path, base: Path) -> str:
    """How a manifest (or any file of ``base``'s folder that names images) writes ``target``,
    so that :func:`_resolve` finds it again wherever the command was started: relative to
    ``base`` when it lies inside it, so that the folder can move with its images, else
    absolute.  Both sides of the rule live here (docs/evaluation.md#pairs)."""
    target, base = Path(os.path.abspath(target)), Path(os.path.abspath(base))
    return target.relative_to(base).as_posix() if target.is_relative_to(base) else str(target)


def pairs_from_report(path: Path) -> PairSet:
    """Pairs from an ``edit``/``invert`` run's report: each done (or already done) input with
    each of its images, matched to the prompts by the folder the run gave each prompt."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        command = report["command"]
        records = report["inputs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read the run report {path}: {exc}") from None
    if command not in ("edit", "invert"):
        raise UsageError(f"{path} is a report of `clipinvert {command}`; eval scores the "
                         "outputs of edit or invert")
    conditions = list(report.get("conditions", [])) if command == "edit" else []
    resize = str(report.get("resize", "stretch"))  # absent: the run stretched (or aligned)
    out = Path(report.get("params", {}).get("output") or path.parent)
    single = len(conditions) <= 1
    result = PairSet([], str(path))
    for rec in records:
        if rec.get("status") not in ("done", "skipped"):
            reason = rec.get("reason") or rec.get("status")
            result.skipped.append((str(rec.get("input")), f"the run did not finish it ({reason})"))
            continue
        outputs = [Path(p) for p in rec.get("outputs", [])]
        transforms = {p.with_suffix("") for p in outputs if p.suffix == ".json"}
        for image in outputs:
            if image.suffix.lower() not in (".png", ".jpg", ".webp"):  # `--ext`; not .pt/.json
                continue
            rel = _relative(image, out)
            if rel is None or rel.parts[0] == "compare":
                continue
            # where the file is now: the report's folder, wherever the run was started from
            # and wherever the folder has moved since
            here = path.parent / rel
            prompt: str | None = None
            if command == "edit":
                if not single:
                    cond = next((c for c in conditions if c.get("slug") == rel.parts[0]), None)
                    rel = Path(*rel.parts[1:])
                else:
                    cond = conditions[0] if conditions else None
                prompt = cond["condition"] if cond and cond.get("tokens") is not None else None
                if prompt is None:
                    result.skipped.append((str(image), "made from a reference image, not a "
                                           "prompt"))
                    continue
            sidecar = (out / rel).with_suffix("")  # one transform per input, whatever prompt
            result.pairs.append(Pair(
                input=Path(rec["input"]), output=here, prompt=prompt,
                transform=(path.parent / rel).with_suffix(".json") if sidecar in transforms
                else None, resize=resize))
    if not result.pairs:
        raise UsageError(f"the run report {path} lists no finished output to score")
    return result


def _relative(image: Path, out: Path) -> Path | None:
    try:
        return image.relative_to(out)
    except ValueError:
        return None
