"""What produced the files in an output folder, so that a rerun resumes only the same work.

Resuming by file names alone is wrong as soon as a user reruns into the same ``-o`` with another
prompt, strength or model: every output "exists", everything is skipped, the old images stay and
the report names the new settings.  So every run records, inside OUT, the *settings* that
produce its outputs (command, domain, the model files' identity, conditions, strength, sizes —
never batch size or worker count, which do not change a pixel) and which outputs were made with
them.  A rerun skips an output only when it was made with the same settings; a rerun with other
settings into a folder that holds outputs of different ones is refused before any work.

The manifest is ``OUT/.clipinvert-manifest.jsonl`` (hidden, so a folder of outputs can be used as
the next command's input without it being read as an image):

* ``{"settings": {...}, "fingerprint": "…"}`` once per distinct settings;
* ``{"fingerprint": "…", "outputs": ["rel/path.png", …]}`` written *before* those files are
  written.  Outputs are written atomically (whole or not at all), so a file that exists and is
  recorded is a finished output of those settings, even after a SIGKILL between the two steps.

It is an append-only JSON-lines file: appending one line per batch costs nothing even for runs of
100,000 images, and a line torn by a crash is ignored when reading.  At the end of a run it is
rewritten compactly (atomically), keeping only outputs that still exist.

Under torchrun every process appends to a part of its own,
``OUT/.clipinvert-manifest.rank<R>.jsonl`` (appends from several machines to one file on a
shared folder could interleave); every reader reads the main file and all parts, and rank 0
folds the parts into the main file when all processes are done.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import UsageError
from .fileio import append_line, atomic_write_text

MANIFEST_NAME = ".clipinvert-manifest.jsonl"
PART_NAME = ".clipinvert-manifest.rank{}.jsonl"  # one process's part under torchrun


def json_safe(value: object) -> object:
    """``value`` with every non-finite float replaced by its name, so JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(settings: Mapping[str, object]) -> str:
    """A short, stable hash of the settings (key order does not matter)."""
    text = json.dumps(json_safe(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_difference(old: Mapping[str, object], new: Mapping[str, object],
                        limit: int = 3) -> str:
    """``strength 1.0 → 0.5; conditions […] → […]``: what changed, for the refusal line."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            parts.append(f"{key} {_short(a)} → {_short(b)}")
    more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def _short(value: object, width: int = 60) -> str:
    text = json.dumps(json_safe(value), sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


class Manifest:
    """The settings/outputs record of one output folder."""

    def __init__(self, folder: Path, part: int | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        # where this process appends: its own part under torchrun
        self.append_path = self.path if part is None else \
            self.folder / PART_NAME.format(part)
        self.settings: dict[str, dict] = {}  # fingerprint -> settings
        self.outputs: dict[str, str] = {}  # posix path relative to folder -> fingerprint

    @classmethod
    def load(cls, folder: Path, part: int | None = None) -> Manifest:
        """The record of ``folder``: the main file and every process's part."""
        man = cls(folder, part)
        for path in [man.path, *man.part_files()]:
            man._read(path)
        return man

    def part_files(self) -> list[Path]:
        return sorted(self.folder.glob(PART_NAME.format("*")))

    def _read(self, path: Path) -> None:
        """Read one manifest file defensively: whatever a crash, a full disk or a stray edit
        left (torn lines, garbage, bytes that are not UTF-8, records of the wrong shape) is
        skipped line by line, never an error.  What is lost is only "this output is ours", so
        at worst an output is redone or refused as foreign, never taken for finished."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
        for raw in data.splitlines():
            try:
                rec = json.loads(raw.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError included
                continue  # a line torn by a crash: its outputs were never written
            if not isinstance(rec, dict) or not isinstance(rec.get("fingerprint"), str):
                continue
            fp = rec["fingerprint"]
            if isinstance(rec.get("settings"), dict):
                self.settings[fp] = rec["settings"]
            outputs = rec.get("outputs")
            for rel in outputs if isinstance(outputs, list) else ():
                if isinstance(rel, str):
                    self.outputs[rel] = fp

    def key(self, path: Path) -> str:
        """The manifest's name for an output path (relative to the folder when inside it)."""
        path = Path(path)
        try:
            return path.relative_to(self.folder).as_posix()
        except ValueError:
            return path.as_posix()

    def made_with(self, path: Path) -> str | None:
        """Fingerprint of the settings that made ``path``, if it is recorded."""
        return self.outputs.get(self.key(path))

    def conflicts(self, fp: str) -> list[tuple[str, str]]:
        """Existing outputs recorded with settings other than ``fp``: ``[(rel, their fp)]``."""
        return [(rel, other) for rel, other in self.outputs.items()
                if other != fp and (self.folder / rel).exists()]

    def _append(self, record: dict) -> None:
        line = json.dumps(json_safe(record), sort_keys=True, default=str, allow_nan=False)
        append_line(self.append_path, line)  # a full disk: DiskFullError, before any output

    def begin(self, settings: Mapping[str, object]) -> str:
        """Record ``settings`` (once) and return their fingerprint."""
        fp = fingerprint(settings)
        if fp not in self.settings:
            self.settings[fp] = json_safe(dict(settings))  # type: ignore[assignment]
            self._append({"fingerprint": fp, "settings": self.settings[fp]})
        return fp

    def record(self, paths: Iterable[Path], fp: str) -> None:
        """Note that ``paths`` are about to be written with settings ``fp``."""
        keys = [self.key(p) for p in paths]
        keys = [k for k in keys if self.outputs.get(k) != fp]
        if not keys:
            return
        for k in keys:
            self.outputs[k] = fp
        self._append({"fingerprint": fp, "outputs": keys})

    def compact(self) -> None:
        """Rewrite the main file with only the outputs that exist (atomic), then drop the parts
        it now holds.  Under torchrun only rank 0 does this, once every process is done."""
        alive: dict[str, list[str]] = {}
        for rel, fp in self.outputs.items():
            if (self.folder / rel).exists():
                alive.setdefault(fp, []).append(rel)
        self.outputs = {rel: fp for fp, rels in alive.items() for rel in rels}
        lines = []
        for fp, settings in self.settings.items():
            if fp in alive:
                lines.append({"fingerprint": fp, "settings": settings})
                lines.append({"fingerprint": fp, "outputs": sorted(alive[fp])})
        self.settings = {fp: s for fp, s in self.settings.items() if fp in alive}
        text = "".join(json.dumps(rec, sort_keys=True, allow_nan=False) + "\n" for rec in lines)
        parts = self.part_files()
        if text or self.path.exists():
            atomic_write_text(self.path, text)
        for p in parts:  # folded into the main file above
            p.unlink(missing_ok=True)
