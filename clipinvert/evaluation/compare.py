"""`clipinvert eval compare`: eval reports side by side (docs/evaluation.md#compare)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .metrics import METRICS
from .report import SCHEMA, format_value


def read_reports(paths: Sequence[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(label, report) of each file; the label is the run's folder name (file name if they
    clash).  A file that is not an eval report is one usage-error line."""
    out = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from None
        if not isinstance(report, dict) or report.get("schema") != SCHEMA:
            raise UsageError(f"{path} is not a clipinvert eval report")
        out.append((Path(path).resolve().parent.name, report))
    labels = [label for label, _ in out]
    if len(set(labels)) < len(labels):
        out = [(str(p), r) for p, (_, r) in zip(paths, out, strict=True)]
    return out


def compare_table(reports: Sequence[tuple[str, dict[str, Any]]], *, attributes: bool = False):
    """A rich table: metrics (and per-attribute accuracies) down, reports across."""
    from rich.table import Table

    table = Table(title="clipinvert eval compare")
    table.add_column("metric")
    table.add_column("better")
    for label, r in reports:
        table.add_column(f"{label}\n({r.get('domain')}, {r['counts']['scored']} pairs)",
                         justify="right")
    names = [n for n in METRICS if any(n in r["metrics"] for _, r in reports)]
    for name in names:
        table.add_row(name, "↑" if METRICS[name].higher_is_better else "↓",
                      *(format_value(name, r["metrics"].get(name)) for _, r in reports))
        if attributes:
            keys = sorted({k for _, r in reports
                           for k in r["details"].get(name, {}).get("per_attribute", {})})
            for key in keys:
                table.add_row(f"  {key}", "", *(
                    format_value(name, r["details"].get(name, {}).get("per_attribute", {})
                                 .get(key)) for _, r in reports))
    return table
