"""Launching real torchrun processes from tests: bounded waits, nothing left running.

Shared by the distributed training and editing tests.  Every process is started in its own
session, every wait is bounded, and whatever is still alive at the end is killed by process
group (torchrun starts each worker in a session of its own).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import clipinvert

WAIT = 240  # seconds any launch may take before the test gives up on it
# torchrun's own variables, should the test itself run under a launcher
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# The package the tests import; its workers must import the same one (see launch_env).
PACKAGE = Path(clipinvert.__file__).resolve().parent
# A traceback's frame line, as Python prints it: `  File "/path/to/file.py", line 12, in f`
FRAME = re.compile(r'^\s*File "(?P<file>[^"\n]+)", line \d+', re.MULTILINE)


def venv_python(checkout: Path) -> Path:
    """``checkout/.venv/bin/python3``: this interpreter, with this environment's packages, at
    the path a virtual environment made inside ``checkout`` would give it.

    Why: CI (.ci/run) makes ``.venv`` inside its clone, a folder git names ``clipinvert/``,
    so torchrun prints ``…/clipinvert/.venv/bin/python3`` and its own frames as
    ``…/clipinvert/.venv/lib/…/torch/…``.  A check of stderr that mistook those for the
    package's frames once failed every run in that layout and nowhere else; launching the tests'
    torchrun through this interpreter puts every run in that layout.  Nothing is copied: the
    interpreter and site-packages are symbolic links, and ``pyvenv.cfg`` (found next to the
    unresolved interpreter path) makes Python take the folder as its prefix.
    """
    venv = checkout / ".venv"
    python = venv / "bin" / "python3"
    if python.exists():
        return python
    python.parent.mkdir(parents=True, exist_ok=True)
    in_venv = sys.prefix != sys.base_prefix
    version = ".".join(map(str, sys.version_info[:3]))
    (venv / "pyvenv.cfg").write_text(
        f"home = {Path(sys.base_prefix) / 'bin'}\n"
        f"include-system-site-packages = {'false' if in_venv else 'true'}\n"
        f"version = {version}\n", encoding="utf-8")
    if in_venv:  # this environment's packages, seen under the new prefix (as CI's are)
        for key in dict.fromkeys(("purelib", "platlib")):
            here = Path(sysconfig.get_path(key))
            there = venv / here.relative_to(sys.prefix)
            if not there.exists():
                there.parent.mkdir(parents=True, exist_ok=True)
                there.symlink_to(here, target_is_directory=True)
    python.symlink_to(sys.executable)
    return python


def torchrun_command(python: Path) -> list[str]:
    return [str(python), "-m", "torch.distributed.run"]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of a launch: offline, one thread per process, the tests' own folders,
    and the tests' copy of the package first on the path, so that the workers run the code
    under test even when another copy is installed (an editable install of another checkout).
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    path = [str(PACKAGE.parent), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(dict.fromkeys(path)),
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


def clipinvert_frames(err: str) -> list[str]:
    """The files of traceback frames in ``err`` that lie in the package itself.

    Only frame lines count, and only files under the package's folder: the interpreter's path,
    torch's own frames and warnings may lie under any folder named ``clipinvert`` (CI's clone
    is one), and must not pass for the package's code.
    """
    found = []
    for match in FRAME.finditer(err):
        with contextlib.suppress(OSError, RuntimeError):
            if Path(match["file"]).resolve().is_relative_to(PACKAGE):
                found.append(match["file"])
    return found


def no_clipinvert_traceback(err: str) -> bool:
    """torchrun prints its own traceback on a failure; none may come from clipinvert's code."""
    return not clipinvert_frames(err)
