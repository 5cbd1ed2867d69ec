"""The evaluation report: one JSON schema for `eval metrics` and `eval benchmark`, a terminal
table, and ``summary.png`` (docs/evaluation.md#report).

The JSON holds what is needed to trust and reproduce a number: the tool version, the command
and its parameters, every model file with its sha256, the options of the metrics, the seeds,
every scored pair with its own scores, what was skipped and why, and each metric overall and
per attribute under ``metrics`` / ``details``.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, atomic_write_json
from ..manifest import json_safe
from .metrics import METRICS
from .score import Scores

SCHEMA = "clipinvert-eval/1"


def build_report(scores: Scores, *, command: str, params: dict[str, Any],
                 domain: str, device: str, files: dict[str, Path], options: dict[str, Any],
                 source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from .. import __version__
    from ..weights.cache import file_identity

    pairs = []
    for i, (pair, ok) in enumerate(zip(scores.pairs, scores.scored, strict=True)):
        rec: dict[str, Any] = {"input": str(pair.input), "output": str(pair.output),
                               "prompt": pair.prompt, "status": "scored" if ok else "skipped"}
        if pair.attributes:
            rec["attributes"] = list(pair.attributes)
        if pair.transform is not None:
            rec["transform"] = str(pair.transform)
        if pair.resize is not None:
            rec["resize"] = pair.resize
        rec["scores"] = {name: r.per_pair[i] for name, r in scores.results.items()
                         if i in r.per_pair}
        pairs.append(rec)
    return json_safe({
        "tool": "clipinvert", "version": __version__, "schema": SCHEMA, "command": command,
        "params": params, "domain": domain, "device": device,
        "started": datetime.now(timezone.utc).isoformat(),
        "models": {role: file_identity(path) for role, path in sorted(files.items())},
        "options": options, "pairs_source": source,
        "counts": {"pairs": len(scores.pairs), "scored": sum(scores.scored),
                   "skipped": len(scores.skipped), "without_prompt": scores.unprompted,
                   "resized": len(scores.resized)},
        "metrics": scores.values(),
        "details": {name: r.to_dict() for name, r in scores.results.items()},
        "skipped": [{"what": w, "why": y} for w, y in scores.skipped],
        "notes": scores.notes,
        "resized": scores.resized,
        **(extra or {}),
        "pairs": pairs,
    })  # type: ignore[return-value]


def write_report(report: dict[str, Any], path: Path) -> None:
    atomic_write_json(path, report)


def format_value(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if name.startswith("ama"):
        return f"{100 * value:.1f} %"
    if name == "mse":
        return f"{value:.4f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def print_table(report: dict[str, Any], console: Any) -> None:
    """The scores as a rich table (stderr): metric, value, better, pairs, what it is."""
    from rich.table import Table

    table = Table(title=f"clipinvert eval — {report['domain']} "
                        f"({report['counts']['scored']} scored, "
                        f"{report['counts']['skipped']} skipped)")
    for col in ("metric", "value", "better", "n", "what"):
        table.add_column(col, justify="right" if col in ("value", "n") else "left")
    for name, value in report["metrics"].items():
        cls = METRICS[name]
        table.add_row(name, format_value(name, value), "↑" if cls.higher_is_better else "↓",
                      str(report["details"][name]["count"]), cls.description)
    console.print(table)


def write_summary(report: dict[str, Any], path: Path, *, samples: int = 6) -> None:
    """``summary.png``: per-attribute accuracy bars of each AMA, and sample input | edit rows."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from .. import imaging
    from .pairs import Pair
    from .score import read_pair

    bars = {name: d["per_attribute"] for name, d in report["details"].items()
            if name.startswith("ama_") and d.get("per_attribute")}  # accuracies, in %
    shown = [p for p in report["pairs"] if p["status"] == "scored"][:samples]
    rows = len(bars) + len(shown)
    fig = plt.figure(figsize=(10, 2.6 * max(rows, 1)))
    grid = fig.add_gridspec(max(rows, 1), 2)
    for r, (name, per) in enumerate(bars.items()):
        ax = fig.add_subplot(grid[r, :])
        labels = list(per)
        ax.barh(labels, [100 * v for v in per.values()], color="#4c72b0")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(f"{name}: {format_value(name, report['metrics'].get(name))}")
        ax.tick_params(axis="y", labelsize=7)
    for k, rec in enumerate(shown):
        r = len(bars) + k
        pair = Pair(Path(rec["input"]), Path(rec["output"]), rec.get("prompt"),
                    transform=Path(rec["transform"]) if rec.get("transform") else None,
                    resize=rec.get("resize"))
        try:
            source, output = read_pair(pair)
        except Exception:  # noqa: BLE001 - a sample that cannot be shown is left blank
            continue
        for c, (image, title) in enumerate(((source, "input"),
                                            (output, rec.get("prompt") or "output"))):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(imaging.to_pil(imaging.to_tensor([image], 256))[0])
            ax.set_title(title if len(title) < 60 else title[:57] + "…", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
