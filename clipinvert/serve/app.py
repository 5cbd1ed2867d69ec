"""The request → Editor layer of ``clipinvert serve``: no gradio here, so it is tested alone.

Why it runs the CLI's own jobs instead of calling :class:`~clipinvert.pipeline.Editor`
directly: the page promises the same pixels as ``clipinvert edit`` on the same file and
options, and the surest way to keep that promise is to share every step — decoding
(:func:`~clipinvert.imaging.load_image`), face alignment and paste-back (``batch.prepare``),
batching, the uint8 conversion and the PNG writer.  A request therefore becomes a one-file run
of :func:`~clipinvert.jobs.run_edit` (or :func:`~clipinvert.jobs.run_interpolate`) on a folder
of its own under this service's temporary root; the result PNGs are then written again with
their settings as PNG text (the pixels untouched), and the folder goes when later requests
push it out of the :attr:`Service.keep` most recent, or when the service closes.

Several users: :meth:`Service.edit` may be called from many threads at once (the page runs
up to :data:`MAX_BATCH` edit requests at a time).  The requests that wait while the model is
busy run next *together* (:meth:`Service.edit_many`): each photo is decoded and aligned by the
CLI's own ``batch.prepare``, the crops of all of them go through the encoder in the CLI's batch
size, and their edits — each crop with its own request's prompt embeddings — go through the
model together, grouped by strength (the model takes one strength a call); then each request's
paste-back, uint8 conversion, strip and PNGs are the CLI's functions again.  A request alone
is the one-file run above.  Why the difference matters: a batch's composition can change a
result's last bits (the encoder's convolutions are not batch-invariant, even on the CPU), so
only a request alone is promised the CLI's exact pixels; one batched with others is within
one grey level of them (measured: docs/serve.md#several-users).

Safety, since this is a server: an upload is bytes, never a path the client chose; it is
written under a fixed name in the request's folder, capped in bytes and in pixels, and decoded
by the CLI's guarded decoder (its one-line errors become the page's message).  Prompts are
capped in number and length, steps and frame rates in range.  One :class:`Service` holds one
Editor (one copy of the weights) and runs one batch (or one animation) at a time: a lock.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import shlex
import shutil
import sys
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

from .. import __version__, imaging
from ..errors import EXIT_USAGE, ClipInvertError, InputError, WeightsError
from ..fileio import atomic_write
from ..naming import RESERVED_FOLDERS, slugify

if TYPE_CHECKING:  # for annotations only: the job modules are imported where used
    import torch

    from ..batch import Prepared, Report, RunOptions
    from ..jobs import EditCondition

__all__ = ["AnimateRequest", "EditRequest", "Limits", "ModelStatus", "Outcome",
           "RequestError", "ResultFile", "Service", "Upload", "read_settings"]

#: PNG text key holding a result's settings as JSON (:func:`read_settings` reads it back).
SETTINGS_KEY = "clipinvert"
#: At most this many edit requests run together (one batch).  Their crops still go through
#: the model in the CLI's batch size (``--batch-size auto``: 4 on the CPU, at most 8 on a GPU),
#: so a larger number would not make a model call bigger, only make the last user of a batch
#: wait for more strangers' uploads to be decoded and written.
MAX_BATCH = 8
ANIMATION_FORMATS = ("gif", "mp4", "webp")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.  Bytes and pixels bound the memory an upload can cost
    (a 40 MP photo decodes to 120 MB of RGB); prompts bound the CLIP and edit passes."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_prompts: int = 8
    max_prompt_chars: int = 300  # CLIP reads 77 tokens anyway (longer prompts get a warning)
    max_steps: int = 32
    max_fps: float = 30.0


class RequestError(ClipInvertError):
    """A request that cannot be done, said in one line for the page (the server goes on)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Upload:
    """A file the browser sent: its name (only its suffix and a slug of its stem are used,
    never as a path) and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class EditRequest:
    """The page's edit form: what ``clipinvert edit PHOTO PROMPT...`` takes."""

    photo: Upload | None
    prompts: str = ""  # one prompt per line; blank lines and '#' lines are ignored
    reference: Upload | None = None
    strength: float = 1.0
    paste_back: bool = False
    all_faces: bool = False
    aligned: bool = False  # the photo is already an aligned crop (the CLI's --aligned)


@dataclass(frozen=True)
class AnimateRequest(EditRequest):
    """The animation form: what ``clipinvert interpolate`` takes (one condition)."""

    steps: int = 8
    fps: float = 8.0
    formats: tuple[str, ...] = ("gif",)
    boomerang: bool = False


@dataclass(frozen=True)
class ResultFile:
    path: Path
    label: str


@dataclass
class Outcome:
    """What a request made: ``results`` (edited PNGs carrying their settings, or the frames of
    an animation), ``strips`` (input | inversion | edits, or the frames side by side),
    ``animations`` (GIF/MP4/WebP), the warnings the CLI would print, and the CLI command line
    that gives the same pixels."""

    results: list[ResultFile] = field(default_factory=list)
    strips: list[Path] = field(default_factory=list)
    animations: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelStatus:
    """The domain and its files as the page shows them; ``problem`` names what is missing and
    the command that gets it (the registry's own message)."""

    domain: str
    label: str | None
    align: str
    resolution: int
    device: str
    files: dict[str, Path | None]
    problem: str | None = None


def read_settings(path: Path) -> dict:
    """The settings a result PNG carries (its ``clipinvert`` text chunk), or ``{}``."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}).get(SETTINGS_KEY)
    return json.loads(text) if text else {}


def file_size(n: int) -> str:
    """``n`` bytes for a message: 3.0 kB, 20.0 MB."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1000:.1f} kB"


def _suffix(name: str) -> str:
    """The upload's suffix when it is a plain one (``.jpg``), else none: it only words the
    decoder's errors (a ``.heic`` is refused by name), it is never trusted as a format."""
    suffix = Path(name.replace("\\", "/")).suffix.lower()
    return suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() else ""


@dataclass
class _Ticket:
    """An edit request waiting for a batch, and what became of it."""

    request: EditRequest
    result: Outcome | Exception | None = None
    done: bool = False


@dataclass
class _Job:
    """One request of a batch between its decoding and its files: what ``run_edit`` keeps in
    its closures for one input (the options, the prepared crops, the embeddings, the report
    collecting its warnings) and the images the batch's model pass made for it."""

    request: EditRequest
    folder: Path
    photo: Path
    conditions: list[EditCondition]
    opts: RunOptions
    item: Prepared  # the decoded (aligned) crops
    report: Report  # its warnings
    embeddings: list[torch.Tensor]  # per condition
    inversions: list[Image.Image] = field(default_factory=list)  # per crop
    edits: list[list[Image.Image]] = field(default_factory=list)  # per crop, per condition


class Service:
    """One editor behind a page.  Thread-safe: edit requests that wait together run together
    (:meth:`edit`), one batch or animation at a time.

    ``models`` (the ``--models`` file, if any) only goes into the equivalent command lines the
    results carry.  ``root``: where the temporary folder is made (default: the system's).
    ``max_batch``: at most this many edit requests a batch.
    """

    def __init__(self, editor, *, limits: Limits | None = None, models: Path | None = None,
                 landmarks: Path | None = None, keep: int = 8, root: Path | None = None,
                 max_batch: int = MAX_BATCH) -> None:
        self.editor = editor
        self.limits = limits or Limits()
        self.models = models
        self.landmarks = landmarks
        self.keep = max(1, keep)
        self.max_batch = max(1, max_batch)
        self.root = Path(tempfile.mkdtemp(prefix="clipinvert-serve-", dir=root))
        #: How many requests each of the last batches held (newest last): what shows that
        #: requests of several users ran together (the tests read it).
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._lock = threading.Lock()  # the model: one batch or animation at a time
        self._waiting: deque[_Ticket] = deque()
        self._waiting_lock = threading.Lock()
        self._recent: deque[Path] = deque()
        self._previous: set[Path] = set()  # the folders of the last batch (see _new_folders)
        self._numbers = itertools.count(1)

    # ---- what the page shows before any request ------------------------------------------
    def status(self) -> ModelStatus:
        """The domain's files for the page, found without loading or downloading anything."""
        ed = self.editor
        registry = copy.copy(ed.registry)  # looking must not download, even with --download
        registry.download, registry.offline = False, True
        files: dict[str, Path | None] = {}
        for role in ed.roles(edit=True):
            try:
                files[role] = registry.locate(ed.domain, role)
            except WeightsError:
                files[role] = None
        missing = [role for role, path in files.items() if path is None]
        problem = None
        if missing:
            problem = registry.missing_message(ed.domain, missing)
            if ed.registry.download:
                problem += " (they download at the first request: --download was given)"
        return ModelStatus(ed.domain.name, ed.domain.label, ed.domain.align,
                           ed.domain.resolution, str(ed.device), files, problem)

    def preload(self) -> str | None:
        """Load the weights now (``--preload``); the reason they cannot be, or None."""
        try:
            with self._lock:
                self.editor.preload(edit=True)
        except ClipInvertError as exc:
            return str(exc)
        return None

    # ---- requests --------------------------------------------------------------------------
    def edit(self, request: EditRequest) -> Outcome:
        """``clipinvert edit`` on the uploaded photo; one result per condition (and face).

        Called from several threads at once, the requests that wait while the model is busy
        run next as one batch (:meth:`edit_many`): no thread of its own, no waiting window —
        whichever caller gets the model takes every waiting request (up to
        :attr:`max_batch`, oldest first) and hands each its result.  A request that finds the
        model free runs at once, alone.
        """
        ticket = _Ticket(request)
        with self._waiting_lock:
            self._waiting.append(ticket)
        while True:
            with self._lock:
                if ticket.done:
                    break
                with self._waiting_lock:
                    batch = [self._waiting.popleft()
                             for _ in range(min(self.max_batch, len(self._waiting)))]
                results: list[Outcome | Exception] = [
                    RuntimeError("the batch was interrupted")] * len(batch)
                try:
                    results = self._edit_many([t.request for t in batch])
                except Exception as exc:  # noqa: BLE001 - every waiting caller hears of it
                    results = [exc] * len(batch)
                finally:  # even on KeyboardInterrupt: no caller waits for a lost batch
                    for t, result in zip(batch, results, strict=True):
                        t.result, t.done = result, True
        if isinstance(ticket.result, Exception):
            raise ticket.result
        assert ticket.result is not None
        return ticket.result

    def waiting(self) -> int:
        """Edit requests waiting for the model (not yet in a batch)."""
        with self._waiting_lock:
            return len(self._waiting)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep the model busy for a while: requests wait and then run together (a test uses
        it to put two browser sessions' requests in one batch without timing anything)."""
        with self._lock:
            yield

    def edit_many(self, requests: Sequence[EditRequest]) -> list[Outcome | Exception]:
        """Several edit requests as one batch; per request, its :class:`Outcome` or the
        exception it ended with (a :class:`RequestError` for what its user can fix), so that
        one user's bad upload is that user's message only."""
        with self._lock:
            return self._edit_many(list(requests))

    def _edit_many(self, requests: list[EditRequest]) -> list[Outcome | Exception]:
        if not requests:
            return []
        self.batch_sizes.append(len(requests))
        if len(requests) == 1:  # alone: exactly the CLI's run (and pixels)
            return [_attempt(self._edit_alone, requests[0])]
        try:
            return self._edit_together(requests)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: one at a time, as the CLI
            from ..batch import _free_accelerator_memory, is_out_of_memory

            if not isinstance(exc, ClipInvertError) and not is_out_of_memory(exc):
                traceback.print_exc(file=sys.stderr)
            _free_accelerator_memory()
            return [_attempt(self._edit_alone, r) for r in requests]

    def _edit_alone(self, request: EditRequest) -> Outcome:
        """One request as a one-file run of the CLI's ``run_edit``."""
        from ..jobs import run_edit

        [folder] = self._new_folders(1)
        photo, conditions = self._inputs(request, folder)
        opts = self._run_options(request, folder / "out")
        report = run_edit(self.editor, photo, conditions, opts, {},
                          strength=request.strength, compare=True,
                          paste_back=request.paste_back)
        return self._outcome(request, folder, photo, conditions, opts.output,
                             self._outputs(report, photo, request), report.warnings)

    def _edit_together(self, requests: list[EditRequest]) -> list[Outcome | Exception]:
        """The requests' crops through the model together; each request's files as the CLI
        writes them.  What one request alone gets wrong (its upload, its prompts, no face) is
        its own result; a failure of the model pass itself raises (:meth:`_edit_many` then
        runs them one at a time)."""
        self.editor.preload(edit=True)  # missing weights: every request's message (raises)
        jobs: list[_Job | Exception] = [
            _attempt(self._prepare_job, request, folder)
            for request, folder in zip(requests, self._new_folders(len(requests)),
                                       strict=True)]
        self._model_pass([j for j in jobs if isinstance(j, _Job)])
        return [j if isinstance(j, Exception) else _attempt(self._finish_job, j) for j in jobs]

    def _prepare_job(self, request: EditRequest, folder: Path) -> _Job:
        """What ``run_edit`` does for one input before the model: the domain's resize policy,
        the prompts' token check, the embeddings, decoding and alignment (``batch.prepare``),
        the non-square warning."""
        from rich.console import Console

        from ..batch import Report, _SquashNotes, prepare
        from ..jobs import _check_prompts, with_domain_resize
        from ..naming import output_stems

        ed = self.editor
        photo, conditions = self._inputs(request, folder)
        opts = with_domain_resize(self._run_options(request, folder / "out"), ed)
        report = Report("edit", {}, Console(file=io.StringIO()), quiet=True)
        _check_prompts(ed, conditions, report)
        embeddings = [ed.embed(c.value) for c in conditions]
        [stem], _ = output_stems([Path(photo.name)])
        item = prepare(photo, stem, opts.prepare)
        if item.error:
            raise RequestError(f"{request.photo.name}: {item.error}")
        if not opts.prepare.align:
            _SquashNotes(report, opts.prepare.size).check(item)
        return _Job(request, folder, photo, conditions, opts, item, report, embeddings)

    def _model_pass(self, jobs: list[_Job]) -> None:
        """Every job's crops through the encoder (and the inversion, for the strips), then
        every (crop, condition) edit with its own embedding: in the CLI's batch size, one
        call per strength (the model takes one strength a call)."""
        import torch

        from ..model import Encoded

        ed = self.editor
        crops = [(job, k, crop) for job in jobs for k, crop in enumerate(job.item.crops)]
        for job in jobs:
            job.inversions = [None] * len(job.item.crops)
            job.edits = [[None] * len(job.conditions) for _ in job.item.crops]
        size = max(1, ed.auto_batch_size())
        parts: list[Encoded] = []
        for start in range(0, len(crops), size):
            chunk = crops[start:start + size]
            enc = ed.encode([crop.image for _, _, crop in chunk])
            for (job, k, _), image in zip(chunk, ed.invert(enc).pil(), strict=True):
                job.inversions[k] = image
            parts.append(enc)
        if not parts:
            return
        enc = parts[0] if len(parts) == 1 else Encoded(
            torch.cat([p.w for p in parts]),
            tuple(torch.cat(f) for f in zip(*(p.features for p in parts), strict=True)))
        samples = [(i, j) for i, (job, _, _) in enumerate(crops)
                   for j in range(len(job.conditions))]
        for strength in dict.fromkeys(job.request.strength for job in jobs):
            group = [(i, j) for i, j in samples if crops[i][0].request.strength == strength]
            for start in range(0, len(group), size):
                chunk = group[start:start + size]
                rows = [i for i, _ in chunk]
                part = enc if rows == list(range(len(enc))) else Encoded(
                    enc.w[rows], tuple(f[rows] for f in enc.features))
                embedding = torch.stack([crops[i][0].embeddings[j] for i, j in chunk])
                result = ed.edit(part, embedding, strength=strength)
                for (i, j), image in zip(chunk, result.pil(), strict=True):
                    job, k, _ = crops[i]
                    job.edits[k][j] = image

    def _finish_job(self, job: _Job) -> Outcome:
        """One request's files from its images, as ``run_edit`` writes them: the CLI's
        paste-back, strip and PNG writer, in the CLI's output layout."""
        from ..jobs import _paste, _transform_outputs, compare_path, compare_strip, edit_path

        opts, conditions = job.opts, job.conditions
        outputs: list[Path] = []
        for crop, inversion, edits in zip(job.item.crops, job.inversions, job.edits,
                                          strict=True):
            for cond, image in zip(conditions, edits, strict=True):
                path = edit_path(opts, crop, cond, conditions)
                opts.save(_paste(job.item, crop, image) if job.request.paste_back else image,
                          path)
                outputs.append(path)
            path = compare_path(opts, crop)
            opts.save(compare_strip(crop, inversion, edits, conditions), path)
            outputs.append(path)
            outputs += _transform_outputs(crop, opts.output)
        return self._outcome(job.request, job.folder, job.photo, conditions, opts.output,
                             outputs, job.report.warnings)

    def _outcome(self, request: EditRequest, folder: Path, photo: Path,
                 conditions: list[EditCondition], output: Path, outputs: list[Path],
                 warnings: list[str]) -> Outcome:
        """The page's results from the job's files: the PNGs again with their settings, the
        strips under a name for a download folder."""
        out = Outcome(warnings=self._warnings(warnings, photo, request))
        identity = self.editor.weight_identity(edit=True)
        single = len(conditions) == 1
        for path in outputs:
            rel = path.relative_to(output)
            if path.suffix != ".png":
                continue
            if rel.parts[0] == "compare":  # named for a download folder
                target = folder / "results" / f"{path.stem}-input-inversion-edits.png"
                atomic_write(target, lambda tmp, src=path: shutil.copyfile(src, tmp))
                out.strips.append(target)
                continue
            cond = conditions[0] if single else next(
                c for c in conditions if c.slug == rel.parts[0])
            command = self._command("edit", request, cond)
            target = folder / "results" / f"{path.stem}-{cond.slug}.png"
            settings = self._settings(request, cond, identity, command)
            _with_settings(path, target, settings)
            out.results.append(ResultFile(target, cond.label))
            if command not in out.commands:
                out.commands.append(command)
        return out

    def animate(self, request: AnimateRequest) -> Outcome:
        """``clipinvert interpolate``: frames from the inversion to the edit, and animations."""
        from ..jobs import run_interpolate

        lim = self.limits
        if not 2 <= request.steps <= lim.max_steps:
            raise RequestError(f"steps: 2 to {lim.max_steps}")
        if not 1 <= request.fps <= lim.max_fps:
            raise RequestError(f"frames per second: 1 to {lim.max_fps:g}")
        formats = list(dict.fromkeys(request.formats)) or ["gif"]
        if bad := [f for f in formats if f not in ANIMATION_FORMATS]:
            raise RequestError(f"animation format {bad[0]!r}: use {', '.join(ANIMATION_FORMATS)}")
        with self._lock:
            [folder] = self._new_folders(1)
            photo, conditions = self._inputs(request, folder)
            if len(conditions) != 1:
                raise RequestError("an animation takes one prompt or one reference image, "
                                   f"not {len(conditions)}")
            cond = conditions[0]
            opts = self._run_options(request, folder / "out")
            report = run_interpolate(self.editor, photo, cond, opts, {}, steps=request.steps,
                                     strength=request.strength, formats=formats,
                                     fps=request.fps, boomerang=request.boomerang,
                                     paste_back=request.paste_back)
            outputs = self._outputs(report, photo, request)
            out = Outcome(warnings=self._warnings(report.warnings, photo, request),
                          commands=[self._command("interpolate", request, cond)])
            frames: dict[Path, list[Path]] = {}
            for path in outputs:
                if path.suffix == ".png":
                    frames.setdefault(path.parent, []).append(path)
                elif path.suffix.lstrip(".") in formats:
                    target = folder / "results" / f"{path.stem}-{cond.slug}{path.suffix}"
                    atomic_write(target, lambda tmp, src=path: shutil.copyfile(src, tmp))
                    out.animations.append(target)
            last = max(1, request.steps - 1)
            for group, paths in frames.items():
                paths.sort()
                alphas = [request.strength * k / last for k in range(len(paths))]
                out.results += [ResultFile(p, f"{cond.label} × {a:.2f}")
                                for p, a in zip(paths, alphas, strict=True)]
                images = [Image.open(p) for p in paths]
                strip = imaging.side_by_side(images, labels=[f"{a:.2f}" for a in alphas],
                                             height=min(256, images[0].height))
                target = folder / "results" / f"{group.name}-{cond.slug}-strip.png"
                imaging.save_image(strip, target)
                out.strips.append(target)
            return out

    def close(self) -> None:
        """Remove every file the service wrote."""
        with self._lock:
            self._recent.clear()
            shutil.rmtree(self.root, ignore_errors=True)

    # ---- the steps of a request ------------------------------------------------------------
    def _new_folders(self, count: int) -> list[Path]:
        """A folder for each request of a batch.  The oldest beyond the last :attr:`keep`
        requests go, but never one of the previous batch: the page copies a request's files
        after the request returns, and by the batch after next it has long done so."""
        while (len(self._recent) + count > self.keep and self._recent
               and self._recent[0] not in self._previous):
            shutil.rmtree(self._recent.popleft(), ignore_errors=True)
        folders = []
        for _ in range(count):
            folder = self.root / f"request-{next(self._numbers)}"
            folder.mkdir(parents=True)
            self._recent.append(folder)
            folders.append(folder)
        self._previous = set(folders)
        return folders

    def _prompts(self, text: str) -> list[str]:
        lim = self.limits
        lines = [ln.strip() for ln in (text or "").splitlines()]
        prompts = [ln for ln in lines if ln and not ln.startswith("#")]
        if len(prompts) > lim.max_prompts:
            raise RequestError(f"{len(prompts)} prompts: at most {lim.max_prompts} a request")
        for p in prompts:
            if len(p) > lim.max_prompt_chars:
                raise RequestError(f"a prompt of {len(p)} characters: at most "
                                   f"{lim.max_prompt_chars}")
        return prompts

    def _store(self, upload: Upload | None, folder: Path, stem: str, what: str) -> Path:
        """The upload as ``folder/stem<suffix>``, checked: size, pixels, a decodable image."""
        lim = self.limits
        if upload is None or not upload.data:
            raise RequestError(f"{what}: no file given" if upload is not None else
                               f"upload a {what}")
        if len(upload.data) > lim.max_bytes:
            raise RequestError(f"{what}: {file_size(len(upload.data))}, the limit is "
                               f"{file_size(lim.max_bytes)}")
        path = folder / f"{stem}{_suffix(upload.name)}"
        atomic_write(path, lambda tmp: tmp.write_bytes(upload.data))
        try:  # the CLI's decoder, at this server's pixel limit; its message is the page's
            imaging.load_image(path, max_pixels=lim.max_pixels).close()
        except InputError as exc:
            raise RequestError(f"{what} {upload.name}: {exc}") from None
        return path

    def _inputs(self, request: EditRequest, folder: Path):
        from ..jobs import conditions_from

        prompts = self._prompts(request.prompts)
        stem = slugify(Path(request.photo.name).stem if request.photo else "", 40)
        if stem == "prompt" or stem in RESERVED_FOLDERS:  # no name, or the job's own folder
            stem = "photo"
        photo = self._store(request.photo, folder / "in", stem, "photo")
        refs = [self._store(request.reference, folder / "ref", "reference", "reference image")
                ] if request.reference is not None else []
        if not prompts and not refs:
            raise RequestError("type a prompt (or give a reference image)")
        return photo, conditions_from(prompts, refs)

    def _run_options(self, request: EditRequest, output: Path):
        """The options ``clipinvert edit`` builds from the same flags (``cli._prepare``)."""
        from ..batch import RunOptions
        from ..cli import _prepare

        ed = self.editor
        prep = _prepare(ed.registry, ed.domain, aligned=request.aligned,
                        all_faces=request.all_faces, size=ed.input_size,
                        paste_back=request.paste_back, landmarks=self.landmarks)
        return RunOptions(output=output, batch_size=None, quiet=True, workers=0, prepare=prep)

    @staticmethod
    def _outputs(report, photo: Path, request: EditRequest) -> list[Path]:
        record = report.records[0]
        if record["status"] != "done":
            raise RequestError(f"{request.photo.name}: "
                               f"{record.get('reason', record['status'])}")
        return [Path(p) for p in record["outputs"]]

    @staticmethod
    def _warnings(warnings: list[str], photo: Path, request: EditRequest) -> list[str]:
        """The run's warnings, naming the upload as the user knows it."""
        return [w.replace(str(photo), request.photo.name) for w in warnings]

    def _command(self, command: str, request: EditRequest, cond) -> str:
        """The CLI command line that gives the same pixels as this result."""
        words = ["clipinvert", command, request.photo.name]
        words += ["--ref-image", request.reference.name] if cond.label.startswith("ref:") \
            else [cond.label]
        if self.models is not None:
            words += ["--models", str(self.models)]
        words += ["--domain", self.editor.domain.name]
        if request.strength != 1.0:
            words += ["--strength", f"{request.strength:g}"]
        words += [flag for flag, on in (("--paste-back", request.paste_back),
                                        ("--all-faces", request.all_faces),
                                        ("--aligned", request.aligned)) if on]
        if isinstance(request, AnimateRequest):
            words += ["--steps", str(request.steps), "--fps", f"{request.fps:g}"]
            words += [w for f in request.formats for w in ("--format", f)]
            words += ["--boomerang"] if request.boomerang else []
        dtype = str(self.editor.dtype).replace("torch.", "")
        words += ["--dtype", dtype] if dtype != "float32" else []
        return shlex.join(words)

    def _settings(self, request: EditRequest, cond, identity: dict, command: str) -> dict:
        ed = self.editor
        return {
            "tool": f"clipinvert {__version__}", "command": command,
            "domain": ed.domain.name, "dtype": str(ed.dtype).replace("torch.", ""),
            "condition": cond.key if cond.label.startswith("ref:") else cond.label,
            "prompt": None if cond.label.startswith("ref:") else cond.label,
            "reference": request.reference.name if cond.label.startswith("ref:") else None,
            "strength": request.strength, "paste_back": request.paste_back,
            "all_faces": request.all_faces, "aligned": request.aligned,
            "models": {role: {"file": Path(f["path"]).name, "sha256": f["sha256"]}
                       for role, f in identity.items()},
        }


def _attempt(step, *args):
    """``step(*args)``, or the exception it raised: one request's failure is its result, not
    its batch's.  Unexpected ones are logged with their traceback (the page words them)."""
    try:
        return step(*args)
    except ClipInvertError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the server and the batch go on
        traceback.print_exc(file=sys.stderr)
        return exc


def _with_settings(source: Path, target: Path, settings: dict) -> None:
    """``source`` (a PNG the job wrote) again as ``target`` with ``settings`` as PNG text: the
    same pixels, and a downloaded result still says how it was made."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", settings["tool"])
    info.add_text("Description", str(settings["condition"]))
    info.add_text(SETTINGS_KEY, json.dumps(settings, ensure_ascii=False))
    with Image.open(source) as im:
        im.load()
        atomic_write(target, lambda tmp: im.save(tmp, format="PNG", pnginfo=info,
                                                 compress_level=imaging.PNG_LEVEL))


def describe(status: ModelStatus) -> list[str]:
    """The status as lines (the page's markdown and ``serve``'s start-up lines share them)."""
    label = f" — {status.label}" if status.label else ""
    lines = [f"domain {status.domain}{label} ({status.resolution} px, align "
             f"{status.align}, {status.device})"]
    lines += [f"{role}: {path if path is not None else 'missing'}"
              for role, path in status.files.items()]
    return lines
