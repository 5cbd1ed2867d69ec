"""One writer per output folder: the lock that keeps two runs out of the same ``-o``.

A doubled cron job or ``xargs -P`` can start two runs into one folder.  Both would write, and
afterwards every run would refuse the folder ("output files already exist that this command did
not make").  So a run holds ``OUT/.clipinvert-lock`` (hidden: never read as an input, ignored by
the manifest) from before any model loads until it ends, errors and Ctrl-C included, and a
second run is refused at once (exit 2) with one line naming the holder.

The lock file is created with ``O_EXCL`` (atomic on local and NFS file systems) and holds
``{"pid", "host", "started", "token", "proc_start"}``.  A holder that died is taken over:

* on this host, when its pid is gone (or now belongs to another process: ``proc_start``, the
  boot id and start tick of the holder, no longer matches);
* on another host (a shared file system), when its heartbeat is stale: the holder touches the
  file every :data:`HEARTBEAT_S` seconds, and a lock untouched for :data:`STALE_S` seconds is
  taken over.  A holder on this host whose pid lives is never taken over, however old the file
  (a run stopped with Ctrl-Z keeps its folder).

Taking over happens under a short-lived guard file (``.clipinvert-lock.takeover``, ``O_EXCL``)
so that two runs finding the same dead lock cannot both take it.

Under torchrun the ranks of one launch are one run: rank 0 takes the lock and every rank gets
its verdict (:func:`claim_output`), so no rank starts before the folder is ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import UsageError
from .fileio import TEMP_PATTERN, remove_stale_temps

LOCK_NAME = ".clipinvert-lock"
GUARD_NAME = ".clipinvert-lock.takeover"
HEARTBEAT_S = 10.0  # how often a holder touches its lock
STALE_S = 120.0  # a lock of another host untouched this long is taken over
GUARD_STALE_S = 30.0  # a takeover guard is held for milliseconds; older ones are leftovers
# Our own hidden files: what may be removed with an output folder this run created and that
# holds nothing else.
OWN_FILE_PREFIX = ".clipinvert-"


class FolderBusyError(UsageError):
    """The output folder is held by another live clipinvert run (exit 2)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    started: str
    token: str
    proc_start: str | None = None

    @classmethod
    def me(cls) -> Holder:
        started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(os.getpid(), socket.gethostname(), started, secrets.token_hex(8),
                   _proc_start(os.getpid()))

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder in a lock file's bytes; None for anything else (empty, torn, garbage)."""
        try:
            d = json.loads(data.decode("utf-8"))
            holder = cls(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["token"]),
                         None if d.get("proc_start") is None else str(d["proc_start"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return holder

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def _proc_start(pid: int) -> str | None:
    """``<boot id>:<start tick>`` of a process (Linux), to tell a reused pid from its first
    owner; None where /proc does not say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{boot}:{stat[stat.rindex(')') + 2:].split()[19]}"
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """The lock of one output folder (see the module docstring).

    ``acquire()`` raises :class:`FolderBusyError` when a live run holds the folder and returns a
    note when it took over a dead run's lock; ``release()`` removes the file only while it is
    still ours.  The folder must exist.
    """

    def __init__(self, folder: Path, *, stale_after: float = STALE_S,
                 heartbeat: float = HEARTBEAT_S) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self.me = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ---- reading --------------------------------------------------------------------------
    def _read(self) -> tuple[Holder | None, float] | None:
        """The current holder (None when unreadable) and the file's mtime; None when no lock."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read(4096)
                mtime = os.fstat(fh.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Holder.parse(data), mtime

    def _stale(self, holder: Holder | None, mtime: float) -> bool:
        if holder is not None and holder.host == self.me.host:
            if not _pid_alive(holder.pid):
                return True
            now = _proc_start(holder.pid)
            return holder.proc_start is not None and now is not None and now != holder.proc_start
        return time.time() - mtime > self.stale_after

    # ---- taking and giving back -------------------------------------------------------------
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self.me.to_bytes())
        finally:
            os.close(fd)
        return True

    def acquire(self) -> str | None:
        """Hold the folder; a note naming the dead run whose lock was taken over, if any."""
        note = None
        for _ in range(20):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return note
            found = self._read()
            if found is None:
                continue  # released meanwhile: try again
            holder, mtime = found
            if not self._stale(holder, mtime):
                who = holder.describe() if holder is not None else "its details unreadable"
                raise FolderBusyError(
                    f"{self.folder} is in use by another clipinvert run ({who}); wait for it "
                    "or choose another -o")
            if self._take_over(holder, mtime):
                who = holder.describe() if holder is not None else "an unreadable lock"
                note = f"{self.folder}: took over the lock of a run that is gone ({who})"
            else:
                time.sleep(0.05)  # another run is taking it over: see who won
        raise FolderBusyError(f"{self.folder} is in use by another clipinvert run (its lock "
                              "keeps changing); wait for it or choose another -o")

    def _take_over(self, holder: Holder | None, mtime: float) -> bool:
        """Remove the stale lock we saw, unless it changed; False when another run is at it."""
        guard = self.folder / GUARD_NAME
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):  # a taker that died holding the guard
                if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                    guard.unlink()
            return False
        os.close(fd)
        try:
            again = self._read()
            if again is not None and again == (holder, mtime):
                self.path.unlink()
            return True
        finally:
            guard.unlink()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="clipinvert-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Touch the lock while it is ours, so runs on other hosts see this one is alive."""
        while not self._stop.wait(self.heartbeat):
            found = self._read()
            if found is None or found[0] != self.me:
                return  # taken over (we looked dead): nothing of ours to keep alive
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            found = self._read()
            if found is not None and found[0] == self.me:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False


# ---------------------------------------------------------------------------------------------
# An output folder for one run: created, locked, cleaned, and removed again if left empty
# ---------------------------------------------------------------------------------------------
def create_folder(folder: Path) -> list[Path]:
    """``mkdir -p folder``; the folders it created, outermost first (to remove them again)."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"-o {folder}: a parent is not a folder") from None
    except OSError as exc:
        raise UsageError(f"-o {folder}: cannot create the folder ({exc.strerror or exc})") \
            from None
    return list(reversed(missing))


def _own(name: str) -> bool:
    return name.startswith(OWN_FILE_PREFIX) or bool(TEMP_PATTERN.match(name))


def remove_if_unused(created: list[Path]) -> bool:
    """Remove the folders a run created when they hold nothing but our own hidden files.

    Never a folder the user had (only ``created``), never a file of theirs: one file that is
    not ours anywhere below keeps everything.  True when the folder is gone.
    """
    if not created:
        return False
    top = created[0]
    ours: list[Path] = []
    dirs: list[Path] = []
    for root, subdirs, files in os.walk(top):
        for name in files:
            if not _own(name):
                return False
            ours.append(Path(root) / name)
        dirs += [Path(root) / d for d in subdirs]
    for f in ours:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True) + list(reversed(created)):
        with contextlib.suppress(OSError):
            d.rmdir()
    return not top.exists()


@contextlib.contextmanager
def claim_output(folder: Path, *, is_main: bool = True,
                 share: Callable[[str | None], str | None] = lambda verdict: verdict,
                 note: Callable[[str], None] = lambda line: None,
                 stale_after: float = STALE_S) -> Iterator[OutputLock | None]:
    """The output folder, held by this run for the block.

    Creates it if needed (remembering what was created), takes the lock (the main process;
    ``share`` hands its verdict — None or the refusal line — to every process of a torchrun
    launch), removes temporary files a killed run left, and at the end releases the lock and
    removes the folders this run created if nothing but our hidden files is in them (a run
    that stopped before its first output leaves no trace).
    """
    created = create_folder(folder) if is_main else []
    lock = OutputLock(folder, stale_after=stale_after) if is_main else None
    ours = False
    try:
        verdict = None
        if lock is not None:
            try:
                took = lock.acquire()
            except FolderBusyError as exc:
                verdict = str(exc)
            except OSError as exc:
                verdict = f"-o {folder}: cannot create its lock file ({exc.strerror or exc})"
            else:
                ours = True
                if took:
                    note(took)
                remove_stale_temps(folder)
        verdict = share(verdict)  # every process of a launch learns the main one's verdict
        if verdict is not None:
            raise FolderBusyError(verdict)
        yield lock
    finally:
        if lock is not None:
            lock.release()
        if ours:  # a refused run never touches the holder's files, even in a folder it made
            remove_if_unused(created)
