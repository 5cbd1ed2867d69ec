"""Clean stops with real processes: Ctrl-C, SIGTERM and SIGKILL of a running ``edit`` with workers.

Signals are the point, so these run the CLI as a subprocess in its own session (like a terminal
job) and look at its worker processes through /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from clipinvert.workers import StopSignals, Terminated, worker_init

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"),
                                reason="needs POSIX process groups and /proc")

FIRST_OUTPUT_TIMEOUT = 90.0  # model loading on a loaded 2-core machine
STOP_TIMEOUT = 60.0  # in-flight inputs finish, the report is written
GONE_TIMEOUT = 10.0  # orphaned workers notice (PDEATHSIG: at once; watchdog: 0.5 s)
INTERRUPTED = "clipinvert: interrupted — run the same command again to resume"
TERMINATED = "clipinvert: terminated — run the same command again to resume"


# ---------------------------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float = GONE_TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# A running edit
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, face_crop: Image.Image) -> Path:
    folder = tmp_path_factory.mktemp("signal-inputs")
    for i in range(40):
        face_crop.save(folder / f"face{i:02d}.png")
    return folder


@pytest.fixture
def running(inputs: Path, tiny_models: Path, tmp_path: Path) -> Iterator[tuple]:
    """Start ``edit`` with two workers; wait for its first output and for both workers."""
    out = tmp_path / "out"
    log = (tmp_path / "stderr.txt").open("w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CLIPINVERT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipinvert.cli", "edit", str(inputs), "a prompt", "-o", str(out),
         "--models", str(tiny_models), "--domain", "tiny", "--device", "cpu", "--workers", "2",
         "-b", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + FIRST_OUTPUT_TIMEOUT
        while not (out.is_dir() and any(out.glob("*.png"))) or len(workers) < 2:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"edit ended early with {proc.returncode}:\n{log.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no output and two workers within "
                            f"{FIRST_OUTPUT_TIMEOUT:.0f}s")
            workers = _children(proc.pid)
            time.sleep(0.1)
        yield proc, out, workers, log
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for pid in workers:  # never leave a worker behind, whatever went wrong
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


def _finish(proc: subprocess.Popen, log) -> str:
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not stop within {STOP_TIMEOUT:.0f}s")
    log.seek(0)
    return log.read()


def _assert_clean_stop(out: Path, err: str, line: str) -> None:
    assert "Traceback" not in err, err
    assert err.count(line) == 1, err
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["interrupted"] is True and report["counts"]["done"] < 40
    for record in report["inputs"]:
        assert all(Path(p).exists() for p in record.get("outputs", []))
    for png in out.rglob("*.png"):  # whole files only: finished or never there
        with Image.open(png) as im:
            im.load()


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, to_group, code, line", [
    (signal.SIGINT, True, 130, INTERRUPTED),  # what a terminal does on Ctrl-C: the whole group
    (signal.SIGTERM, False, 143, TERMINATED),  # a service manager stopping the main process
], ids=["ctrl-c", "sigterm"])
def test_stop_signal_is_clean_with_one_line(running: tuple, signum: int, to_group: bool,
                                            code: int, line: str) -> None:
    proc, out, workers, log = running
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    err = _finish(proc, log)
    assert proc.returncode == code, err
    _assert_clean_stop(out, err, line)
    assert not _wait_gone(workers)


def test_sigkill_of_the_main_process_leaves_no_worker(running: tuple) -> None:
    proc, _, workers, _ = running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=STOP_TIMEOUT)
    assert not _wait_gone(workers), "workers outlived their killed parent"


# ---------------------------------------------------------------------------------------------
# The pieces, in-process
# ---------------------------------------------------------------------------------------------
in_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                    reason="signal handlers can only be set in the main thread")


@in_main_thread
def test_stop_signals_turns_sigterm_into_terminated_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    with pytest.raises(Terminated), stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs between bytecodes, long before this ends
    assert (stop.signum, stop.exit_code) == (signal.SIGTERM, 143)
    assert stop.message == TERMINATED
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@in_main_thread
def test_stop_signals_records_ctrl_c() -> None:
    stop = StopSignals()
    with pytest.raises(KeyboardInterrupt) as info, stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert not isinstance(info.value, Terminated)
    assert (stop.signum, stop.exit_code, stop.message) == (signal.SIGINT, 130, INTERRUPTED)


def test_worker_init_ignores_ctrl_c_and_dies_quietly_on_sigterm() -> None:
    # A forked child runs worker_init like a pool worker would, then waits for signals.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            worker_init()
            os.write(w, b"ready")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 5) == b"ready"
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert _alive(pid), "SIGINT must not stop a worker"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        os.close(r)
        if _stat(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
