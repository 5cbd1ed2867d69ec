"""Launching real torchrun processes from tests: bounded waits, nothing left running.

Shared by the distributed training and editing tests.  Every process is started in its own
session, every wait is bounded, and whatever is still alive at the end is killed by process
group (torchrun starts each worker in a session of its own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
WAIT = 240  # seconds any launch may take before the test gives up on it
# torchrun's own variables, should the test itself run under a launcher
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CLIPINVERT_HOME=os.environ["CLIPINVERT_HOME"],
               XDG_CONFIG_HOME=os.environ["XDG_CONFIG_HOME"],
               CLIPINVERT_DIST_TIMEOUT="60")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """A launcher and its workers: torchrun starts each worker in a session of its own."""
    if proc.poll() is None:
        for child in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def start_process(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_all(commands: list[list[str]], cwd: Path, env: dict[str, str],
             timeout: float = WAIT) -> list[tuple[int, str, str]]:
    """Start the commands together; (exit code, stdout, stderr) of each, all within
    ``timeout``; anything left running is killed, workers included."""
    procs = [start_process(cmd, cwd, env) for cmd in commands]
    try:
        deadline = time.monotonic() + timeout
        results = []
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
        return results
    finally:
        for p in procs:
            kill_tree(p)


def clipinvert_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("clipinvert:")]


def no_clipinvert_traceback(err: str) -> bool:
    """torchrun prints its own traceback on a failure; none may come from clipinvert's code."""
    return f"{os.sep}clipinvert{os.sep}" not in err.replace("torch/distributed", "")
