"""`clipinvert eval metrics` as a function a notebook can call: :func:`evaluate_pairs`.

Reads the pairs, picks the metrics, names every missing weight file at once (exit 3) before any
network loads, scores, and writes ``OUT/clipinvert-report.json`` and ``OUT/summary.png``.
docs/evaluation.md
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DiskFullError, UsageError
from ..registry import Registry
from .metrics import EvalOptions
from .pairs import REPORT_NAME, PairSet, read_pairs
from .report import SCHEMA, build_report, write_report, write_summary
from .score import needed_roles, parse_metrics, score_pairs


def check_eval_output(output: Path, report: Path | None = None) -> Path:
    """The report path; never one holding another command's report (an edit run's, say)."""
    path = report or output / REPORT_NAME
    if path.is_file():
        try:
            schema = json.loads(path.read_text(encoding="utf-8")).get("schema")
        except (OSError, ValueError, AttributeError):
            schema = None
        if schema != SCHEMA:
            raise UsageError(f"{path} exists and is not an eval report: choose another -o "
                             "(eval never replaces another run's report)")
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} is a file, not a folder")
    return path


def evaluate_pairs(pairs: PairSet | Path | str, output: Path, *, domain: str = "faces",
                   registry: Registry | None = None, metrics: str | Sequence[str] | None = None,
                   options: EvalOptions | None = None, device: str = "auto",
                   batch_size: int = 16, fid_reference: Path | None = None,
                   report_path: Path | None = None, summary: bool = True,
                   trust: bool = False, params: dict[str, Any] | None = None,
                   quiet: bool = False,
                   command: str = "eval metrics", extra: dict[str, Any] | None = None,
                   log: Callable[[str], None] = print,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Score a set of (input, output, prompt) pairs; returns the report (also written)."""
    from .. import imaging
    from ..pipeline import resolve_device
    from .networks import Networks

    output = Path(output)
    path = check_eval_output(output, report_path)
    pair_set = pairs if isinstance(pairs, PairSet) else read_pairs(Path(pairs))
    options = options or EvalOptions()
    names = parse_metrics(metrics, any(p.prompt for p in pair_set.pairs))
    registry = registry or Registry.load()
    dom = registry.domain(domain)
    files = registry.locate_all(dom, needed_roles(names, dom, options))
    reference = None
    if fid_reference is not None:
        if "fid" not in names:
            raise UsageError("--fid-reference is only used by the fid metric")
        reference = [p for p, _ in imaging.list_inputs(Path(fid_reference))]
        if len(reference) < 2:
            raise UsageError(f"--fid-reference {fid_reference}: FID needs at least 2 images")
    torch_device = resolve_device(device)
    networks = Networks(files, dom, device=torch_device, trust=trust)
    with _progress_bar(len(pair_set), quiet) as bar:
        scores = score_pairs(pair_set, names, networks, options=options,
                             batch_size=batch_size, reference=reference, log=log,
                             progress=progress or bar)
    if not any(scores.scored):
        raise UsageError(f"no pair of {pair_set.source} could be scored "
                         f"({len(scores.skipped)} skipped; the lines above say why)")
    report = build_report(scores, command=command, params=params or {}, domain=domain,
                          device=str(torch_device), files=files,
                          options=dataclasses.asdict(options), source=pair_set.source,
                          extra=extra)
    output.mkdir(parents=True, exist_ok=True)
    try:
        write_report(report, path)
    except DiskFullError as exc:  # atomic: no report at all, or the previous one whole
        raise DiskFullError(f"{exc}: the scores were not saved; free space and run the same "
                            "command again", exc.path) from None
    if summary:
        try:
            write_summary(report, output / "summary.png")
        except DiskFullError as exc:
            raise DiskFullError(f"{exc}: the report {path} is written, summary.png is not; "
                                "free space and run the same command again", exc.path) from None
    return report


@contextlib.contextmanager
def _progress_bar(total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """Pairs scored, on stderr, as the edit commands show images (only on a terminal)."""
    from rich.console import Console

    from ..batch import make_progress

    with make_progress(Console(stderr=True), quiet) as progress:
        task = progress.add_task("scoring", total=total)
        yield lambda n: progress.advance(task, n)
