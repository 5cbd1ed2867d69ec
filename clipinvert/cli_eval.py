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
    FixedBatch,
    HelpGroup,
    Split,
    examples,
    shared,
    weights_registry,
    within,
    worker_count,
)

eval_app = typer.Typer(
    help="Score edits with the paper's metrics (FID, CMP, AMA, ID, LPIPS).",
    epilog=examples("clipinvert eval metrics edited/ -o scores/",
                    "clipinvert eval benchmark --data celeba-hq/ -o bench/",
                    "clipinvert eval compare bench/clipinvert-report.json "
                    "other/clipinvert-report.json"),
    cls=HelpGroup,
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# What the scoring commands share: where, which weights (and whether to fetch them), how.
EVAL_OPTIONS = ("output", "domain", "models", "device", "quiet", "report", "download",
                "offline", "trust_checkpoint")
EVAL_HELP = {"report": "Where to write the JSON eval report (default: "
                       "OUT/clipinvert-report.json)."}


def _options(opts: Common):
    from .evaluation.metrics import EvalOptions

    return EvalOptions(diff_range=opts.diff_range, ama_threshold=opts.ama_threshold,
                       ama_multiple_threshold=opts.ama_multiple_threshold,
                       identity=opts.identity)


def _finish(report: dict, opts: Common) -> None:
    """The table on the terminal (stderr), the report's path on stdout: the result a script
    captures, as every command that makes files prints its main one."""
    from rich.console import Console

    from .evaluation.report import print_table

    if not opts.quiet:
        print_table(report, Console(stderr=True))
    print(opts.report or opts.output / "clipinvert-report.json")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


@eval_app.command("metrics", epilog=examples(
    "clipinvert eval metrics edited/ -o scores/",
    "clipinvert eval metrics pairs.jsonl --metrics fid,lpips --fid-reference real/"))
@shared(EVAL_OPTIONS, METRIC_OPTIONS, output=Path("eval"), help=EVAL_HELP)
def metrics(
    pairs: Annotated[Path, typer.Argument(
        metavar="PAIRS",
        help="A JSONL manifest of {input, output, prompt[, attributes]} lines, or a folder "
             "`clipinvert edit` wrote.", show_default=False)],
    batch_size: FixedBatch = 16,
    *,
    opts: Common,
) -> None:
    """Score (input, output, prompt) pairs — of clipinvert or any other method."""
    from .evaluation.run import evaluate_pairs

    report = evaluate_pairs(
        pairs, opts.output, domain=opts.domain, registry=weights_registry(opts),
        metrics=opts.metrics, device=opts.device, batch_size=batch_size,
        fid_reference=opts.fid_reference, report_path=opts.report, summary=opts.summary,
        trust=opts.trust_checkpoint, params=opts.params, log=_say, quiet=opts.quiet,
        options=_options(opts))
    _finish(report, opts)


@eval_app.command("benchmark", epilog=examples(
    "clipinvert eval benchmark --data celeba-hq/ -o bench/",
    "clipinvert eval benchmark --data celeba-hq/ --edits other-method/ -o bench-other/"))
@shared(EVAL_OPTIONS + ("seed",), METRIC_OPTIONS, output=Path("benchmark"), help={
    **EVAL_HELP, "seed": "Seed choosing the inputs of each attribute (OUT/selection.json)."})
def benchmark(
    data: Annotated[Path, typer.Option(
        metavar="DIR|FILE",
        help="CelebA-HQ (images/ or CelebA-HQ-img/ + CelebAMask-HQ-attribute-anno.txt), "
             "CUB-200-2011 (birds), AFHQ (cats), or a JSONL of {image, attributes} lines (e.g. "
             "the labels `clipinvert caption` wrote).", show_default=False)],
    edits: Annotated[Path | None, typer.Option(
        metavar="DIR",
        help="Score edits made elsewhere (EDITS/<target>/<stem>.png, as OUT/selection.json "
             "lists) instead of editing with the domain's model.", show_default=False)] = None,
    test_list: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Only these images: one name per line, or Multi-Modal CelebA-HQ's "
             "test/filenames.pickle.",
        show_default=False)] = None,
    per_target: Annotated[int, typer.Option(
        callback=within(1, 100000), metavar="N",
        help="Inputs per attribute and per combination.")] = 50,
    gendered: Annotated[bool, typer.Option(
        "--gendered", help="Prompts say She/He by the CelebA Male label, not 'This person'.")
    ] = False,
    strength: Annotated[float, typer.Option(
        callback=within(-10, 10), metavar="X",
        help="Edit strength (-10..10; 1 = as trained).")] = 1.0,
    split: Split = "all",
    batch_size: FixedBatch = 8,
    *,
    opts: Common,
) -> None:
    """The paper's protocol end to end: choose inputs, edit, score (resumable)."""
    from .evaluation.benchmark import run_benchmark

    report = run_benchmark(
        data, opts.output, domain=opts.domain, registry=weights_registry(opts),
        per_target=per_target, seed=opts.seed, gendered=gendered, edits=edits,
        test_list=test_list, split=split, device=opts.device, batch_size=batch_size,
        strength=strength, metrics=opts.metrics, log=_say, fid_reference=opts.fid_reference,
        report_path=opts.report, summary=opts.summary, trust=opts.trust_checkpoint,
        params=opts.params, quiet=opts.quiet,
        options=_options(opts))
    _finish(report, opts)


@eval_app.command("compare", epilog=examples(
    "clipinvert eval compare bench/clipinvert-report.json other/clipinvert-report.json",
    "clipinvert eval compare a/clipinvert-report.json b/clipinvert-report.json --attributes"))
def compare(
    reports: Annotated[list[Path], typer.Argument(
        metavar="REPORT", help="Eval reports (clipinvert-report.json) to put side by side.",
        show_default=False)],
    attributes: Annotated[bool, typer.Option(
        "--attributes", help="Also one row per attribute of each AMA.")] = False,
) -> None:
    """Reports side by side: one column per report, one row per metric."""
    from rich.console import Console

    from .evaluation.compare import compare_table, read_reports

    Console().print(compare_table(read_reports(reports), attributes=attributes))


@eval_app.command("train-classifier", epilog=examples(
    "clipinvert eval train-classifier --celeba celeba/ -o celeba-attributes.pt",
    "clipinvert eval train-classifier --celeba celeba/ -o celeba-attributes.pt --resume",
    "clipinvert eval train-classifier --celeba celeba/ -o trial.pt --limit 2000 --epochs 1"))
@shared(("device", "workers", "seed", "quiet", "overwrite"), help={
    "workers": "Image-decoding processes: 0 = in-process, up to twice the cores, or auto (one "
               "per core but one, at most 4).",
    "seed": "Seed of the initial weights and the shuffling (a resumed run goes on bit for bit "
            "on the CPU).",
    "overwrite": "Replace an existing classifier file, and start over any unfinished run of "
                 "it."})
def train_classifier(
    celeba: Annotated[Path, typer.Option(
        metavar="DIR", help="CelebA: img_align_celeba/ and list_attr_celeba.txt.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="FILE",
        help="The classifier file to write (registry role attributes).", show_default=False)],
    epochs: Annotated[int, typer.Option(callback=within(1, 10000), metavar="N",
                                        help="Passes over the train split.")] = 20,
    lr: Annotated[float, typer.Option(callback=within(1e-8, 1.0), metavar="X",
                                      help="Adam learning rate.")] = 1e-3,
    batch_size: FixedBatch = 128,
    limit: Annotated[int | None, typer.Option(
        callback=within(10, 10**7), show_default=False, metavar="N",
        help="Use only the first N images of the attribute list (a quick trial).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the stopped run of -o FILE (its FILE.resume.pt), or report "
                         "the finished one; without it an existing run or file is refused.")
    ] = False,
    *,
    opts: Common,
) -> None:
    """Train the CelebA 40-attribute classifier AMA uses (MobileNet-v1, mish; resumable)."""
    from .evaluation.classifier import accuracy_table, check_resume
    from .evaluation.classifier import train_classifier as run
    from .workers import StopSignals

    check_resume(output, resume=resume, overwrite=opts.overwrite)
    StopSignals.hint(f"continue with the same command and --resume "
                     f"(clipinvert eval train-classifier … -o {output} --resume)")
    result = run(celeba, output, epochs=epochs, batch_size=batch_size, lr=lr,
                 seed=opts.seed, device=opts.device, workers=worker_count(opts.workers),
                 resume=resume, overwrite=opts.overwrite, limit=limit,
                 progress=not opts.quiet, log=(lambda line: None) if opts.quiet else _say)
    if not opts.quiet:
        for line in accuracy_table(result.accuracy):
            _say(line)
    print(result.output)  # the result on stdout: the classifier file
