"""``CLIPINVERT_TIMING=1``: one stderr line per phase of a run, and totals at its end.

Why: a batch run's time goes to start-up (imports, CUDA init, weight loads, text embedding),
the first batch, then the steady state split between the main thread, the reader and writer
threads and the model.  Issue 20's targets are stated in those terms, so the command reports
them itself instead of a profiler session per question.

Zero cost when off: :data:`ENABLED` is read once at import; :func:`phase` then hands back one
shared null context and :func:`add` returns at its first line.  Lines look like::

    clipinvert timing: weight loads 812.4 ms
    clipinvert timing: totals: 64 images, main thread 0.41 ms/image, readers 1.9 core-ms/image, …

Core-ms are ``time.thread_time()`` of the thread doing the work (CPU time, not wall time): what
the work would cost on a machine with enough cores, the figure that scales.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["ENABLED", "add", "emit", "enabled", "phase", "since_start", "totals"]


def _on(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


ENABLED: bool = _on(os.environ.get("CLIPINVERT_TIMING"))
PREFIX = "clipinvert timing:"

_lock = threading.Lock()
_sums: dict[str, float] = {}  # seconds, by key (thread-safe through _lock)
_NULL = contextlib.nullcontext()
_gpu_spans: list[GpuSpans] = []  # the run's CUDA event recorders (summary reads them)


def enabled() -> bool:
    """Whether timing lines are printed (``CLIPINVERT_TIMING`` when this module was imported,
    or :func:`set_enabled`)."""
    return ENABLED


def set_enabled(on: bool) -> None:
    """Turn timing on or off in-process (tests, benchmarks); clears the totals."""
    global ENABLED
    ENABLED = on
    reset()


def sync_debug() -> bool:
    """``CLIPINVERT_SYNC_DEBUG=1``: a CUDA run warns at every call that waits for the GPU once
    the models are loaded (``torch.cuda.set_sync_debug_mode``), to find any in the loop."""
    return _on(os.environ.get("CLIPINVERT_SYNC_DEBUG"))


def emit(line: str) -> None:
    """One timing line on stderr (stdout is for results only)."""
    print(f"{PREFIX} {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stopwatch(done: Callable[[float], None]) -> Iterator[None]:
    """Hands the block's wall time in seconds to ``done``, however the block ends."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        done(time.perf_counter() - t0)


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """A block whose wall time is printed as ``<name> <ms> ms`` when timing is on."""
    return _stopwatch(lambda s: emit(f"{name} {s * 1000:.1f} ms")) if ENABLED else _NULL


def add(key: str, seconds: float) -> None:
    """Add to a running total (reader/writer core time, model time); nothing when off."""
    if not ENABLED:
        return
    with _lock:
        _sums[key] = _sums.get(key, 0.0) + seconds


def totals() -> dict[str, float]:
    """The running totals so far (seconds by key), a copy."""
    with _lock:
        return dict(_sums)


def reset() -> None:
    with _lock:
        _sums.clear()


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        return uptime - int(fields[19]) / ticks  # field 22 of stat: start time since boot
    except (OSError, ValueError, IndexError):
        return None


def since_start(name: str) -> None:
    """``<name> <ms> ms since process start`` (imports and option parsing, before a run)."""
    if not ENABLED:
        return
    age = process_age()
    if age is not None:
        emit(f"{name} {age * 1000:.0f} ms since process start")


def summary(images: int, main_s: float, extra: dict[str, float] | None = None) -> None:
    """The totals line of a run: per image, the main thread's CPU ms, the readers' and
    writers' core-ms, the model's ms (wall, or GPU ms from CUDA events) and, when measured, the
    GPU's idle share between batches."""
    if not ENABLED or images <= 0:
        return
    sums = {**totals(), **(extra or {})}
    while _gpu_spans:
        sums.update(_gpu_spans.pop().result())
    per = 1000.0 / images
    parts = [f"{images} images", f"main thread {main_s * per:.2f} ms/image",
             f"readers {sums.get('reader', 0.0) * per:.2f} core-ms/image",
             f"writers {sums.get('writer', 0.0) * per:.2f} core-ms/image",
             f"model {sums.get('model', 0.0) * per:.2f} ms/image"]
    if "gpu" in sums:
        parts.append(f"GPU {sums['gpu'] * per:.2f} ms/image")
    if "gpu_idle" in sums:
        parts.append(f"GPU idle between batches {sums['gpu_idle'] * 100:.1f} %")
    emit("totals: " + ", ".join(parts))


def total(key: str) -> contextlib.AbstractContextManager[None]:
    """A block whose wall time is added to the total ``key`` when timing is on."""
    return _stopwatch(lambda s: add(key, s)) if ENABLED else _NULL


class GpuSpans:
    """The GPU's busy time per batch and its idle share between batches, from CUDA events.

    :meth:`start` and :meth:`end` record an event on the current stream around one batch's
    device work (they queue, never wait); :meth:`result` synchronises once, at the end of the
    run, and adds ``gpu`` (busy seconds) and ``gpu_idle`` (the share of the span from the first
    batch's start to the last one's end when the stream had nothing queued) to the totals.
    Nothing is recorded when timing is off or the device is not CUDA.
    """

    def __init__(self, device: object) -> None:
        self.on = ENABLED and getattr(device, "type", None) == "cuda"
        self._spans: list[tuple[object, object]] = []
        self._open: object | None = None
        if self.on:
            _gpu_spans.append(self)  # read by summary() at the end of the run

    def start(self) -> None:
        if self.on:
            import torch

            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()  # type: ignore[attr-defined]

    def end(self) -> None:
        if self.on and self._open is not None:
            import torch

            done = torch.cuda.Event(enable_timing=True)
            done.record()
            self._spans.append((self._open, done))
            self._open = None

    def result(self) -> dict[str, float]:
        if not self._spans:
            return {}
        self._spans[-1][1].synchronize()  # type: ignore[attr-defined]
        return gpu_idle(self._spans)


def gpu_idle(spans: list[tuple[object, object]]) -> dict[str, float]:
    """``{"gpu": busy seconds, "gpu_idle": idle share}`` from ``(start, end)`` pairs of CUDA
    events (anything with ``elapsed_time(other) -> ms``), in order.  The first batch's start
    is the origin; overlapping spans count once."""
    first = spans[0][0]
    busy_ms = 0.0
    reach = 0.0  # how far along the busy time reaches, ms after ``first``
    for s, e in spans:
        a = first.elapsed_time(s)  # type: ignore[attr-defined]
        b = first.elapsed_time(e)  # type: ignore[attr-defined]
        busy_ms += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    idle = 1.0 - busy_ms / reach if reach > 0 else 0.0
    return {"gpu": busy_ms / 1000.0, "gpu_idle": idle}
