"""Folder-level runs: inputs → prepared crops → batched model calls → atomic outputs + report.

The contract scripts rely on (README, "Batch runs"): each input gives outputs named by its
relative path; a bad input is one line on stderr and a ``failed`` record in the JSON report while
the batch goes on; outputs that already exist are skipped (so an interrupted run resumes) unless
``overwrite``; every file appears whole or not at all.

Decoding and face alignment are CPU work and run ahead of the model, so a GPU is not left
waiting for them: face alignment (dlib, which holds the GIL) on a pool of worker processes,
plain decoding and the resize to the encoder's input on a pool of threads (PIL releases the GIL
while it decodes and resizes, and nothing is pickled between processes).  Output images are
encoded and written by a pool of writer threads behind a bounded queue (:class:`OutputWriter`).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape
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

from . import __version__, imaging, timing
from .distributed import Launch, barrier, gather, process_group
from .errors import ClipInvertError, DiskFullError, UsageError
from .fileio import full_error
from .manifest import Manifest, describe_difference, fingerprint, json_safe
from .naming import Claims, check_output_folder, output_stems, slugify, unique_slugs
from .outlock import claim_output
from .workers import worker_init

__all__ = ["Crop", "Prepared", "PrepareOptions", "Report", "RunOptions", "run_folder",
           "slugify", "unique_slugs"]

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
    # The model's input, resized by the reader (PrepareOptions.model_size): uint8 (S, S, 3)
    pixels: np.ndarray | None = None


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
    cpu_s: float = 0.0  # CPU time the reader spent on it (CLIPINVERT_TIMING's reader core-ms)


@dataclass(frozen=True)
class PrepareOptions:
    align: bool = False
    size: int = 256
    all_faces: bool = False
    detect_size: int | None = None  # long side of the face-search copy (None: full size)
    keep_original: bool = False
    predictor: Path | None = None
    resize: str = "stretch"  # the domain's policy for non-square inputs when not aligning
    # When set, readers also resize each crop to the encoder's input side (the model's own
    # transform, imaging.to_pixels), so the model's thread only stacks bytes.
    model_size: int | None = None


_DETECTOR = None  # one per worker process, created on first use


def _detector(predictor: Path | None):
    global _DETECTOR
    if _DETECTOR is None:
        from .align import FaceDetector

        _DETECTOR = FaceDetector(predictor)
    return _DETECTOR


def prepare(src: Path, rel: Path, opts: PrepareOptions) -> Prepared:
    """Decode (and align) one input; never raises for a bad input, records why instead."""
    t0 = time.thread_time()
    out = _prepare(src, rel, opts)
    if opts.model_size and out.error is None:
        for crop in out.crops:
            crop.pixels = imaging.to_pixels(crop.image, opts.model_size)
    out.cpu_s = time.thread_time() - t0
    return out


def _prepare(src: Path, rel: Path, opts: PrepareOptions) -> Prepared:
    out = Prepared(src, rel)
    try:
        image = imaging.load_image(src)
        if opts.keep_original:
            out.original = image
        if not opts.align:
            out.crops = [Crop(rel, imaging.fit_square(image, opts.resize))]
            return out
        from .align import align_image

        faces = align_image(image, _detector(opts.predictor), name=src.name,
                            output_size=opts.size, all_faces=opts.all_faces,
                            detect_size=opts.detect_size)
        multi = opts.all_faces and len(faces) > 1
        for face in faces:
            stem = rel.with_name(f"{rel.name}_face{face.index}") if multi else rel
            out.crops.append(Crop(stem, face.image, face.transform))
    except ClipInvertError as exc:
        out.error = str(exc)
    except Exception as exc:  # a worker must never take the run down with it
        out.error = f"unexpected error: {type(exc).__name__}: {exc}"
    return out


def reader_kind(opts: PrepareOptions) -> str:
    """``process`` or ``thread``: how :func:`prepared_stream`'s workers run.

    Face alignment needs processes: dlib's detector holds the GIL, so threads would run it one
    at a time.  Plain decoding (and the resize to the model's input) runs in threads: PIL
    releases the GIL for both, and a thread hands its result over without pickling a decoded
    photo between processes.  ``CLIPINVERT_READER=process`` (or ``thread``) overrides.
    """
    env = os.environ.get("CLIPINVERT_READER", "").strip().lower()
    if env in ("process", "thread"):
        return env
    if env:
        raise UsageError(f"CLIPINVERT_READER={env!r}: use process or thread")
    return "process" if opts.align else "thread"


def prepared_stream(sources: Sequence[tuple[Path, Path]], opts: PrepareOptions, workers: int,
                    window: int) -> Iterator[Prepared]:
    """``prepare`` over all sources, in order, ``window`` inputs ahead on ``workers`` processes
    or threads (:func:`reader_kind`)."""
    if workers <= 0:
        for src, rel in sources:
            yield prepare(src, rel, opts)
        return
    pool: Executor
    if reader_kind(opts) == "thread":
        pool = ThreadPoolExecutor(workers, thread_name_prefix="clipinvert-read")
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=worker_init)
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
        self.warnings: list[str] = []
        # How the user wrote each input (``photos/a.jpg``), for the lines they read; records
        # keep the absolute path scripts can open from anywhere.
        self.shown: dict[Path, str] = {}

    def name(self, src: Path) -> str:
        """``src`` as the user gave it (relative paths stay relative)."""
        return self.shown.get(Path(src), str(src))

    def warn(self, line: str) -> None:
        """A warning line on stderr (even with --quiet: it changes what the run does) that
        the report keeps too."""
        self.warnings.append(line)
        self.console.print(f"[yellow]warning[/yellow] {line}", markup=True, highlight=False,
                           soft_wrap=True)

    def _add(self, status: str, src: Path, **extra: object) -> None:
        self.records.append({"input": str(src), "status": status, **extra})

    def done(self, src: Path, outputs: Iterable[Path], **extra: object) -> None:
        self._add("done", src, outputs=[str(p) for p in outputs], **extra)

    def skipped(self, src: Path, outputs: Iterable[Path], **extra: object) -> None:
        self._add("skipped", src, outputs=[str(p) for p in outputs],
                  reason="outputs exist, made with the same settings (--overwrite redoes them)",
                  **extra)

    def failed(self, src: Path, reason: str, **extra: object) -> None:
        self._add("failed", src, reason=reason, **extra)
        # One actionable line per bad input, even in quiet mode: scripts log stderr.
        self.console.print(f"[red]failed[/red] {escape(self.name(src))}: {escape(reason)}",
                           markup=True, highlight=False, soft_wrap=True)

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
            "warnings": self.warnings,
            "inputs": self.records,
        }

    def write(self, path: Path) -> None:
        # Strict JSON (no NaN/Infinity, which many parsers reject): non-finite numbers become
        # their names.
        text = json.dumps(json_safe(self.to_dict()), indent=2, default=str, allow_nan=False)
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
class OutputWriter:
    """Encodes and writes output images on a pool of background threads, so the model computes
    the next batch meanwhile (fpng, libjxl and PIL's zlib/JPEG/WebP encoders run in C; all but
    fpng release the GIL while they do, docs/performance.md).  With no threads — the default
    on a CPU of up to 4 cores, where the model's threads need every core — it writes at once,
    in the caller's thread.  :func:`run_folder` settles each batch's writes before calling it
    done, one batch later.

    The queue is bounded: once ``queue`` writes are waiting or running, :meth:`save` waits for
    the oldest to finish (backpressure), so a model faster than its writers cannot pile up
    decoded images in memory (3 MB each at 1024 px).  Its default, four per thread, keeps every
    writer busy while the model produces the next batch.
    """

    def __init__(self, threads: int = 0, queue: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="clipinvert-write") \
            if threads > 0 else None
        self.limit = max(1, queue if queue is not None else 4 * threads)
        self._pending: list[tuple[Path, Future[None]]] = []
        self._queued: deque[Future[None]] = deque()  # submitted, maybe not finished

    @staticmethod
    def _write(image: imaging.ImageOut, path: Path, png_level: int) -> None:
        # The writer's core time for CLIPINVERT_TIMING (add() does nothing when it is off).
        t0 = time.thread_time()
        try:
            imaging.save_image(image, path, png_level=png_level)
        finally:
            timing.add("writer", time.thread_time() - t0)

    def save(self, image: imaging.ImageOut, path: Path, png_level: int) -> None:
        """Write ``image`` (PIL, or uint8 pixels maybe still arriving from the GPU) to
        ``path``: at once without threads, else queued (waiting first while the queue is
        full).  A failed write is reported by :meth:`take`'s futures, never raised here."""
        if self._pool is None:
            self._write(image, Path(path), png_level)
            return
        while self._queued and self._queued[0].done():
            self._queued.popleft()
        while len(self._queued) >= self.limit:  # backpressure: the oldest write first
            wait([self._queued.popleft()])
        future = self._pool.submit(self._write, image, Path(path), png_level)
        self._queued.append(future)
        self._pending.append((Path(path), future))

    def take(self) -> list[tuple[Path, Future[None]]]:
        """The writes started since the last call."""
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._queued.clear()


@dataclass
class RunOptions:
    output: Path
    batch_size: int | None = 4  # None: auto — run_folder's ``auto_batch``, halved on OOM
    overwrite: bool = False
    quiet: bool = False
    workers: int = 0
    report: Path | None = None
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    ext: str = "png"  # output images: one of imaging.OUTPUT_EXTENSIONS
    png_level: int = 1  # PNG encoder and level (imaging.PNG_LEVEL; no effect on pixels)
    launch: Launch = field(default_factory=Launch)  # under torchrun: this process's shard
    writer: OutputWriter = field(default_factory=OutputWriter)  # output images, maybe threaded

    def image_path(self, stem: Path | str) -> Path:
        """Where an output image of ``stem`` (relative to the output folder) goes."""
        return self.output / f"{stem}.{self.ext}"

    def save(self, image: imaging.ImageOut, path: Path) -> None:
        self.writer.save(image, path, self.png_level)

    @property
    def report_path(self) -> Path:
        return self.report or self.output / REPORT_NAME


OutputsFor = Callable[[Crop], list[Path]]
# process(crops, owners) runs the model on a batch, writes the files and returns, per crop,
# the paths it wrote.
ProcessBatch = Callable[[list[Crop], list[Prepared]], list[list[Path]]]


def run_folder(command: str, inputs: Path, opts: RunOptions, params: dict,
               outputs_for: OutputsFor, process: ProcessBatch,
               console: Console | None = None, meta: Callable[[], dict] | None = None,
               settings: dict | None = None,
               setup: Callable[[Report], None] | None = None,
               auto_batch: Callable[[], int] | None = None) -> Report:
    """Drive one command over a file or folder.

    ``outputs_for(crop)`` lists the files a crop will produce (used to skip finished work);
    ``process(crops, owners)`` runs the model on a batch, writes those files and returns them.
    ``settings`` is everything that decides the outputs' content (see :mod:`.manifest`): an
    output is skipped only when it was made with the same settings, and a folder holding
    outputs of other settings is refused (exit 2) unless ``overwrite``.  ``setup()`` (loading
    the models) runs after every check that can refuse the run, so a refusal costs nothing.
    A batch that raises is retried one image at a time (a CUDA out-of-memory at batch 16 then
    still finishes, and one image that breaks the model does not fail its batch-mates); what
    still fails is reported per input.  Only weights/usage errors end the run.  With
    ``opts.batch_size`` None (``--batch-size auto``) the batch is ``auto_batch()`` (asked once
    the models are loaded; 1 without it), and an out-of-memory error halves it for the rest of
    the run instead (one warning line; the report's ``batch_size`` says what was used).
    """
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    # Under torchrun: gloo, whatever the model's device, for the final gather of the records.
    with process_group(opts.launch, None, what=command, backend="gloo"):
        return _run_folder(command, inputs, opts, params, outputs_for, process, console, meta,
                           settings, setup, auto_batch)


def _run_folder(command: str, inputs: Path, opts: RunOptions, params: dict,
                outputs_for: OutputsFor, process: ProcessBatch, console: Console | None,
                meta: Callable[[], dict] | None, settings: dict | None,
                setup: Callable[[Report], None] | None,
                auto_batch: Callable[[], int] | None) -> Report:
    timing.since_start("start to run (imports, options)")
    launch = opts.launch
    console = console or Console(stderr=True)
    # Under torchrun only rank 0 shows progress and the summary; every rank prints its failures.
    report = Report(command, params, console, opts.quiet or not launch.is_main)
    out = opts.output
    check_output_folder(out, inputs)
    notes: list[str] = []
    sources = imaging.list_inputs(inputs, exclude=[out], notes=notes)
    for line in notes:
        report.warn(line)
    if not sources:  # a script must be able to tell that nothing was done
        raise UsageError(f"no image files found in {inputs}: nothing to do")
    given = Path(inputs)
    report.shown = {src: str(given if given.is_file() else given / rel) for src, rel in sources}
    # One writer per output folder, taken before any model loads (outlock.py); a folder this
    # run created is removed again when the run ends without writing anything into it.
    with claim_output(out, is_main=launch.is_main,
                      share=lambda verdict: gather(launch, verdict)[0],  # type: ignore[return-value]
                      note=report.warn):
        return _run_claimed(command, sources, opts, report, outputs_for, process, meta,
                            settings, setup, auto_batch)


def _run_claimed(command: str, sources: list[tuple[Path, Path]], opts: RunOptions,
                 report: Report, outputs_for: OutputsFor, process: ProcessBatch,
                 meta: Callable[[], dict] | None, settings: dict | None,
                 setup: Callable[[Report], None] | None,
                 auto_batch: Callable[[], int] | None) -> Report:
    """The run itself, once the output folder is this run's."""
    launch, out, console = opts.launch, opts.output, report.console
    prep = opts.prepare
    settings = {"command": command, **(settings or {}),
                "prepare": {"align": prep.align, "size": prep.size, "all_faces": prep.all_faces,
                            "paste_back": prep.keep_original,
                            # only when set, so that folders made before it keep their outputs
                            **({"resize": prep.resize} if prep.resize != "stretch" else {}),
                            **({"detect_size": prep.detect_size} if prep.detect_size else {})}}
    fp = fingerprint(settings)
    if not prep.align and prep.resize != "stretch":  # eval re-squares the inputs the same way
        report.meta["resize"] = prep.resize
    manifest = Manifest.load(out, part=launch.rank if launch.distributed else None)
    if not opts.overwrite and (conflicts := manifest.conflicts(fp)):
        rel, other = conflicts[0]
        diff = describe_difference(manifest.settings.get(other, {}), settings)
        raise UsageError(f"{out} already holds {len(conflicts)} output(s) made with other "
                         f"settings ({diff or 'other settings'}; e.g. {rel}): choose another -o "
                         "or pass --overwrite to replace them")

    def outs_of(stem: Path) -> list[Path]:
        return outputs_for(Crop(stem, _PLACEHOLDER))

    def finished(paths: list[Path]) -> bool:
        """Every output exists and was made with these settings: nothing to do."""
        return bool(paths) and all(p.exists() and manifest.made_with(p) == fp for p in paths)

    def foreign(paths: Iterable[Path]) -> list[Path]:
        """Existing files this run would replace that were not made with these settings."""
        return [p for p in paths if p.exists() and manifest.made_with(p) != fp]

    # Names first, for every input (so renames do not depend on what is skipped), then what
    # is already done.  Inputs whose every output exists need no decoding at all when not
    # aligning (names are known up front); with alignment the face count is only known after
    # detection, so those are checked as crops arrive.
    stems, clash_lines = output_stems([rel for _, rel in sources])
    for line in clash_lines:
        report.warn(line)
    claims = Claims(src for src, _ in sources)
    renamed: dict[Path, str] = {}
    todo: list[tuple[Path, Path]] = []
    blocking: list[Path] = []
    # Every rank names and checks every input (the same answers everywhere, so a refusal is
    # the same on all); each then takes its share, input k going to rank k mod N.
    for k, ((src, rel), stem) in enumerate(zip(sources, stems, strict=True)):
        mine = k % launch.world_size == launch.rank
        name, why = claims.claim(stem, str(src), outs_of)
        if why is not None and launch.is_main:
            report.warn(f"{report.name(src)}: output renamed to {name.as_posix()} ({why})")
        if name != rel.with_suffix(""):
            renamed[src] = name.as_posix()
        if not opts.overwrite:
            outs = outs_of(name)
            if not prep.align and finished(outs):
                if mine:
                    report.skipped(src, outs, **_named(renamed, src))
                continue
            blocking += foreign(outs)
        if mine:
            todo.append((src, name))
    if blocking:
        raise UsageError(f"{len(blocking)} output file(s) already exist that this command did "
                         f"not make with these settings (e.g. {blocking[0]}): choose another -o "
                         "or pass --overwrite to replace them")
    if setup is not None and todo:
        setup(report)
    auto = opts.batch_size is None
    batch = opts.batch_size or (auto_batch() if auto_batch is not None and todo else 1)
    report.meta["batch_size"] = {"asked": "auto" if auto else batch, "start": batch}

    pending: list[Crop] = []
    owners: list[Prepared] = []
    progress = make_progress(console, report.quiet)
    interrupted = False
    full: DiskFullError | None = None
    squash = _SquashNotes(report, prep.size)
    with progress:
        task = progress.add_task(command, total=len(todo))
        # Decoding/alignment runs ahead in worker processes; its own bar shows whether the
        # model is waiting for it or the other way round.
        prep_task = progress.add_task("align" if opts.prepare.align else "decode",
                                      total=len(todo))

        def fail(owner: Prepared, reason: str) -> None:
            if not owner.failed:
                owner.failed = True
                report.failed(owner.src, reason, **_named(renamed, owner.src))
                progress.advance(task)

        inflight: deque[tuple[list[Prepared], list[list[Path]],
                              list[tuple[Path, Future[None]]]]] = deque()

        def settle(keep: int) -> None:
            """Finish the batches whose writes are done, all but the newest ``keep``: an input
            is done when every file of it is on disk, failed when one could not be written.
            A full disk is no input's fault: the inputs whose files are all written are done,
            the others stay to do, and the run stops (DiskFullError)."""
            full: DiskFullError | None = None
            while len(inflight) > keep:
                batch_owners, written, writes = inflight.popleft()
                errors: dict[Path, BaseException] = {}
                for path, future in writes:
                    try:
                        future.result()
                    except Exception as exc:  # noqa: BLE001 - that input fails, the run goes on
                        errors[path] = full_error(exc, path) or exc
                        if isinstance(errors[path], DiskFullError):
                            full = full or errors[path]  # type: ignore[assignment]
                for owner, paths in zip(batch_owners, written, strict=True):
                    if bad := [p for p in paths if p in errors]:
                        if not isinstance(errors[bad[0]], DiskFullError):
                            fail(owner, f"cannot write {bad[0]}: {errors[bad[0]]}")
                        continue
                    owner.outputs.extend(paths)
                    owner.remaining -= 1
                    if owner.remaining == 0 and not owner.failed:
                        report.done(owner.src, owner.outputs, **_named(renamed, owner.src))
                        progress.advance(task)
            if full is not None:
                raise full

        def check_disk() -> None:
            """Stop before the next model pass when a background write already found the disk
            full: its outputs could not be written either."""
            for _, _, writes in inflight:
                for _, future in writes:
                    if future.done() and isinstance(future.exception(), DiskFullError):
                        raise future.exception()  # type: ignore[misc]

        def drain() -> None:
            """Wait for the writes of a batch that failed: each ends whole or not at all."""
            for _, pending_write in opts.writer.take():
                with contextlib.suppress(Exception):
                    pending_write.result()

        def run_batch(crops: list[Crop], batch_owners: list[Prepared]) -> None:
            nonlocal batch  # --batch-size auto: halved for the rest of the run on OOM
            # Recorded before writing: outputs appear whole or not at all, so an output that
            # exists and is recorded was finished with these settings, whatever happens next.
            check_disk()
            manifest.begin(settings)  # a full disk stops here, before the model pass
            manifest.record([p for c in crops for p in outputs_for(c)], fp)
            try:
                with timing.total("batch"):
                    written = process(crops, batch_owners)
            except ClipInvertError as exc:
                if exc.exit_code != 1 or isinstance(exc, DiskFullError):
                    drain()
                    raise  # weights/usage problems and a full disk end the run
                error: Exception = exc
            except Exception as exc:
                if (stop := full_error(exc)) is not None:
                    drain()
                    raise stop from exc  # what cannot be written stops the run, see settle
                if os.environ.get("CLIPINVERT_DEBUG"):
                    traceback.print_exc()
                error = exc
            else:
                if not report.images_done and timing.ENABLED:
                    timing.emit(f"first batch {(time.perf_counter() - started) * 1000:.1f} ms "
                                f"({len(crops)} image(s), from the first input read)")
                report.images_done += len(crops)
                inflight.append((batch_owners, written, opts.writer.take()))
                settle(keep=1)  # the previous batch's files are written by now, or failed
                return
            drain()  # a failed batch's partial writes
            if len(crops) > 1:
                _free_accelerator_memory()
                step = 1
                if auto and is_out_of_memory(error):
                    batch = step = max(1, len(crops) // 2)
                    report.warn(f"a batch of {len(crops)} ran out of memory: going on with "
                                f"batches of {batch}")
                for i in range(0, len(crops), step):
                    run_batch(crops[i:i + step], batch_owners[i:i + step])
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

        started, main_cpu = time.perf_counter(), time.thread_time()
        try:
            for item in prepared_stream(todo, opts.prepare, opts.workers,
                                        window=batch * 2):
                timing.add("reader", item.cpu_s)
                progress.advance(prep_task)
                if item.error:
                    report.failed(item.src, item.error, **_named(renamed, item.src))
                    progress.advance(task)
                    continue
                if not prep.align:
                    squash.check(item)
                crops = item.crops
                for crop in crops:  # face-suffixed names are only known now
                    if crop.rel != item.rel:
                        name, why = claims.claim(crop.rel, str(item.src), outs_of)
                        if why is not None:
                            report.warn(f"{report.name(item.src)}: output renamed to "
                                        f"{name.as_posix()} ({why})")
                        crop.rel = name
                outs = [p for c in crops for p in outputs_for(c)]
                if not opts.overwrite:
                    if finished(outs):
                        report.skipped(item.src, outs, **_named(renamed, item.src))
                        progress.advance(task)
                        continue
                    if taken := foreign(outs):
                        fail(item, f"{taken[0]} exists and was not made with these settings "
                                   "(choose another -o or pass --overwrite)")
                        continue
                item.remaining = len(crops)
                for crop in crops:
                    pending.append(crop)
                    owners.append(item)
                    if len(pending) >= batch:
                        flush()
            flush()
        except KeyboardInterrupt:
            interrupted = True
        except DiskFullError as exc:
            full = exc
        finally:
            try:
                settle(keep=0)  # writes in flight finish (whole files) before the report
            except KeyboardInterrupt:
                interrupted = True
            except DiskFullError as exc:
                full = full or exc
            opts.writer.close()
            timing.summary(report.images_done, time.thread_time() - main_cpu)
            if not launch.distributed:
                with contextlib.suppress(OSError):  # DiskFullError is one: the old file stays
                    manifest.compact()
    squash.summary()
    report.meta["batch_size"]["used"] = batch
    if meta:
        report.meta.update(meta())
    if interrupted:
        report.meta["interrupted"] = True
    mine = sum(1 for k in range(len(sources)) if k % launch.world_size == launch.rank)
    if full is not None:
        report.meta["stopped"] = "disk full"
        if not launch.distributed:  # best effort: the report may not fit either
            with contextlib.suppress(OSError):
                report.write(opts.report_path)
        raise _disk_full_stop(full, report, mine)
    if launch.distributed:
        if interrupted:  # the others are stopping too: no gather; a rerun resumes every shard
            raise KeyboardInterrupt
        _merge_ranks(report, launch, [src for src, _ in sources])
        if launch.is_main:
            with contextlib.suppress(OSError):
                Manifest.load(out).compact()  # every process is done: fold their parts
            _write_report(report, opts.report_path, len(sources))
        # torchrun ends every process as soon as one exits with an error (a bad input is
        # exit 1): nobody leaves before rank 0 has written the report.
        barrier(launch)
        if not launch.is_main:
            return report
    else:
        _write_report(report, opts.report_path, mine)
    if not opts.quiet:
        console.print(report.summary() + f" — report: {opts.report_path}", highlight=False,
                      soft_wrap=True)
    if interrupted:
        raise KeyboardInterrupt
    return report


_PLACEHOLDER = Image.new("RGB", (1, 1))  # stands for a crop when only its name matters


class _SquashNotes:
    """Warnings for inputs that are not square on a run without alignment: the model sees a
    square, so they are resized to one and their aspect ratio changes.  Silently stretched
    faces look like a bad model; one line per input says why (the first
    :attr:`LIMIT`, then one line counting the rest, so a folder of landscape photos does not
    flood the terminal)."""

    LIMIT = 5

    def __init__(self, report: Report, size: int) -> None:
        self.report, self.size, self.count = report, size, 0

    def check(self, item: Prepared) -> None:
        w, h = item.crops[0].image.size if item.crops else (0, 0)
        if w == h:
            return
        self.count += 1
        if self.count <= self.LIMIT:
            self.report.warn(f"{self.report.name(item.src)}: {w}×{h} is not square; it is "
                             f"resized to {self.size}×{self.size}, which changes its aspect "
                             "ratio (crop it square first to avoid this)")

    def summary(self) -> None:
        if self.count > self.LIMIT:
            self.report.warn(f"{self.count - self.LIMIT} more input(s) that are not square "
                             f"were resized to {self.size}×{self.size} too")


def _finished_count(report: Report) -> int:
    return report.count("done") + report.count("skipped")


def _disk_full_stop(exc: DiskFullError, report: Report, total: int) -> DiskFullError:
    """The one line a run stopped by a full disk ends with: what could not be written, how far
    it got, and that the same command finishes the rest (nothing finished is redone)."""
    return DiskFullError(f"{exc}: {_finished_count(report)} of {total} inputs done; free space "
                         "and run the same command again to finish the rest", exc.path)


def _write_report(report: Report, path: Path, total: int) -> None:
    """The report at the end of a run; a full disk here still ends as one line (every output
    is written by now: a rerun skips them all and writes the report)."""
    try:
        report.write(path)
    except DiskFullError as exc:
        raise _disk_full_stop(exc, report, total) from None


def _merge_ranks(report: Report, launch: Launch, order: list[Path]) -> None:
    """Every process's records, marked with its rank, into rank 0's report in input order (the
    gather also waits for every process to finish)."""
    for rec in report.records:
        rec["rank"] = launch.rank
    parts = gather(launch, {"records": report.records, "images_done": report.images_done,
                            "warnings": report.warnings,
                            "batch_size": report.meta.get("batch_size"),
                            "device": report.meta.get("device")})
    if not launch.is_main:
        return
    position = {str(src): k for k, src in enumerate(order)}
    records = [r for part in parts for r in part["records"]]  # type: ignore[index]
    report.records = sorted(records, key=lambda r: position.get(r["input"], len(position)))
    report.images_done = sum(part["images_done"] for part in parts)  # type: ignore[index]
    report.warnings = list(dict.fromkeys(
        w for part in parts for w in part["warnings"]))  # type: ignore[index]
    report.meta["ranks"] = [{"rank": r, "batch_size": part["batch_size"],  # type: ignore[index]
                             "device": part["device"]} for r, part in enumerate(parts)]


def _named(renamed: dict[Path, str], src: Path) -> dict[str, str]:
    """The ``output_name`` field of a record whose outputs do not use the input's own name."""
    return {"output_name": renamed[src]} if src in renamed else {}


def is_out_of_memory(error: BaseException) -> bool:
    """A device (or host) allocation failure, which a smaller batch may avoid."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_accelerator_memory() -> None:
    """Give cached CUDA blocks back before retrying a batch one image at a time."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stderr_console() -> Console:
    return Console(stderr=True, force_terminal=None if sys.stderr.isatty() else False)
