"""The options the commands share, each declared once (`clipinvert.cli`, `clipinvert.cli_eval`).

:class:`Common`'s fields are the shared options: a field's annotation is its Typer option, its
default the option's default.  A command names the groups it takes with :func:`shared`
(``RUN_OPTIONS``, ``MODEL_OPTIONS``) and receives them as one ``opts: Common``.  The validation
callbacks give one-line errors naming the value.  No torch here: ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_models import ModelsOpt
from .errors import UsageError
from .manifest import json_safe


# ---- validation shared by the options ------------------------------------------------------
def finite(value: float | None) -> float | None:
    """Click's ranges let NaN through (every comparison with NaN is false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def within(lo: float, hi: float):
    """A callback checking ``lo <= value <= hi`` whose message names the value given."""
    def check(value: float | None) -> float | None:
        if value is not None and not (lo <= value <= hi):  # NaN fails too
            raise typer.BadParameter(f"{value} is not in the range {lo:g}..{hi:g}")
        return value
    return check


def existing_file(value: Path | list[Path] | None) -> Path | list[Path] | None:
    for p in value if isinstance(value, list) else [value] if value is not None else []:
        if not p.is_file():
            raise typer.BadParameter(f"{p}: {'is a folder' if p.is_dir() else 'file not found'}")
    return value


def print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"clipinvert {__version__}")
        raise typer.Exit(0)


MAX_WORKERS = 2 * (os.cpu_count() or 1)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


# ---- option types (typed, defaults shown in --help) -----------------------------------------
Input = Annotated[Path, typer.Argument(help="An image file or a folder (searched recursively).",
                                       show_default=False)]
Output = Annotated[Path, typer.Option("-o", "--output", help="Output folder.")]
Domain = Annotated[str, typer.Option(help="Domain from models.toml (faces, cats, birds, …).")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda[:N], mps.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16 or float16 (CUDA only).")]


def auto_or(lo: int, hi: int):
    """A callback taking ``auto`` or a whole number ``lo..hi`` (the value the command
    receives); its message names the value given."""
    def check(value: str | int) -> str | int:
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if not text.lstrip("-").isdigit():
            raise typer.BadParameter(f"{value!r} is neither auto nor a whole number in {lo}..{hi}")
        if not lo <= int(text) <= hi:
            raise typer.BadParameter(f"{int(text)} is not in the range {lo}..{hi}")
        return int(text)
    return check


BatchSize = Annotated[str, typer.Option(
    "--batch-size", "-b", callback=auto_or(1, 4096),
    help="Images per forward pass: 1..4096, or auto (edit, invert, interpolate: the fastest per "
         "image on the CPU (4), on a GPU what fits up to 8, halved on out-of-memory).")]
Workers = Annotated[str, typer.Option(
    callback=auto_or(0, MAX_WORKERS),
    help=f"Processes decoding/aligning images ahead of the model: 0 = in-process, up to "
         f"{MAX_WORKERS} (twice the cores), or auto (image commands: on the CPU none up to 4 "
         "cores, so the model keeps them; on a GPU up to 4).")]


def fixed_batch(value: str | int, command: str) -> int:
    """A batch size for a command without ``auto`` (train, eval): its own number."""
    if value == "auto":
        raise UsageError(f"--batch-size auto is for edit, invert and interpolate; {command} "
                         "takes a number")
    return int(value)


def worker_count(value: str | int) -> int:
    """``--workers`` of a command that feeds a data loader: ``auto`` = one per core but one,
    at most 4."""
    return default_workers() if value == "auto" else int(value)


Ext = Annotated[str, typer.Option(
    "--ext", callback=lambda v: _one_of(v, ("png", "jpg", "webp")),
    help="Output image format: png (lossless), jpg or webp (quality 95).")]
PngLevel = Annotated[int, typer.Option(
    "--png-level", callback=within(0, 9),
    help="PNG compression 0..9 (zlib effort; the pixels are the same at every level): 1 "
         "writes a 1024² photo ~5x faster than PIL's default 6, for a file ~13 % larger.")]


def _one_of(value: str, names: tuple[str, ...]) -> str:
    text = value.strip().lower().removeprefix(".")
    text = "jpg" if text == "jpeg" else text
    if text not in names:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(names)}")
    return text


Strength = Annotated[float, typer.Option(
    callback=finite,
    help="Edit strength: 0 = inversion, 1 = as trained, >1 exaggerates, <0 reverses.")]
Overwrite = Annotated[bool, typer.Option("--overwrite",
                                         help="Redo inputs whose outputs already exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
ReportOpt = Annotated[Path | None, typer.Option(
    help="Where to write the JSON run report (default: OUT/clipinvert-report.json).",
    show_default=False)]
Aligned = Annotated[bool, typer.Option(
    "--aligned", help="Inputs are already aligned crops: skip face alignment.")]
AllFaces = Annotated[bool, typer.Option(
    "--all-faces", help="Edit every face found, as <stem>_face<i>, not only the most confident.")]
Seed = Annotated[int, typer.Option(help="Seed for any randomness (inference is deterministic).")]
Download = Annotated[bool, typer.Option(
    "--download", help="Fetch missing weights from the registry's URLs (verified).")]
Offline = Annotated[bool, typer.Option(
    "--offline", envvar="CLIPINVERT_OFFLINE",
    help="Never touch the network (also $HF_HUB_OFFLINE).")]
Trust = Annotated[bool, typer.Option(
    "--trust-checkpoint",
    help="Allow checkpoints whose pickles hold more than weights. Only for files you vouch for.")]



def choice(*allowed: str):
    """A callback accepting only ``allowed`` (Typer's enums would show them as a type)."""
    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r}: choose {', '.join(allowed)}")
        return value
    return check


# The metrics' options (eval metrics, eval benchmark).
MetricsOpt = Annotated[str, typer.Option(
    "--metrics", help="Comma-separated: fid, cmp, ama_single, ama_multiple, id, lpips, mse "
                      "(default: all the pairs allow).")]
FidReference = Annotated[Path | None, typer.Option(
    help="Real images FID compares the outputs with (default: the inputs).",
    show_default=False)]
DiffRange = Annotated[str, typer.Option(
    callback=choice("pm1", "01"),
    help="CMP's pixel difference in [-1,1] units (pm1, the authors') or [0,1] (01).")]
AmaThreshold = Annotated[float, typer.Option(
    callback=within(0, 1), help="AMA-single: success when the attribute scores above this.")]
AmaMultipleThreshold = Annotated[float, typer.Option(
    callback=within(0, 1), help="AMA-multiple: every attribute must score above this.")]
IdentityOpt = Annotated[str, typer.Option(
    callback=choice("auto", "arcface", "moco", "dlib"),
    help="Identity network: auto (ArcFace for faces, else MoCo), arcface, moco, or dlib "
         "(offline stand-in, not the paper's; named in the report).")]
Summary = Annotated[bool, typer.Option("--summary/--no-summary",
                                       help="Also write OUT/summary.png.")]


# ---- the shared options, declared once -------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Common:
    """The options run commands share, each declared once: a field's annotation is its Typer
    option, its default the option's default.  A command takes the groups it names with
    :func:`shared` (after its own options in ``-h``, in this order) and receives them as one
    ``opts: Common``; options it does not take keep these defaults.  ``params`` is every value the
    command received, its own included, JSON-ready: the run report's ``params``."""

    output: Output = Path("out")
    domain: Domain = "faces"
    models: ModelsOpt = None
    device: Device = "auto"
    dtype: Dtype = "float32"
    batch_size: BatchSize = "auto"
    workers: Workers = "auto"
    ext: Ext = "png"
    png_level: PngLevel = 1
    aligned: Aligned = False
    all_faces: AllFaces = False
    overwrite: Overwrite = False
    quiet: Quiet = False
    report: ReportOpt = None
    seed: Seed = 0
    download: Download = False
    offline: Offline = False
    trust_checkpoint: Trust = False
    metrics: MetricsOpt = "all"
    fid_reference: FidReference = None
    diff_range: DiffRange = "pm1"
    ama_threshold: AmaThreshold = 0.5
    ama_multiple_threshold: AmaMultipleThreshold = 0.9
    identity: IdentityOpt = "auto"
    summary: Summary = True
    params: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


# Every command that runs over a file or folder of images.
RUN_OPTIONS = ("output", "domain", "models", "workers", "all_faces", "overwrite", "quiet",
               "report", "ext", "png_level")
# Commands that load the networks and feed them images.
MODEL_OPTIONS = ("device", "dtype", "batch_size", "aligned", "seed", "download", "offline",
                 "trust_checkpoint")
# Commands that score with the metrics (clipinvert eval metrics, benchmark).
METRIC_OPTIONS = ("metrics", "fid_reference", "diff_range", "ama_threshold",
                  "ama_multiple_threshold", "identity", "summary")

SHARED_FIELDS = [f for f in dataclasses.fields(Common) if f.name != "params"]


def shared(*groups: tuple[str, ...], **defaults: object) -> Callable[[Callable], Callable]:
    """Give a command the shared options of ``groups`` (``defaults`` overrides some defaults).

    The command declares its own parameters and a keyword ``opts: Common``; the Typer command
    gets its own parameters followed by the shared ones, appended to its ``__signature__``
    (which is what Typer reads).  At call time the shared values are collected into ``opts``,
    with ``opts.params`` = every value received (the report's ``params``).
    """
    names = {n for group in groups for n in group}
    known = {f.name for f in SHARED_FIELDS}
    if names - known or defaults.keys() - names:
        raise TypeError(f"not shared options of this command: "
                        f"{sorted((names - known) | (defaults.keys() - names))}")
    hints = typing.get_type_hints(Common, include_extras=True)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                               default=defaults.get(f.name, f.default))
             for f in SHARED_FIELDS if f.name in names]

    def decorate(func: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(func, eval_str=True).parameters.values()
               if p.name != "opts"]
        clash = {p.name for p in own} & names
        if clash:
            raise TypeError(f"{func.__name__} declares shared options itself: {sorted(clash)}")

        @functools.wraps(func)
        def command(**received: Any) -> Any:
            # The report's params: every value received, JSON-ready (paths as strings).
            params = {k: json_safe(v) for k, v in received.items()}
            opts = Common(**{p.name: received.pop(p.name) for p in extra}, params=params)
            return func(**received, opts=opts)

        command.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return command

    return decorate
