"""Clean stops with real processes: Ctrl-C, SIGTERM and SIGKILL of a running command with workers.

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


class Run:
    """One ``invert`` subprocess with two decode workers, in its own session (a terminal job)."""

    def __init__(self, inputs: Path, tiny_models: Path, folder: Path) -> None:
        folder.mkdir()
        self.out = folder / "out"
        self.log = (folder / "stderr.txt").open("w+")
        # Decode workers are processes here (the readers of an unaligned run are threads by
        # default; aligning runs keep processes): what must not outlive a stop.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "CLIPINVERT_READER": "process"}
        env.pop("CLIPINVERT_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipinvert.cli", "invert", str(inputs), "-o", str(self.out),
             "--models", str(tiny_models), "--domain", "tiny", "--device", "cpu",
             "--workers", "2", "-b", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        self.workers: list[int] = []

    def ready(self) -> bool:
        """True once it wrote its first output and both workers exist."""
        if self.proc.poll() is not None:
            self.log.seek(0)
            pytest.fail(f"invert ended early with {self.proc.returncode}:\n{self.log.read()}")
        self.workers = _children(self.proc.pid)
        return self.out.is_dir() and any(self.out.glob("*.png")) and len(self.workers) >= 2

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for pid in self.workers:  # never leave a worker behind, whatever went wrong
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture
def runs(inputs: Path, tiny_models: Path, tmp_path: Path) -> Iterator[dict[str, Run]]:
    """Three runs started together (their start-up overlaps), each waited for until it is busy."""
    started = {name: Run(inputs, tiny_models, tmp_path / name)
               for name in ("ctrl-c", "sigterm", "sigkill")}
    try:
        deadline = time.monotonic() + FIRST_OUTPUT_TIMEOUT
        waiting = set(started)
        while waiting:
            waiting = {n for n in waiting if not started[n].ready()}
            if waiting and time.monotonic() > deadline:
                pytest.fail(f"no output and two workers within {FIRST_OUTPUT_TIMEOUT:.0f}s: "
                            f"{sorted(waiting)}")
            time.sleep(0.1)
        yield started
    finally:
        for run in started.values():
            run.cleanup()


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
def test_stop_signals_are_clean_and_leave_no_worker(runs: dict[str, Run]) -> None:
    # Ctrl-C in a terminal goes to the whole process group; a service manager sends SIGTERM to
    # the main process; SIGKILL (the OOM killer) gives it no chance to clean up at all.
    os.killpg(runs["ctrl-c"].proc.pid, signal.SIGINT)
    os.kill(runs["sigterm"].proc.pid, signal.SIGTERM)
    os.kill(runs["sigkill"].proc.pid, signal.SIGKILL)
    for name, code, line in (("ctrl-c", 130, INTERRUPTED), ("sigterm", 143, TERMINATED)):
        run = runs[name]
        err = _finish(run.proc, run.log)
        assert run.proc.returncode == code, (name, err)
        _assert_clean_stop(run.out, err, line)
        assert not _wait_gone(run.workers), name
    killed = runs["sigkill"]
    killed.proc.wait(timeout=STOP_TIMEOUT)
    assert not _wait_gone(killed.workers), "workers outlived their killed parent"


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
