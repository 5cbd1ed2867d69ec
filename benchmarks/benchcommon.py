"""What the benchmark scripts share: work folders, argument types, plain-text tables.

The scripts run as ``python benchmarks/bench_*.py``, so this folder is on ``sys.path`` and they
import this module by its plain name.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Clock:
    """Wall-clock timing that waits for queued CUDA work, so a stage is charged its own kernels
    rather than the next stage's (CUDA launches return before the work is done)."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            import torch  # not at the top: bench_train's parent process never imports torch

            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], T]) -> tuple[float, T]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


class BusyLoad:
    """``processes`` busy loops, each as hungry for a core as any other process, for as long as
    the ``with`` block runs: a loaded machine (CI, a shared box, a build beside the run) on
    demand, so that thread counts can be judged where they are used and not only on an idle
    machine.  Every loop is stopped at the end of the block, whatever happens in it."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyLoad:
        for _ in range(self.processes):
            self._procs.append(subprocess.Popen(
                [sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()
        self._procs.clear()

    @property
    def running(self) -> int:
        return sum(proc.poll() is None for proc in self._procs)


def psnr_8bit(mse: float) -> float:
    """PSNR in dB of 8-bit pictures whose mean squared difference is ``mse`` (grey levels²)."""
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def write_once(path: Path, write: Callable[[Path], Path]) -> bool:
    """Write ``path`` unless it exists; through a temporary name so an interrupted run never
    leaves a truncated checkpoint that the next run would reuse.  True if it was written."""
    if path.is_file():
        return False
    tmp = path.with_name(path.name + ".partial")
    written = write(tmp)
    os.replace(written, path)
    return True


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_meta(device: Any) -> dict[str, Any]:
    """What a figure was measured on: the device, its name (GPU or CPU model), torch's version
    and its thread count."""
    import torch

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *,
                 text_last: bool = False) -> str:
    """Plain aligned text (first column left, figures right; the last one left too when it
    holds notes): pastes cleanly into issues."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 or (text_last and i == last) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

def open_workdir(given: Path | None, prefix: str = "clipinvert-bench-"
                 ) -> tuple[Path, set[str] | None]:
    """The run's work folder, and the names already in it (None when this run made the folder,
    so that all of it goes at the end)."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), None
    workdir = given.expanduser().resolve()
    if not workdir.exists():
        workdir.mkdir(parents=True)
        return workdir, None
    if not workdir.is_dir():
        raise NotADirectoryError(f"--workdir is not a folder: {workdir}")
    return workdir, {entry.name for entry in workdir.iterdir()}


def clean_workdir(workdir: Path, before: set[str] | None) -> None:
    """Delete what the run wrote: the whole folder if the run made it, else the new entries."""
    if before is None:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for entry in workdir.iterdir():
        if entry.name in before:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def add_workdir_arguments(p: argparse.ArgumentParser, holds: str) -> None:
    """``--workdir``, ``--keep`` and ``--json``: where a benchmark keeps what it writes
    (``holds`` names it for the help) and whether it is kept."""
    p.add_argument("--workdir", type=Path, default=None,
                   help=f"folder for everything the run writes: {holds} and the safetensors "
                        "cache ($CLIPINVERT_HOME is set inside it, so ~/.cache/clipinvert is "
                        "never touched); existing checkpoints are reused (default: a fresh "
                        "temporary folder)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work folder at the end; without it the folder is deleted, "
                        "or, if --workdir already existed, everything this run added to it")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the figures as JSON to this file")
