"""Process settings for CPU throughput: the allocator and the thread budget."""

from __future__ import annotations

import pytest

from clipinvert import runtime
from clipinvert.errors import UsageError


@pytest.mark.parametrize(("cores", "asked", "device", "expect"), [
    (2, None, "cpu", (2, 0)),  # decoding inline: the model keeps both cores
    (4, None, "cpu", (4, 0)),
    (8, None, "cpu", (7, 1)),
    (16, None, "cpu", (13, 3)),
    (2, 1, "cpu", (1, 1)),  # asked for: honoured, the model gets what is left
    (2, 4, "cpu", (1, 4)),
    (16, None, "cuda", (4, 4)),  # 4 decode workers, 8 output writers, 4 torch threads
    (8, None, "cuda", (1, 3)),  # 4 writers + 3 workers + 1 thread: the 8 cores
    (2, None, "cuda", (1, 1)),
])
def test_thread_budget_fits_the_cores(monkeypatch: pytest.MonkeyPatch, cores: int,
                                      asked: int | None, device: str,
                                      expect: tuple[int, int]) -> None:
    monkeypatch.setattr(runtime, "cpu_count", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("CLIPINVERT_WRITER_THREADS", raising=False)
    assert runtime.thread_budget(asked, device=device) == expect
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting fixes torch's share
    assert runtime.thread_budget(asked, device=device)[0] == 3


def test_allocator_tuning_can_be_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_TUNED", None)
    monkeypatch.setenv("CLIPINVERT_MALLOC", "system")
    assert runtime.tune_allocator() is False
    monkeypatch.setattr(runtime, "_TUNED", None)
    monkeypatch.delenv("CLIPINVERT_MALLOC")
    import sys

    # glibc on Linux (this machine): mallopt accepts both settings
    assert runtime.tune_allocator() is sys.platform.startswith("linux")
    assert runtime.tune_allocator() is runtime._TUNED  # idempotent


@pytest.mark.parametrize(("cores", "local", "device", "expect"), [
    (2, "1", "cpu", 0), (4, "1", "cpu", 0), (8, "1", "cpu", 1), (8, "2", "cpu", 0),
    (2, "1", "cuda", 1), (16, "1", "cuda", 8), (16, "2", "cuda", 4), (64, "1", "cuda", 8),
])
def test_output_writer_threads(monkeypatch: pytest.MonkeyPatch, cores: int, local: str,
                               device: str, expect: int) -> None:
    monkeypatch.setattr(runtime, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)  # torchrun: this process's share of cores
    monkeypatch.delenv("CLIPINVERT_WRITER_THREADS", raising=False)
    assert runtime.writer_threads(device) == expect
    monkeypatch.setenv("CLIPINVERT_WRITER_THREADS", "3")
    assert runtime.writer_threads(device) == 3
    monkeypatch.setenv("CLIPINVERT_WRITER_THREADS", "four")
    with pytest.raises(UsageError, match="CLIPINVERT_WRITER_THREADS"):
        runtime.writer_threads(device)
