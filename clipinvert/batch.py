"""Folder-level runs: inputs → prepared crops → batched model calls → atomic outputs + report.

The contract scripts rely on (README, "Batch runs"): each input gives outputs named by its
relative path; a bad input is one line on stderr and a ``failed`` record in the JSON report while
the batch goes on; outputs that already exist are skipped (so an interrupted run resumes) unless
``overwrite``; every file appears whole or not at all.

Decoding and face alignment are CPU work and run on a pool of worker processes, ahead of the
model, so a GPU is not left waiting for them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from . import __version__, imaging
from .errors import ClipInvertError, UsageError

REPORT_NAME = "clipinvert-report.json"


# ---------------------------------------------------------------------------------------------
# Preparing inputs (runs in worker processes)
# ---------------------------------------------------------------------------------------------
@dataclass
class Crop:
    """One image the model will see, and what is needed to put the result back."""

    rel: Path  # output path stem, relative to OUT (no suffix)
    image: Image.Image
    transform: dict | None = None  # crop → source mapping when the crop was aligned


@dataclass
class Prepared:
    src: Path
    rel: Path
    crops: list[Crop] = field(default_factory=list)
    original: Image.Image | None = None  # kept only when paste-back needs it
    error: str | None = None
    outputs: list[Path] = field(default_factory=list)  # filled as its crops are processed
    remaining: int = 0  # crops not yet processed
    failed: bool = False


@dataclass(frozen=True)
class PrepareOptions:
    align: bool = False
    size: int = 256
    all_faces: bool = False
    keep_original: bool = False
    predictor: Path | None = None


_DETECTOR = None  # one per worker process, created on first use


def _detector(predictor: Path | None):
    global _DETECTOR
    if _DETECTOR is None:
        from .align import FaceDetector

        _DETECTOR = FaceDetector(predictor)
    return _DETECTOR


def prepare(src: Path, rel: Path, opts: PrepareOptions) -> Prepared:
    """Decode (and align) one input; never raises for a bad input, records why instead."""
    out = Prepared(src, rel)
    try:
        image = imaging.load_image(src)
        if opts.keep_original:
            out.original = image
        if not opts.align:
            out.crops = [Crop(rel, image)]
            return out
        from .align import align_image

        faces = align_image(image, _detector(opts.predictor), name=src.name,
                            output_size=opts.size, all_faces=opts.all_faces)
        multi = opts.all_faces and len(faces) > 1
        for face in faces:
            stem = rel.with_name(f"{rel.name}_face{face.index}") if multi else rel
            out.crops.append(Crop(stem, face.image, face.transform))
    except ClipInvertError as exc:
        out.error = str(exc)
    except Exception as exc:  # a worker must never take the run down with it
        out.error = f"unexpected error: {type(exc).__name__}: {exc}"
    return out


def prepared_stream(sources: Sequence[tuple[Path, Path]], opts: PrepareOptions, workers: int,
                    window: int) -> Iterator[Prepared]:
    """``prepare`` over all sources, in order, ``window`` inputs ahead on ``workers`` processes."""
    if workers <= 0:
        for src, rel in sources:
            yield prepare(src, rel, opts)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
    try:
        yield from _ordered(pool, sources, opts, max(window, workers))
    finally:  # on Ctrl-C or an early stop, drop queued inputs instead of finishing them
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered(pool: Executor, sources: Sequence[tuple[Path, Path]], opts: PrepareOptions,
             window: int) -> Iterator[Prepared]:
    queue: deque[Future[Prepared]] = deque()
    it = iter(sources)
    for src, rel in it:
        queue.append(pool.submit(prepare, src, rel, opts))
        if len(queue) >= window:
            break
    while queue:
        yield queue.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            queue.append(pool.submit(prepare, nxt[0], nxt[1], opts))


# ---------------------------------------------------------------------------------------------
# The run report
# ---------------------------------------------------------------------------------------------
class Report:
    """Per-input records, counts and timings; written as JSON for scripts."""

    def __init__(self, command: str, params: dict, console: Console | None = None,
                 quiet: bool = False) -> None:
        self.command, self.params = command, params
        self.records: list[dict] = []
        self.started = time.time()
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.images_done = 0
        self.meta: dict = {}

    def _add(self, status: str, src: Path, **extra: object) -> None:
        self.records.append({"input": str(src), "status": status, **extra})

    def done(self, src: Path, outputs: Iterable[Path], **extra: object) -> None:
        self._add("done", src, outputs=[str(p) for p in outputs], **extra)

    def skipped(self, src: Path, outputs: Iterable[Path]) -> None:
        self._add("skipped", src, outputs=[str(p) for p in outputs],
                  reason="outputs exist (use --overwrite to redo)")

    def failed(self, src: Path, reason: str) -> None:
        self._add("failed", src, reason=reason)
        # One actionable line per bad input, even in quiet mode: scripts log stderr.
        self.console.print(f"[red]failed[/red] {src}: {reason}", markup=True, highlight=False,
                           soft_wrap=True)

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0

    def to_dict(self) -> dict:
        elapsed = time.time() - self.started
        return {
            "tool": "clipinvert", "version": __version__, "command": self.command,
            "params": self.params, **self.meta,
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "elapsed_s": round(elapsed, 3),
            "counts": {s: self.count(s) for s in ("done", "skipped", "failed")},
            "images_per_s": round(self.images_done / elapsed, 4) if elapsed > 0 else None,
            "inputs": self.records,
        }

    def write(self, path: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        imaging.atomic_write(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))

    def summary(self) -> str:
        d = self.to_dict()
        c = d["counts"]
        rate = f", {d['images_per_s']:.2f} images/s" if self.images_done else ""
        return (f"{self.command}: {c['done']} done, {c['skipped']} skipped, {c['failed']} failed "
                f"in {d['elapsed_s']:.1f}s{rate}")


class RateColumn(ProgressColumn):
    """images/s, the figure users compare across devices and batch sizes."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} img/s" if speed else "– img/s", style="progress.data.speed")


def make_progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=quiet or not console.is_terminal, transient=False)


# ---------------------------------------------------------------------------------------------
# The generic loop
# ---------------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    output: Path
    batch_size: int = 4
    overwrite: bool = False
    quiet: bool = False
    workers: int = 0
    report: Path | None = None
    prepare: PrepareOptions = field(default_factory=PrepareOptions)

    @property
    def report_path(self) -> Path:
        return self.report or self.output / REPORT_NAME


OutputsFor = Callable[[Crop], list[Path]]
# process(crops, owners) runs the model on a batch, writes the files and returns, per crop,
# the paths it wrote.
ProcessBatch = Callable[[list[Crop], list[Prepared]], list[list[Path]]]


def run_folder(command: str, inputs: Path, opts: RunOptions, params: dict,
               outputs_for: OutputsFor, process: ProcessBatch,
               console: Console | None = None, meta: Callable[[], dict] | None = None) -> Report:
    """Drive one command over a file or folder.

    ``outputs_for(crop)`` lists the files a crop will produce (used to skip finished work);
    ``process(crops, owners)`` runs the model on a batch, writes those files and returns them.
    A batch that raises is retried one image at a time (a CUDA out-of-memory at batch 16 then
    still finishes, and one image that breaks the model does not fail its batch-mates); what
    still fails is reported per input.  Only weights/usage errors end the run.
    """
    if opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    console = console or Console(stderr=True)
    report = Report(command, params, console, opts.quiet)
    sources = imaging.list_inputs(inputs)
    if not sources:
        report.console.print(f"no image files found in {inputs}", highlight=False)
    opts.output.mkdir(parents=True, exist_ok=True)

    # Inputs whose every output exists need no decoding at all when not aligning (names are
    # known up front); with alignment the face count is only known after detection.
    todo: list[tuple[Path, Path]] = []
    for src, rel in sources:
        stem = rel.with_suffix("")
        if not opts.overwrite and not opts.prepare.align:
            outs = outputs_for(Crop(stem, Image.new("RGB", (1, 1))))
            if outs and all(p.exists() for p in outs):
                report.skipped(src, outs)
                continue
        todo.append((src, stem))

    pending: list[Crop] = []
    owners: list[Prepared] = []
    progress = make_progress(console, opts.quiet)
    interrupted = False
    with progress:
        task = progress.add_task(command, total=len(todo))
        # Decoding/alignment runs ahead in worker processes; its own bar shows whether the
        # model is waiting for it or the other way round.
        prep_task = progress.add_task("align" if opts.prepare.align else "decode",
                                      total=len(todo))

        def fail(owner: Prepared, reason: str) -> None:
            if not owner.failed:
                owner.failed = True
                report.failed(owner.src, reason)
                progress.advance(task)

        def run_batch(crops: list[Crop], batch_owners: list[Prepared]) -> None:
            try:
                written = process(crops, batch_owners)
            except ClipInvertError as exc:
                if exc.exit_code != 1:
                    raise  # weights/usage problems end the run
                error: Exception = exc
            except Exception as exc:
                if os.environ.get("CLIPINVERT_DEBUG"):
                    traceback.print_exc()
                error = exc
            else:
                report.images_done += len(crops)
                for owner, paths in zip(batch_owners, written, strict=True):
                    owner.outputs.extend(paths)
                    owner.remaining -= 1
                    if owner.remaining == 0 and not owner.failed:
                        report.done(owner.src, owner.outputs)
                        progress.advance(task)
                return
            if len(crops) > 1:
                _free_accelerator_memory()
                for crop, owner in zip(crops, batch_owners, strict=True):
                    run_batch([crop], [owner])
                return
            text = str(error).splitlines()[0] if str(error) else ""
            reason = str(error) if isinstance(error, ClipInvertError) else \
                f"processing failed ({type(error).__name__}: {text})"
            fail(batch_owners[0], reason)

        def flush() -> None:
            if pending:
                run_batch(list(pending), list(owners))
            pending.clear()
            owners.clear()

        try:
            for item in prepared_stream(todo, opts.prepare, opts.workers,
                                        window=opts.batch_size * 2):
                progress.advance(prep_task)
                if item.error:
                    report.failed(item.src, item.error)
                    progress.advance(task)
                    continue
                crops = item.crops
                if not opts.overwrite:
                    outs = [p for c in crops for p in outputs_for(c)]
                    if outs and all(p.exists() for p in outs):
                        report.skipped(item.src, outs)
                        progress.advance(task)
                        continue
                item.remaining = len(crops)
                for crop in crops:
                    pending.append(crop)
                    owners.append(item)
                    if len(pending) >= opts.batch_size:
                        flush()
            flush()
        except KeyboardInterrupt:
            interrupted = True
    if meta:
        report.meta.update(meta())
    if interrupted:
        report.meta["interrupted"] = True
    report.write(opts.report_path)
    if not opts.quiet:
        console.print(report.summary() + f" — report: {opts.report_path}", highlight=False,
                      soft_wrap=True)
    if interrupted:
        raise KeyboardInterrupt
    return report


# ---------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------
def _free_accelerator_memory() -> None:
    """Give cached CUDA blocks back before retrying a batch one image at a time."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def slugify(text: str, max_len: int = 60) -> str:
    """Readable folder name for a prompt: 'She has wavy hair!' → 'she-has-wavy-hair'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"


def unique_slugs(texts: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i, t in enumerate(texts):
        s = slugify(t)
        if s in out:
            s = f"{s}-{i + 1}"
        out.append(s)
    return out


def stderr_console() -> Console:
    return Console(stderr=True, force_terminal=None if sys.stderr.isatty() else False)
