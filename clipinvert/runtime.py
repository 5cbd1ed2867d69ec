"""Process-level settings that decide CPU throughput: the allocator and the thread budget.

Measured on a 2-core machine at 1024 px (docs/performance.md): a StyleGAN2 decode allocates
tensors of 100 MB and more at every layer.  glibc serves such blocks with ``mmap`` and gives
them back with ``munmap`` when freed, so every layer of every image touches fresh pages and the
kernel zero-fills them — over half of the run's CPU time went to page faults (14.8 million minor
faults for nine decodes; 2.9 s per image instead of 1.2 s).  :func:`tune_allocator` makes glibc
serve large blocks from its heap and keep freed memory for reuse (``mallopt``), so from the
second image on the same pages are reused.  The price is that the process keeps its peak memory
until it exits, which a command-line run does anyway.

:func:`thread_budget` keeps PyTorch's threads plus the decode/alignment worker processes within
the machine's cores: on two cores one worker beside two PyTorch threads made the model wait.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from .errors import UsageError

__all__ = ["cpu_count", "thread_budget", "tune_allocator", "writer_threads"]

# <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_TUNED: bool | None = None


def tune_allocator() -> bool:
    """Keep large freed blocks in the process for reuse (glibc on Linux); idempotent.

    Returns whether the allocator was tuned.  ``CLIPINVERT_MALLOC=system`` leaves it alone
    (e.g. a long-lived notebook kernel that must give memory back between runs).  The CLI
    calls this once at start; a notebook may call it before its first edit.
    """
    global _TUNED
    if _TUNED is not None:
        return _TUNED
    _TUNED = False
    if os.environ.get("CLIPINVERT_MALLOC", "").strip().lower() == "system":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # No mmap'd blocks (so nothing is unmapped on free), and never trim the heap's top.
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _TUNED = bool(ok)
    return _TUNED


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _local_cores() -> int:
    """This process's share of the cores: torchrun starts LOCAL_WORLD_SIZE on a machine."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cpu_count() // (int(local) if local.isdigit() and int(local) > 0 else 1))


def writer_threads(device: str) -> int:
    """Threads encoding output images beside the model.

    On a GPU the model is the smaller part (about 6 ms per 1024 px decode at B = 8 on an H200,
    against about 65 ms to encode one PNG at level 1), so the writers get half of this
    process's cores, at most 8.  On a CPU of more than 4 cores, 1; below that none (write
    inline): a PNG is about 2 % of an edit there, not worth a core taken from the model.
    ``CLIPINVERT_WRITER_THREADS=N`` sets the number (0 = inline).
    """
    env = os.environ.get("CLIPINVERT_WRITER_THREADS", "").strip()
    if env:
        if not env.isdigit():
            raise UsageError(f"CLIPINVERT_WRITER_THREADS={env!r}: give a number, 0 or more")
        return int(env)
    if device != "cpu":
        return max(1, min(8, _local_cores() // 2))
    return 1 if _local_cores() > 4 else 0


def thread_budget(workers: int | None, *, device: str) -> tuple[int, int]:
    """``(torch_threads, workers)`` for an image command, so that together they fit the cores.

    On the CPU the model's threads are the work and decoding is small beside it, so by default
    (``workers`` None) the workers get a quarter of the cores beyond the first — none on 2 to 4
    cores, where decoding inline costs less than taking a core from the model — and PyTorch the
    rest.  Workers asked for explicitly are honoured and PyTorch gets what they leave (at least
    one thread); ``OMP_NUM_THREADS`` set by the user fixes PyTorch's share.  On a GPU the
    output writers (:func:`writer_threads`) take their share first, the workers feed the
    device (default ``min(4, cores − 1 − writers)``, at least 1), and PyTorch, which computes
    little there, keeps the rest.
    """
    cores = _local_cores()
    writers = 0 if device == "cpu" else writer_threads(device)
    if workers is None:
        workers = (cores - 1) // 4 if device == "cpu" else max(1, min(4, cores - 1 - writers))
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(env) if env.isdigit() and int(env) > 0 else max(1, cores - workers - writers)
    return threads, workers
