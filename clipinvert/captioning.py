"""``clipinvert caption``: captions for a data set that has none, from CLIP zero-shot labels.

AFHQ-Cats ships without captions; the paper made them "with the approach of Nie et al. with
CLIP".  Here CLIP labels each image zero-shot over the groups of a vocabulary
(:mod:`clipinvert.vocabulary`): for every group the image is compared with each class's prompt
(:func:`~clipinvert.evaluation.protocol.zero_shot_probabilities`, the very rule AMA judges edits
with), and the top class is kept when its probability reaches the group's threshold.  The kept
labels become sentences (:meth:`~clipinvert.vocabulary.Vocabulary.sentences`).

Three files come out, none of them inside the data folder (which may be read-only):

* the captions manifest (``-o``): ``{"image", "captions"}`` lines, the ``jsonl`` layout
  ``clipinvert train --data`` reads (:mod:`clipinvert.training.data`), image paths relative to
  the manifest's folder as that reader resolves them.  Images that have captions of their own
  (a ``<image>.txt`` beside them, or a layout with captions: CUB's ``text_c10``, a
  ``captions.jsonl``) are not labelled: their own captions are copied in, so the manifest
  covers the whole folder;
* the labels (``--labels``): ``{"image", "attributes", "scores"}`` lines, attributes named
  ``group:class`` — the JSONL ``clipinvert eval benchmark --data`` reads;
* the run report (``--report``): counts, failures, and the label distribution (per class).

CLIP sees each image through its own preprocessing (shorter side resized, centre crop:
:class:`~clipinvert.losses.ClipImageInput` ``"clip"`` mode via
:class:`~clipinvert.evaluation.networks.Networks`), so non-square photos are labelled on their
centre square, as CLIP itself would.

Resuming: after every batch the three files are rewritten atomically (each whole or not at
all); a run started again skips the images its labels file already holds.  The report records
the settings' fingerprint; outputs made with other settings (another vocabulary, another CLIP)
are refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.table import Table

from .batch import Prepared, PrepareOptions, Report, make_progress, prepared_stream
from .errors import UsageError
from .evaluation.protocol import zero_shot_probabilities
from .fileio import TEMP_PATTERN, atomic_write_text
from .imaging import list_inputs
from .manifest import describe_difference, fingerprint
from .outlock import OutputLock, create_folder
from .vocabulary import Vocabulary

if TYPE_CHECKING:
    import torch
    from PIL import Image

COMMAND = "caption"
UNLABELLED = "(none)"  # the distribution's entry for images no class of a group reached


class ZeroShotEncoder(Protocol):
    """What labelling needs of CLIP: unit embeddings (``Networks`` of the evaluation)."""

    def text_embeddings(self, texts: list[str]) -> torch.Tensor: ...

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


@dataclass(frozen=True)
class CaptionOutputs:
    """Where a run writes: the captions manifest, the labels, the JSON report."""

    captions: Path
    labels: Path
    report: Path

    @classmethod
    def beside(cls, captions: Path, labels: Path | None = None,
               report: Path | None = None) -> CaptionOutputs:
        """Defaults beside the captions: ``<stem>-labels.jsonl``, ``<stem>-report.json``."""
        captions = Path(captions)
        stem = captions.with_suffix("")
        return cls(captions, Path(labels) if labels else Path(f"{stem}-labels.jsonl"),
                   Path(report) if report else Path(f"{stem}-report.json"))


@dataclass
class CaptionRun:
    """What a run did: its report (counts, failures, distribution) and its outputs."""

    report: Report
    outputs: CaptionOutputs
    distribution: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


# ---- labelling --------------------------------------------------------------------------------
def zero_shot_scores(encoder: ZeroShotEncoder, vocabulary: Vocabulary,
                     images: Sequence[Image.Image]) -> list[dict[str, tuple[str, float]]]:
    """Per image, per group: the class CLIP prefers and its probability among the group's
    classes."""
    embeddings = encoder.image_embeddings(images)
    out: list[dict[str, tuple[str, float]]] = [{} for _ in images]
    for group in vocabulary.groups:
        probs = zero_shot_probabilities(embeddings, encoder.text_embeddings(group.prompts()))
        best_p, best = probs.max(dim=-1)
        for row, (p, i) in enumerate(zip(best_p.tolist(), best.tolist(), strict=True)):
            out[row][group.name] = (group.classes[i], float(p))
    return out


def chosen_labels(vocabulary: Vocabulary, scores: Mapping[str, tuple[str, float]]
                  ) -> dict[str, str]:
    """group → class of the groups whose top class reached the group's threshold."""
    return {g.name: scores[g.name][0] for g in vocabulary.groups
            if g.name in scores and scores[g.name][1] >= g.threshold}


def distribution(vocabulary: Vocabulary, records: Iterable[Mapping[str, Any]]
                 ) -> dict[str, dict[str, int]]:
    """Images per class of every group (``(none)``: no class reached the threshold)."""
    counts = {g.name: {**{c: 0 for c in g.classes}, UNLABELLED: 0} for g in vocabulary.groups}
    for rec in records:
        names = set(rec.get("attributes", ()))
        for g in vocabulary.groups:
            hit = next((c for c in g.classes if f"{g.name}:{c}" in names), UNLABELLED)
            counts[g.name][hit] += 1
    return counts


def print_distribution(counts: Mapping[str, Mapping[str, int]], console: Console) -> None:
    """The label distribution as a table (stderr): what a vocabulary's thresholds did."""
    table = Table(title="labels per class", title_justify="left")
    for name, justify in (("group", "left"), ("class", "left"), ("images", "right"),
                          ("share", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for group, classes in counts.items():
        total = sum(classes.values())
        for i, (cls, n) in enumerate(classes.items()):
            share = f"{100 * n / total:.1f} %" if total else "–"
            table.add_row(group if i == 0 else "", cls, str(n), share)
        table.add_section()
    console.print(table)


# ---- files ------------------------------------------------------------------------------------
def own_captions(data: Path) -> dict[str, list[str]]:
    """Images of ``data`` that already have captions (absolute path → captions), as
    ``clipinvert train`` would find them (:class:`~clipinvert.training.data.ImageCaptionDataset`:
    sidecar ``.txt`` files, CUB / CelebA caption folders, a ``captions.jsonl``); none when the
    folder has no caption layout."""
    from .training.data import ImageCaptionDataset

    if not Path(data).is_dir():
        return {}
    try:
        found = ImageCaptionDataset(data, check_images=False, min_samples=1)
    except UsageError:  # no layout with captions (AFHQ), or none of its images has any
        return {}
    return {_key(s.path): list(s.captions) for s in found.samples}


def _key(path: Path | str) -> str:
    """An image's identity across runs: its absolute, normalised path."""
    return os.path.abspath(path)


def _entry(image: str, manifest: Path) -> str:
    """``image`` as a manifest line names it: relative to the manifest's folder (how the
    ``jsonl`` readers resolve it), absolute where no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(image, _key(manifest.parent))).as_posix()
    except ValueError:
        return image


def _read_records(path: Path, report: Report) -> dict[str, dict[str, Any]]:
    """This command's earlier JSONL output, keyed by image; a line it cannot use is dropped
    with a warning (it is written again if its image is labelled again)."""
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} to resume ({exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = rec["image"]
            if not isinstance(image, str):
                raise TypeError("image is not a path")
        except (ValueError, KeyError, TypeError) as exc:
            report.warn(f"{path} line {number}: dropped ({exc})")
            continue
        out[_key(path.parent / image)] = rec
    return out


def _write_records(path: Path, records: Mapping[str, Mapping[str, Any]]) -> None:
    lines = [json.dumps(records[k], ensure_ascii=False) + "\n" for k in sorted(records)]
    atomic_write_text(path, "".join(lines))


def check_outputs(data: Path, outputs: CaptionOutputs) -> None:
    """Usage errors found before anything is loaded: JSONL names, distinct files, and none of
    them inside the data folder (it may be read-only, and a caption file there would be read
    as part of the data set by the next scan)."""
    for what, path in (("-o", outputs.captions), ("--labels", outputs.labels)):
        if path.suffix.lower() != ".jsonl":
            raise UsageError(f"{what} {path}: must be a .jsonl file (train and eval benchmark "
                             "read manifests by that suffix)")
    paths = [outputs.captions, outputs.labels, outputs.report]
    if len({_key(p) for p in paths}) < len(paths):
        raise UsageError("-o, --labels and --report must be three different files")
    for path in paths:
        if path.is_dir():
            raise UsageError(f"{path}: is a folder; give a file name")
    if Path(data).is_dir():
        root = Path(data).resolve()
        for path in paths:
            if path.resolve().is_relative_to(root):
                raise UsageError(f"{path} is inside the data folder {data}: write the captions "
                                 "elsewhere (the data folder is only read)")


def _check_settings(outputs: CaptionOutputs, settings: dict[str, Any], fp: str,
                    overwrite: bool) -> None:
    """Outputs already there are resumed only when the report says this run's settings made
    them; files this command did not make are never merged into."""
    if overwrite:
        return
    present = [p for p in (outputs.captions, outputs.labels) if p.exists()]
    if not present:
        return
    try:
        old = json.loads(outputs.report.read_text(encoding="utf-8"))
        made = old["caption"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{present[0]} exists and was not made by clipinvert caption (no "
                         f"report at {outputs.report}): choose another -o or pass "
                         "--overwrite") from None
    if made.get("fingerprint") != fp:
        diff = describe_difference(made.get("settings", {}), settings)
        raise UsageError(f"{present[0]} was made with other settings ({diff or 'unknown'}): "
                         "choose another -o or pass --overwrite to start afresh")


# ---- the run ----------------------------------------------------------------------------------
def caption_folder(data: Path, outputs: CaptionOutputs, vocabulary: Vocabulary,
                   encoder: Callable[[], ZeroShotEncoder], *, batch_size: int = 32,
                   workers: int = 0, overwrite: bool = False, quiet: bool = False,
                   params: dict[str, Any] | None = None,
                   settings: Mapping[str, Any] | None = None,
                   console: Console | None = None) -> CaptionRun:
    """Label and caption every image of ``data`` (a folder, searched recursively, or one image).

    ``encoder()`` gives CLIP (called once, only when some image needs labelling, so refusals
    and a finished run load nothing).  ``settings`` is what else decides the labels (the CLIP
    files); with ``vocabulary`` it makes the fingerprint a resumed run must match.  A bad image
    is one ``failed`` line and a record; the run goes on (exit code 1 at the end).
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    data = Path(data)
    check_outputs(data, outputs)
    console = console or Console(stderr=True)
    report = Report(COMMAND, params or {}, console, quiet)
    notes: list[str] = []
    sources = list_inputs(data, notes=notes)
    for line in notes:
        report.warn(line)
    if not sources:
        raise UsageError(f"no image files found in {data}: nothing to do")
    report.shown = {src: str(data if data.is_file() else data / rel) for src, rel in sources}
    decided = {"vocabulary": vocabulary.settings(), **(settings or {})}
    fp = fingerprint(decided)
    _check_settings(outputs, decided, fp, overwrite)
    own = own_captions(data)
    with _held(outputs, report):
        run = CaptionRun(report, outputs)
        report.meta["caption"] = {"fingerprint": fp, "settings": decided,
                                  "captions": str(outputs.captions),
                                  "labels": str(outputs.labels)}
        report.write(outputs.report)  # first: a stopped run's files are known to be ours
        captions = {} if overwrite else _read_records(outputs.captions, report)
        labels = {} if overwrite else _read_records(outputs.labels, report)
        todo: list[tuple[Path, Path]] = []
        for src, rel in sources:
            key = _key(src)
            if key in own:
                captions[key] = {"image": _entry(key, outputs.captions), "captions": own[key]}
                report.records.append({"input": str(src), "status": "skipped",
                                       "reason": "has captions of its own (copied)"})
            elif key in labels:
                report.records.append({"input": str(src), "status": "skipped",
                                       "reason": f"already labelled in {outputs.labels}"})
            else:
                todo.append((src, rel))

        def save() -> None:
            _write_records(outputs.captions, captions)
            _write_records(outputs.labels, labels)
            run.distribution = distribution(vocabulary, labels.values())
            report.meta["caption"]["distribution"] = run.distribution
            report.meta["caption"]["labelled_images"] = len(labels)
            report.write(outputs.report)

        if todo:
            clip = encoder()
            progress = make_progress(console, quiet)
            with progress:
                task = progress.add_task(COMMAND, total=len(todo))
                for batch in _batches(prepared_stream(todo, PrepareOptions(), workers,
                                                      2 * batch_size), batch_size):
                    good = [p for p in batch if p.error is None]
                    for p in batch:
                        if p.error is not None:
                            report.failed(p.src, p.error)
                    images = [p.crops[0].image for p in good]
                    for p, scores in zip(good, zero_shot_scores(clip, vocabulary, images) if
                                         images else [], strict=True):
                        _record(p, scores, vocabulary, outputs, captions, labels, report)
                    report.images_done += len(good)
                    save()  # every batch: a stop loses at most the batch in flight
                    progress.advance(task, len(batch))
        save()
        bare = sum(1 for key, rec in labels.items() if not rec["attributes"])
        if bare:  # train skips an image without captions: say so, and what to change
            report.warn(f"{bare} labelled image(s) reached no threshold of the vocabulary: no "
                        "captions for them (see the distribution; lower the thresholds in "
                        f"{vocabulary.source or 'the vocabulary'})")
        if not quiet:
            print_distribution(run.distribution, console)
            console.print(report.summary() + f" — report: {outputs.report}", highlight=False)
        return run


@contextlib.contextmanager
def _held(outputs: CaptionOutputs, report: Report) -> Iterator[None]:
    """The captions' folder locked for this run (two runs rewriting one manifest would each
    drop the other's batches), and the temporary files a killed run left beside the outputs
    removed.  Not :func:`~clipinvert.outlock.claim_output`: that cleans its folder recursively,
    and the folder of ``-o captions.jsonl`` may be any working folder, the home folder included.
    """
    folder = outputs.captions.parent
    create_folder(folder)
    lock = OutputLock(folder)
    try:
        took = lock.acquire()
    except OSError as exc:
        raise UsageError(f"-o {outputs.captions}: cannot create the lock file in {folder} "
                         f"({exc.strerror or exc})") from None
    if took:
        report.warn(took)
    try:
        for path in (outputs.captions, outputs.labels, outputs.report):
            for leftover in path.parent.glob(f".{glob.escape(path.name[:120])}.*.partial*"):
                if TEMP_PATTERN.match(leftover.name):
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
        yield
    finally:
        lock.release()


def _batches(items: Iterable[Prepared], size: int) -> Iterable[list[Prepared]]:
    batch: list[Prepared] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(p: Prepared, scores: Mapping[str, tuple[str, float]], vocabulary: Vocabulary,
            outputs: CaptionOutputs, captions: dict[str, Any], labels: dict[str, Any],
            report: Report) -> None:
    """One labelled image into the labels, its sentences into the captions (an image no class
    reached gets a labels line with no attribute, and no captions line: train would skip it)."""
    key = _key(p.src)
    chosen = chosen_labels(vocabulary, scores)
    attributes = [f"{g}:{c}" for g, c in chosen.items()]
    labels[key] = {"image": _entry(key, outputs.labels), "attributes": attributes,
                   "scores": {g: {"class": c, "p": round(pr, 4)} for g, (c, pr) in
                              scores.items()}}
    sentences = vocabulary.sentences(chosen, p.rel.as_posix())
    if sentences:
        captions[key] = {"image": _entry(key, outputs.captions), "captions": sentences}
    else:
        captions.pop(key, None)
    report.done(p.src, [outputs.captions, outputs.labels], attributes=attributes)


def clip_encoder(registry: Any, domain: str, *, device: str, trust: bool = False
                 ) -> Callable[[], ZeroShotEncoder]:
    """The domain's CLIP (registry role ``clip``) as the evaluation's zero-shot networks, found
    (and with ``--download`` fetched) only when called."""
    def load() -> ZeroShotEncoder:
        from .evaluation.networks import Networks

        dom = registry.domain(domain)
        return Networks({"clip": registry.locate(dom, "clip")}, dom, device=device, trust=trust)
    return load
