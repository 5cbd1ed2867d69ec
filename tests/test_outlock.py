"""One writer per output folder: real concurrent runs, dead holders, stale heartbeats, and a
SIGKILL mid-run that the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from clipinvert.outlock import LOCK_NAME, FolderBusyError, Holder, OutputLock, claim_output

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX processes")

FIRST_OUTPUT_TIMEOUT = 120.0  # model loading on a loaded 2-core machine
WAIT = 240.0
N = 60  # inputs of the real runs


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **fields: object) -> Path:
    holder = {"pid": 1, "host": "elsewhere", "started": "2026-12-02T15:04:05Z",
              "token": "0123456789abcdef", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(holder))
    return path


def test_a_live_holder_refuses_with_its_pid_host_and_start(tmp_path: Path) -> None:
    first = OutputLock(tmp_path)
    assert first.acquire() is None
    try:
        with pytest.raises(FolderBusyError) as info:
            OutputLock(tmp_path).acquire()
        me = first.me
        assert str(info.value) == (
            f"{tmp_path} is in use by another clipinvert run (pid {os.getpid()} on host "
            f"{socket.gethostname()}, started {me.started}); wait for it or choose another -o")
        assert info.value.exit_code == 2
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = OutputLock(tmp_path)
    assert second.acquire() is None  # free again once released
    second.release()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid, host=socket.gethostname())
    lock = OutputLock(tmp_path)
    note = lock.acquire()
    try:
        assert note is not None and f"pid {pid} on host {socket.gethostname()}" in note
        assert Holder.parse((tmp_path / LOCK_NAME).read_bytes()) == lock.me
    finally:
        lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path: Path) -> None:
    """The holder's pid now belongs to another process (here: this one, with another start)."""
    _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), proc_start="other:1")
    lock = OutputLock(tmp_path)
    assert lock.acquire() is not None
    lock.release()


def test_stale_heartbeat_of_another_host_is_taken_over_fresh_one_is_not(tmp_path: Path) -> None:
    path = _write_lock(tmp_path)
    with pytest.raises(FolderBusyError, match="pid 1 on host elsewhere, started "
                                              "2026-12-02T15:04:05Z"):
        OutputLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    lock = OutputLock(tmp_path, stale_after=60)
    assert "took over the lock of a run that is gone (pid 1 on host elsewhere" in \
        str(lock.acquire())
    lock.release()


def test_garbage_lock_is_busy_while_fresh_and_taken_over_when_stale(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    path.write_bytes(b"\xff\x00 torn")
    with pytest.raises(FolderBusyError, match="its details unreadable"):
        OutputLock(tmp_path, stale_after=60).acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    lock = OutputLock(tmp_path, stale_after=60)
    assert lock.acquire() is not None
    lock.release()


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path, heartbeat=0.05)
    lock.acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 10
        while lock.path.stat().st_mtime < time.time() - 100:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
    finally:
        lock.release()


def test_torchrun_ranks_share_the_main_process_verdict(tmp_path: Path) -> None:
    """A rank other than 0 takes no lock and creates nothing: it follows rank 0's verdict."""
    out = tmp_path / "out"
    with claim_output(out, is_main=False, share=lambda mine: None) as lock:
        assert lock is None and not out.exists()
    with pytest.raises(FolderBusyError, match="in use"), \
            claim_output(out, is_main=False, share=lambda mine: f"{out} is in use (rank 0)"):
        pass


# ---------------------------------------------------------------------------------------------
# Real processes on the tiny domain
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, face_crop: Image.Image) -> Path:
    folder = tmp_path_factory.mktemp("lock-inputs")
    for i in range(N):
        face_crop.save(folder / f"face{i:02d}.png")
    return folder


def _command(inputs: Path, out: Path, tiny_models: Path) -> list[str]:
    return [sys.executable, "-m", "clipinvert.cli", "invert", str(inputs), "-o", str(out),
            "--models", str(tiny_models), "--domain", "tiny", "--device", "cpu",
            "--workers", "0", "-b", "1"]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CLIPINVERT_DEBUG", None)
    return env


def _outputs(out: Path) -> dict[str, tuple[int, int, int, int]]:
    """Each finished input (its image and its latent both on disk) with both files' (inode,
    mtime_ns): what a rerun must not touch."""
    found = {}
    for png in out.glob("*.png"):
        pt = png.with_suffix(".pt")
        if pt.exists():
            a, b = png.stat(), pt.stat()
            found[png.stem] = (a.st_ino, a.st_mtime_ns, b.st_ino, b.st_mtime_ns)
    return found


def test_second_run_is_refused_killed_run_is_resumed(inputs: Path, tiny_models: Path,
                                                     tmp_path: Path) -> None:
    """A doubled job: the second run is refused at once (exit 2, the holder named) and writes
    nothing.  Then the holder is SIGKILLed mid-run; the same command takes its dead lock over,
    finishes without a traceback and rewrites none of the finished outputs; a fourth run
    rewrites nothing at all.

    The tiny model edits faster than a second process starts, so the holder is frozen
    (SIGSTOP, as Ctrl-Z does) once it has written its first outputs: a stopped run is alive
    and keeps its folder."""
    out = tmp_path / "out"
    cmd = _command(inputs, out, tiny_models)
    holder = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + FIRST_OUTPUT_TIMEOUT
        while len(list(out.glob("*.png"))) < 2:
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline, "no output in time"
            time.sleep(0.01)
        os.killpg(holder.pid, signal.SIGSTOP)
        started = time.monotonic()
        second = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=WAIT)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"clipinvert: error: {out} is in use by another clipinvert run (pid {holder.pid} "
            f"on host {socket.gethostname()}, started "
            f"{json.loads((out / LOCK_NAME).read_text())['started']}); wait for it or choose "
            "another -o"]
        assert time.monotonic() - started < 60  # refused before any model loads
        assert holder.poll() is None, "the holder must still be running"
        os.killpg(holder.pid, signal.SIGKILL)  # the OOM killer, a power cut
        holder.wait(timeout=WAIT)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
    finished = _outputs(out)
    assert 1 <= len(finished) < N and (out / LOCK_NAME).exists()  # the dead run's lock
    third = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=WAIT)
    assert third.returncode == 0, third.stderr
    assert "Traceback" not in third.stderr
    assert f"took over the lock of a run that is gone (pid {holder.pid}" in third.stderr
    now = _outputs(out)
    assert len(now) == N and {k: now[k] for k in finished} == finished
    assert not (out / LOCK_NAME).exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.load()
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": N - len(finished), "skipped": len(finished),
                                "failed": 0}
    fourth = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=WAIT)
    assert fourth.returncode == 0 and _outputs(out) == now, fourth.stderr


def test_checking_an_output_folder_never_makes_or_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torchrun rank checks -o while rank 0 takes it: a check that created and removed
    the folder could remove it under rank 0's new lock file (seen as 'cannot create its lock
    file'). The check probes beside the folder instead, and leaves nothing behind."""
    from clipinvert.naming import check_output_folder

    made: list[Path] = []
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args, **kwargs) -> None:
        made.append(self)
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "a" / "b" / "out"
    check_output_folder(out)
    assert made == [] and not (tmp_path / "a").exists()
    assert list(tmp_path.iterdir()) == []  # the probe went too
