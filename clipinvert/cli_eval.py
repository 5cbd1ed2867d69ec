"""``clipinvert eval …``: the paper's metrics (docs/evaluation.md).

Mounted by the main CLI with ``app.add_typer(eval_app, name="eval")``; a thin layer over
:mod:`clipinvert.evaluation` (``evaluate_pairs``).  Like every command, errors are one line and
leave the exit code to ``clipinvert.cli.main``: 2 usage, 3 weights missing.  No torch at import.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli_options import (
    METRIC_OPTIONS,
    Common,
    fixed_batch,
    shared,
    within,
    worker_count,
)

eval_app = typer.Typer(
    help="Score edits with the paper's metrics (FID, CMP, AMA, ID, LPIPS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EVAL_OPTIONS = ("output", "domain", "models", "device", "batch_size", "quiet", "report",
                "trust_checkpoint")


def _options(opts: Common):
    from .evaluation.metrics import EvalOptions

    return EvalOptions(diff_range=opts.diff_range, ama_threshold=opts.ama_threshold,
                       ama_multiple_threshold=opts.ama_multiple_threshold,
                       identity=opts.identity)


def _finish(report: dict, opts: Common) -> None:
    """The table on the terminal (stderr), the report's path on stdout."""
    from rich.console import Console

    from .evaluation.report import print_table

    if not opts.quiet:
        print_table(report, Console(stderr=True))
    print(opts.report or opts.output / "clipinvert-report.json")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


@eval_app.command("metrics")
@shared(EVAL_OPTIONS, METRIC_OPTIONS, output=Path("eval"), batch_size=16)
def metrics(
    pairs: Annotated[Path, typer.Argument(
        help="A JSONL manifest of {input, output, prompt[, attributes]} lines, or a folder "
             "`clipinvert edit` wrote.", show_default=False)],
    *,
    opts: Common,
) -> None:
    """Score (input, output, prompt) pairs — of clipinvert or any other method."""
    from .evaluation.run import evaluate_pairs
    from .registry import Registry

    report = evaluate_pairs(
        pairs, opts.output, domain=opts.domain, registry=Registry.load(opts.models),
        metrics=opts.metrics, device=opts.device,
        batch_size=fixed_batch(opts.batch_size, "eval metrics"),
        fid_reference=opts.fid_reference, report_path=opts.report, summary=opts.summary,
        trust=opts.trust_checkpoint, params=opts.params, log=_say, quiet=opts.quiet,
        options=_options(opts))
    _finish(report, opts)


@eval_app.command("benchmark")
@shared(EVAL_OPTIONS + ("seed",), METRIC_OPTIONS, output=Path("benchmark"), batch_size=8)
def benchmark(
    data: Annotated[Path, typer.Option(
        help="CelebA-HQ (images/ or CelebA-HQ-img/ + CelebAMask-HQ-attribute-anno.txt) or a "
             "JSONL of {image, attributes} lines.", show_default=False)],
    edits: Annotated[Path | None, typer.Option(
        help="Score edits made elsewhere (EDITS/<target>/<stem>.png, as OUT/selection.json "
             "lists) instead of editing with the domain's model.", show_default=False)] = None,
    test_list: Annotated[Path | None, typer.Option(
        help="Only these images: one name per line, or Multi-Modal CelebA-HQ's "
             "test/filenames.pickle.",
        show_default=False)] = None,
    per_target: Annotated[int, typer.Option(
        callback=within(1, 100000), help="Inputs per attribute and per combination.")] = 50,
    gendered: Annotated[bool, typer.Option(
        "--gendered", help="Prompts say She/He by the CelebA Male label, not 'This person'.")
    ] = False,
    strength: Annotated[float, typer.Option(callback=within(-10, 10),
                                            help="Edit strength.")] = 1.0,
    *,
    opts: Common,
) -> None:
    """The paper's protocol end to end: choose inputs, edit, score (resumable)."""
    from .evaluation.benchmark import run_benchmark
    from .registry import Registry

    report = run_benchmark(
        data, opts.output, domain=opts.domain, registry=Registry.load(opts.models),
        per_target=per_target, seed=opts.seed, gendered=gendered, edits=edits,
        test_list=test_list, device=opts.device,
        batch_size=fixed_batch(opts.batch_size, "eval benchmark"),
        strength=strength, metrics=opts.metrics, log=_say, fid_reference=opts.fid_reference,
        report_path=opts.report, summary=opts.summary, trust=opts.trust_checkpoint,
        params=opts.params, quiet=opts.quiet,
        options=_options(opts))
    _finish(report, opts)


@eval_app.command("compare")
def compare(
    reports: Annotated[list[Path], typer.Argument(
        help="Eval reports (clipinvert-report.json) to put side by side.", show_default=False)],
    attributes: Annotated[bool, typer.Option(
        "--attributes", help="Also one row per attribute of each AMA.")] = False,
) -> None:
    """Reports side by side: one column per report, one row per metric."""
    from rich.console import Console

    from .evaluation.compare import compare_table, read_reports

    Console().print(compare_table(read_reports(reports), attributes=attributes))


@eval_app.command("train-classifier")
@shared(("device", "workers", "seed", "quiet", "batch_size"), batch_size=128)
def train_classifier(
    celeba: Annotated[Path, typer.Option(
        help="CelebA: img_align_celeba/ and list_attr_celeba.txt.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="The classifier file to write (registry role attributes).",
        show_default=False)],
    epochs: Annotated[int, typer.Option(callback=within(1, 10000))] = 20,
    lr: Annotated[float, typer.Option(callback=within(1e-8, 1.0),
                                      help="Adam learning rate.")] = 1e-3,
    limit: Annotated[int | None, typer.Option(
        callback=within(10, 10**7), show_default=False,
        help="Use only the first N images of the attribute list (a quick trial).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output file.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Continue a stopped run from OUT.resume.pt.")] = True,
    *,
    opts: Common,
) -> None:
    """Train the CelebA 40-attribute classifier AMA uses (MobileNet-v1, mish; resumable)."""
    from .evaluation.classifier import accuracy_table
    from .evaluation.classifier import train_classifier as run

    result = run(celeba, output, epochs=epochs,
                 batch_size=fixed_batch(opts.batch_size, "eval train-classifier"), lr=lr,
                 seed=opts.seed, device=opts.device, workers=worker_count(opts.workers),
                 resume=resume,
                 overwrite=overwrite, limit=limit, progress=not opts.quiet,
                 log=(lambda line: None) if opts.quiet else _say)
    if not opts.quiet:
        for line in accuracy_table(result.accuracy):
            _say(line)
    print(result.output)
