"""The options the commands share, each declared once (`clipinvert.cli`, `clipinvert.cli_eval`).

:class:`Common`'s fields are the shared options: a field's annotation is its Typer option, its
default the option's default.  A command names the groups it takes with :func:`shared`
(``RUN_OPTIONS``, ``MODEL_OPTIONS``) and receives them as one ``opts: Common``.  The validation
callbacks give one-line errors naming the value.  No torch here: ``--help`` stays fast.
"""

from __future__ import annotations

import copy
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
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .cli_models import ModelsOpt
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
Input = Annotated[Path, typer.Argument(
    metavar="INPUT", help="An image file or a folder (searched recursively).",
    show_default=False)]
Output = Annotated[Path, typer.Option("-o", "--output", metavar="DIR", help="Output folder.")]
Domain = Annotated[str, typer.Option(
    metavar="NAME", help="Domain from models.toml (faces, cats, birds, …).")]
Device = Annotated[str, typer.Option(
    metavar="DEVICE", help="auto (CUDA if present, else CPU), cpu, cuda[:N], mps.")]
Dtype = Annotated[str, typer.Option(
    metavar="DTYPE", help="float32, bfloat16 or float16 (CUDA only).")]


def auto_or(lo: int, hi: int, word: str = "auto"):
    """A callback taking ``word`` (``auto``) or a whole number ``lo..hi`` (the value the command
    receives); its message names the value given."""
    def check(value: str | int) -> str | int:
        text = str(value).strip().lower()
        if text == word:
            return word
        if not text.lstrip("-").isdigit():
            raise typer.BadParameter(
                f"{value!r} is neither {word} nor a whole number in {lo}..{hi}")
        if not lo <= int(text) <= hi:
            raise typer.BadParameter(f"{int(text)} is not in the range {lo}..{hi}")
        return int(text)
    return check


BatchSize = Annotated[str, typer.Option(
    "--batch-size", "-b", callback=auto_or(1, 4096), metavar="N|auto",
    help="Images per forward pass: 1..4096, or auto (on the CPU 4, the fastest per image; on "
         "a GPU what fits, up to 8, halved on out-of-memory).")]
# Training and scoring take a plain number: their batch is part of the recipe or bounded by
# memory the user knows, and "auto" would make a run's settings depend on the machine.
FixedBatch = Annotated[int, typer.Option(
    "--batch-size", "-b", callback=within(1, 4096), metavar="N",
    help="Images per batch, 1..4096.")]
Workers = Annotated[str, typer.Option(
    callback=auto_or(0, MAX_WORKERS), metavar="N|auto",
    help="Workers decoding and aligning images ahead of the model (threads, or processes "
         "when aligning faces): 0 = in the main thread, up to "
         f"{MAX_WORKERS} (twice the cores), or auto (on the CPU none up to 4 cores, so the "
         "model keeps them; on a GPU up to 4).")]


def weights_registry(opts: Common, models: Path | str | None = None):
    """The registry a command loads weights from, with its ``--download`` consent and
    ``--offline`` (unset: from the environment), as :class:`clipinvert.Editor` sets them."""
    from .registry import Registry

    registry = Registry.load(models if models is not None else opts.models)
    registry.download = opts.download
    registry.offline = opts.offline or None
    return registry


def worker_count(value: str | int) -> int:
    """``--workers`` of a command that feeds a data loader: ``auto`` = one per core but one,
    at most 4."""
    return default_workers() if value == "auto" else int(value)


def _output_extensions() -> tuple[str, ...]:
    from .imaging import OUTPUT_EXTENSIONS  # the one list (imaging is heavy: imported late)

    return OUTPUT_EXTENSIONS


Ext = Annotated[str, typer.Option(
    "--ext", callback=lambda v: _one_of(v, _output_extensions()), metavar="FORMAT",
    help="Output image format: png (lossless), jpg or webp (quality 95), jxl (lossless "
         "JPEG XL: smaller than PNG, as fast to write).")]
PngLevel = Annotated[int, typer.Option(
    "--png-level", callback=within(0, 9), metavar="0..9",
    help="PNG compression 0..9 (the pixels are the same at every level): 1 is the fast fpng "
         "encoder (PIL's zlib level 1 where fpng is missing), 15x faster than zlib; 0 and "
         "2..9 are zlib at that level (9: smallest, slowest).")]


def _one_of(value: str, names: tuple[str, ...]) -> str:
    text = value.strip().lower().removeprefix(".")
    text = "jpg" if text == "jpeg" else text
    if text not in names:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(names)}")
    return text


Strength = Annotated[float, typer.Option(
    callback=finite, metavar="X",
    help="Edit strength: 0 = inversion, 1 = as trained, >1 exaggerates, <0 reverses.")]
Overwrite = Annotated[bool, typer.Option("--overwrite",
                                         help="Redo inputs whose outputs already exist.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
ReportOpt = Annotated[Path | None, typer.Option(
    metavar="FILE",
    help="Where to write the JSON run report (default: OUT/clipinvert-report.json).",
    show_default=False)]
Aligned = Annotated[bool, typer.Option(
    "--aligned", help="Inputs are already aligned crops: skip face alignment.")]
AllFaces = Annotated[bool, typer.Option(
    "--all-faces",
    help="Process every face found, as <stem>_face<i>, not only the most confident.")]
DetectSize = Annotated[str, typer.Option(
    "--detect-size", callback=auto_or(64, 65536, word="full"), metavar="N|full",
    help="Search faces on a copy N px long, landmarks still at full size: the search costs "
         "~0.45 s per megapixel of the photo searched, but the crop moves by up to ~1% of its "
         "side (docs/alignment.md#alignment-at-scale). full: the photo itself, today's crops. "
         "No face on the copy: full size; ignored with --all-faces.")]


def detect_size_pixels(value: str | int) -> int | None:
    """``--detect-size`` as :func:`clipinvert.align.align_image` takes it (None: full)."""
    return None if value == "full" else int(value)
Seed = Annotated[int, typer.Option(
    metavar="N", help="Recorded in the report; inference draws no random numbers, so the "
                      "results are the same whatever the seed.")]
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
    "--metrics", metavar="LIST",
    help="Comma-separated: fid, cmp, ama_single, ama_multiple, id, lpips, mse (default: all "
         "the pairs allow).")]
FidReference = Annotated[Path | None, typer.Option(
    metavar="DIR", help="Real images FID compares the outputs with (default: the inputs).",
    show_default=False)]
DiffRange = Annotated[str, typer.Option(
    callback=choice("pm1", "01"), metavar="pm1|01",
    help="CMP's pixel difference in [-1,1] units (pm1, the authors') or [0,1] (01).")]
AmaThreshold = Annotated[float, typer.Option(
    callback=within(0, 1), metavar="P",
    help="AMA-single: success when the attribute scores above this.")]
AmaMultipleThreshold = Annotated[float, typer.Option(
    callback=within(0, 1), metavar="P",
    help="AMA-multiple: every attribute must score above this.")]
IdentityOpt = Annotated[str, typer.Option(
    callback=choice("auto", "arcface", "moco", "dlib"), metavar="NAME",
    help="Identity network: auto (ArcFace for faces, else MoCo), arcface, moco, or dlib "
         "(offline stand-in, not the paper's; named in the report).")]
Summary = Annotated[bool, typer.Option("--summary/--no-summary",
                                       help="Also write OUT/summary.png.")]


# The chain of registries (docs/new-domain.md#the-chain): a step names what it made in the
# domain's table, so the next command finds it by --domain alone.
Register = Annotated[bool, typer.Option(
    "--register",
    help="Name the result in the domain's table of your models.toml (or --models FILE), "
         "so the next command finds it by --domain alone.")]


# The data set's own split (train, eval benchmark): one declaration for both.
Split = Annotated[str, typer.Option(
    metavar="all|train|test", callback=choice("all", "train", "test"),
    help="Which of the data set's own lists: AFHQ train/ or val/ (test), CUB AttnGAN's "
         "train|test/filenames.pickle, Multi-Modal CelebA-HQ's train|test/filenames.pickle; "
         "all = every image.")]


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
    detect_size: DetectSize = "full"
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
    register: Register = False
    params: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


# Every command that runs over a file or folder of images.
RUN_OPTIONS = ("output", "domain", "models", "workers", "all_faces", "detect_size", "overwrite",
               "quiet", "report", "ext", "png_level")
# Commands that load the networks and feed them images.
MODEL_OPTIONS = ("device", "dtype", "batch_size", "aligned", "seed", "download", "offline",
                 "trust_checkpoint")
# Commands that score with the metrics (clipinvert eval metrics, benchmark).
METRIC_OPTIONS = ("metrics", "fid_reference", "diff_range", "ama_threshold",
                  "ama_multiple_threshold", "identity", "summary")

SHARED_FIELDS = [f for f in dataclasses.fields(Common) if f.name != "params"]


def shared(*groups: tuple[str, ...], help: dict[str, str] | None = None,  # noqa: A002
           **defaults: object) -> Callable[[Callable], Callable]:
    """Give a command the shared options of ``groups`` (``defaults`` overrides some defaults,
    ``help`` some help texts: an option means the same everywhere, but what it does in detail
    — what ``--workers`` processes, what ``--seed`` seeds — is the command's to say).

    The command declares its own parameters and a keyword ``opts: Common``; the Typer command
    gets its own parameters followed by the shared ones, appended to its ``__signature__``
    (which is what Typer reads).  At call time the shared values are collected into ``opts``,
    with ``opts.params`` = every value received (the report's ``params``).
    """
    names = {n for group in groups for n in group}
    known = {f.name for f in SHARED_FIELDS}
    texts = help or {}
    stray = (names - known) | ((defaults.keys() | texts.keys()) - names)
    if stray:
        raise TypeError(f"not shared options of this command: {sorted(stray)}")
    hints = typing.get_type_hints(Common, include_extras=True)
    extra = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                               annotation=_with_help(hints[f.name], texts.get(f.name)),
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


def _with_help(annotation: Any, text: str | None) -> Any:
    """``Annotated[T, typer.Option(...)]`` with another help text (a copy: the shared
    declaration stays as it is for the other commands)."""
    if text is None:
        return annotation
    base, info, *rest = typing.get_args(annotation)
    info = copy.copy(info)
    info.help = text
    return Annotated[(base, info, *rest)]  # type: ignore[return-value]


# ---- how help reads ----------------------------------------------------------------------------
# Plain click help, not rich panels: rich markup would eat "[default: …]" and any "[…]" in a
# help text, and the panels print Python type names (<bool>, <list[Path]>) beside every option.
# Every command's help reads like git's: ``clipinvert edit [OPTIONS] INPUT [PROMPT]``, options
# with a word for their value (FILE, DIR, N), and a few examples at the end.

_TYPE_WORDS = {"path": "PATH", "int": "N", "float": "X", "str": "TEXT"}


def _value_word(param: TyperOption, ctx: Any) -> str:
    """A word for an option's value when the declaration names none (PATH, N, TEXT)."""
    label = param.display_type(ctx).strip("<>")
    label = label.removeprefix("list[").removesuffix("]").lower()
    return _TYPE_WORDS.get(label, label.upper())


def _argument_label(param: TyperArgument) -> str:
    name = (param.metavar or param.name or "").upper()
    return name + ("..." if param.nargs != 1 else "")


def _shown_names(names: list[str]) -> list[str]:
    """An option's short names and its first long name: further long names are old spellings
    kept working (``--latents`` for ``--save-latents``), not shown."""
    longs = [n for n in names if n.startswith("--")]
    return [n for n in names if not n.startswith("--")] + longs[:1]


class HelpCommand(TyperCommand):
    """A command whose ``-h`` reads as described above (see :func:`house_style`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                label = _argument_label(param)
                pieces.append(label if param.required else f"[{label}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args = [(_argument_label(p), p.help or "") for p in self.get_params(ctx)
                if isinstance(p, TyperArgument) and not p.hidden]
        opts = [rec for p in self.get_params(ctx) if isinstance(p, TyperOption)
                if (rec := _option_record(p, ctx)) is not None]
        if args:
            with formatter.section("Arguments"):
                formatter.write_dl(args)
        if opts:
            with formatter.section("Options"):
                formatter.write_dl(opts)

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        _write_examples(self.epilog, formatter)


class HelpGroup(TyperGroup):
    """A command group (``clipinvert``, ``clipinvert models``) with examples at the end."""

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        _write_examples(self.epilog, formatter)


def _option_record(param: TyperOption, ctx: Any) -> tuple[str, str] | None:
    if param.metavar is None and not param.is_flag:
        param.metavar = _value_word(param, ctx)
    opts, secondary = param.opts, param.secondary_opts
    param.opts, param.secondary_opts = _shown_names(opts), _shown_names(secondary)
    try:
        return param.get_help_record(ctx)
    finally:
        param.opts, param.secondary_opts = opts, secondary


def examples(*commands: str) -> str:
    """A command's epilog: the example command lines ``-h`` ends with, one per line."""
    return "\n".join(commands)


def _write_examples(epilog: str | None, formatter: Any) -> None:
    if not epilog:
        return
    with formatter.section("Examples"):
        for line in epilog.splitlines():  # whole lines: a command must not wrap
            formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


def house_style(app: typer.Typer, examples_for: dict[str, str] | None = None,
                path: str = "") -> None:
    """Give every command of ``app`` (sub-apps too) the help above; ``examples_for`` fills in
    the examples of commands whose declaration has none, by path (``"models list"``)."""
    table = examples_for or {}
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else "")
        if info.cls in (None, TyperCommand):  # not a class of the command's own
            info.cls = HelpCommand
        if info.epilog is None:
            info.epilog = table.get(f"{path}{name}")
    for group in app.registered_groups:
        if group.typer_instance is not None:
            if not (isinstance(group.cls, type) and group.cls is not TyperGroup):
                group.cls = HelpGroup
            house_style(group.typer_instance, table, f"{path}{group.name} ")
