"""The test harness itself: how the torchrun tests judge stderr, the interpreter they launch
with, and what a test session leaves behind.

A harness that misjudges fails good runs in one layout only (the check of torchrun's stderr
once failed every run of CI's clean clone, a folder named ``clipinvert`` with ``.venv``
inside, and no other), or leaves gigabytes in the temporary folder without a word.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torchrun_helpers import (
    PACKAGE,
    clipinvert_frames,
    launch_env,
    no_clipinvert_traceback,
    venv_python,
)

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# torchrun's stderr when a worker fails (torch 2.14), as CI's layout prints it: the interpreter
# and torch's frames lie under {venv}, which lies in the clone, next to the package; the first
# check took every "/clipinvert/" in it for the package's own frames.
TORCHRUN_FAILURE = """\
E1202 15:10:05.545000 4718 {venv}/lib/python3.11/site-packages/torch/distributed/elastic/\
multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 4749) of binary: \
{venv}/bin/python3
{venv}/lib/python3.11/site-packages/torch/distributed/run.py:803: UserWarning: a warning
{worker}Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "{venv}/lib/python3.11/site-packages/torch/distributed/run.py", line 1142, in <module>
    main()
  File "{venv}/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 386, in \
launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
clipinvert FAILED
------------------------------------------------------------
"""


@pytest.mark.parametrize("venv", [Path("/build/clipinvert/.venv"), PACKAGE.parent / ".venv"],
                         ids=["clone-named-clipinvert", "beside-this-package"])
def test_only_the_packages_own_frames_count_as_its_traceback(venv: Path,
                                                              tmp_path: Path) -> None:
    clean = TORCHRUN_FAILURE.format(venv=venv, worker="")
    assert no_clipinvert_traceback(clean) and clipinvert_frames(clean) == []
    # a worker's traceback through the package is caught, however its path is spelt
    link = tmp_path / "clipinvert"
    link.symlink_to(PACKAGE, target_is_directory=True)
    for frame in (PACKAGE / "batch.py", link / "cli.py"):
        worker = (f'Traceback (most recent call last):\n  File "{frame}", line 12, in run\n'
                  "    raise ValueError\nValueError\n")
        failed = TORCHRUN_FAILURE.format(venv=venv, worker=worker)
        assert not no_clipinvert_traceback(failed)
        assert clipinvert_frames(failed) == [str(frame)]


def test_the_launch_interpreter_lies_in_a_clipinvert_venv_with_these_packages(
        tmp_path: Path) -> None:
    python = venv_python(tmp_path / "clipinvert")
    assert python == tmp_path / "clipinvert" / ".venv" / "bin" / "python3"
    assert venv_python(tmp_path / "clipinvert") == python  # made once, then reused
    probe = ("import importlib.util as u, sys; print(sys.prefix); "
             "print(u.find_spec('torch').origin); print(u.find_spec('clipinvert').origin)")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                          timeout=60, env=launch_env(), cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    prefix, torch_file, package_file = done.stdout.split()
    assert Path(prefix) == python.parent.parent
    if sys.prefix != sys.base_prefix:  # torch's frames print under the venv, as in CI
        assert Path(torch_file).is_relative_to(prefix), torch_file
    # the workers import the package under test, whatever else is installed
    assert Path(package_file).resolve().parent == PACKAGE


INNER_TESTS = '''
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared-weights")
    (folder / "weights.bin").write_bytes(bytes(1000))
    return folder


def test_one_thread_here_and_in_children():
    assert torch.get_num_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"


def test_a_child_leaves_a_temporary_folder(tmp_path):
    # as torchrun does (torchelastic_*): it goes in the TMPDIR the child inherits
    subprocess.run([sys.executable, "-c", "import tempfile; tempfile.mkdtemp(prefix='left-')"],
                   check=True)


def test_passes(shared, tmp_path):
    (tmp_path / "gone-when-passed.txt").write_text("x")


def test_fails(shared, tmp_path):
    (tmp_path / "evidence.txt").write_text("what went wrong")
    assert False
'''


@pytest.mark.parametrize("workers", ["parallel", "-n 0"])
def test_a_failing_session_leaves_only_its_failed_tests_folders(tmp_path: Path,
                                                                 workers: str) -> None:
    """A session of this suite's conftest, in a subprocess with its own TMPDIR and no thread
    setting: it leaves there only the failed test's tmp_path — not the fixtures' shared folders,
    nor what its children left in their temporary folder, nor its own isolated folder; in
    parallel worker processes (the default) as in one."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(TESTS / "conftest.py", suite / "conftest.py")
    (suite / "test_inner.py").write_text(INNER_TESTS)
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTEST_ADDOPTS")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(ROOT / "pyproject.toml"), "--rootdir", str(suite), str(suite),
         *([] if workers == "parallel" else workers.split())],
        capture_output=True, text=True, timeout=300, env={**env, "TMPDIR": str(temp)},
        cwd=suite, check=False)
    assert "1 failed, 3 passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    assert [p.name for p in temp.iterdir()] == [f"pytest-of-{getpass.getuser()}"]
    left = [p.relative_to(temp).parts[2:] for p in temp.rglob("*")
            if p.is_file() and not p.is_symlink()]
    # in parallel (pytest-xdist), below the failing worker's folder
    left = [parts[1:] if parts[0].startswith("popen-gw") else parts for parts in left]
    assert left == [("test_fails0", "evidence.txt")]


def copy_checkout(source: Path, target: Path) -> None:
    """The checkout's source files, as a fresh clone has them: git's tracked and not-ignored
    files where ``source`` is a git checkout, else everything but environments and caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=source, capture_output=True,
                            check=False) if shutil.which("git") else None
    if listed is not None and listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (source / name).is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, target / name)
        return
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "build"))


@pytest.mark.slow  # a nested run of the distributed edit test from a copy (~40 s)
def test_the_torchrun_tests_pass_in_a_clone_named_clipinvert(tmp_path: Path) -> None:
    """CI's layout itself: the checkout copied to a folder named ``clipinvert`` with its
    ``.venv`` inside, the README's test command run there through that interpreter."""
    clone = tmp_path / "clipinvert"
    copy_checkout(ROOT, clone)
    assert (clone / "clipinvert" / "__init__.py").is_file() and not (clone / ".git").exists()
    python = venv_python(clone)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_edit_ddp.py",
         "tests/test_harness.py::test_only_the_packages_own_frames_count_as_its_traceback"],
        capture_output=True, text=True, timeout=600, env=env, cwd=clone, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout
