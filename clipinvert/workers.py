"""Clean stops: how worker processes and the main process react to signals.

Two rules (issue 7, "clean stops"):

* Only the main process decides when a run stops.  Ctrl-C in a terminal goes to the whole
  process group, so without care every worker prints its own ``KeyboardInterrupt`` traceback
  from deep inside ``multiprocessing``.  Workers therefore ignore SIGINT and finish (or are
  dropped with) the input they hold, while the main process writes the report and exits 130.
* A worker never outlives the main process.  If the main process is killed (SIGKILL, the OOM
  killer, a crashed interpreter) nothing runs its ``finally`` blocks, and an orphaned worker would
  otherwise sit blocked on its task queue forever, holding hundreds of MB of face-alignment
  models.

SIGTERM of the main process is a request to stop, like Ctrl-C: :class:`StopSignals` turns it into
a :class:`Terminated` exception (a ``KeyboardInterrupt``) so the same clean-up paths run
(temporary files of in-flight writes are removed, the report is written) and the CLI exits 143.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

__all__ = ["DeferredStop", "StopSignals", "Terminated", "worker_init"]

PARENT_POLL_S = 0.5
"""How often a worker's watchdog checks that its parent is still alive."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
def worker_init() -> None:
    """``initializer=`` for worker pools: quiet on Ctrl-C, gone when the parent is gone.

    * SIGINT is ignored: the terminal delivers Ctrl-C to every process of the group, but the
      parent decides when to stop (it cancels queued inputs and waits for the ones in flight), so
      a worker must neither die half-way through an input nor print a traceback.
    * SIGTERM is reset to the default action (die quietly).  With the ``fork`` start method a
      worker inherits the parent's Python-level handlers, including the one :class:`StopSignals`
      installs, which would make a terminated worker raise and print a traceback instead.
    * Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` makes the kernel send SIGTERM to the worker as
      soon as its parent dies, even by SIGKILL.  Caveat: the kernel ties this to the parent
      *thread* that forked the worker, not the process; the pool forks from the thread that
      submits work, which outlives the pool, so that is fine here.
    * Everywhere: a daemon watchdog thread polls ``os.getppid()`` and leaves with ``os._exit``
      when the parent changed (the worker was re-parented to init or a subreaper).  This covers
      other OSes and the thread caveat above, within :data:`PARENT_POLL_S`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = _expected_parent()
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="clipinvert-parent-watchdog",
                     daemon=True).start()


def _expected_parent() -> int:
    """The pid of the process that started this worker (not whoever adopted it since)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def _set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when the parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no usable libc (unusual builds): the watchdog remains
        return False


def _watch_parent(parent: int) -> None:
    # os._exit, not sys.exit: this is not the main thread, and there is nothing worth cleaning
    # up in a worker whose results nobody will ever collect.
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(PARENT_POLL_S)


# ---------------------------------------------------------------------------------------------
# Main-process side
# ---------------------------------------------------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop like Ctrl-C (a subclass, so every Ctrl-C clean-up path applies)."""


class StopSignals:
    """Context manager for the main process: SIGINT and SIGTERM stop the run cleanly.

    Inside the block SIGINT raises ``KeyboardInterrupt`` (as Python's default handler does) and
    SIGTERM raises :class:`Terminated`; both record the signal in :attr:`signum`, because
    clean-up code commonly catches and re-raises a plain ``KeyboardInterrupt`` (and Typer turns it
    into a silent exit code 130), so the exception type alone does not say which signal it was.
    The previous handlers come back on exit, so ``cli.main`` can be called repeatedly in-process.

    A signal whose handler is not the default one when the block starts (ignored by ``nohup`` or
    a parent shell, or handled by an embedding application) is left alone, as is everything when
    not called from the main thread (Python only allows handlers there).
    """

    messages = {
        signal.SIGINT: "interrupted",
        signal.SIGTERM: "terminated",
    }

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    #: The instance whose block is running (commands set their :attr:`resume_hint` through it).
    active: StopSignals | None = None

    @classmethod
    def hint(cls, resume_hint: str | Callable[[], str]) -> None:
        """Set how the running command continues after a stop (nothing outside a block)."""
        if cls.active is not None:
            cls.active.resume_hint = resume_hint

    def __enter__(self) -> StopSignals:
        StopSignals.active = self
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum, default in ((signal.SIGINT, signal.default_int_handler),
                                (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if StopSignals.active is self:
            StopSignals.active = None
        while self._previous:
            signum, previous = self._previous.popitem()
            signal.signal(signum, previous)  # type: ignore[arg-type]

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report it: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)

    #: How the stopped command continues; a command that continues otherwise (``train``: with
    #: ``--resume`` once its run folder exists) sets its own, or a function that says it when
    #: the signal came.
    resume_hint: str | Callable[[], str] = "run the same command again to resume"

    @property
    def message(self) -> str:
        """The one line the CLI prints when a run stopped on a signal."""
        what = self.messages.get(self.signum or signal.SIGINT, "interrupted")
        hint = self.resume_hint() if callable(self.resume_hint) else self.resume_hint
        return f"clipinvert: {what} — {hint}"


class DeferredStop:
    """For loops that must finish what they are doing (a training step, a save): SIGINT and
    SIGTERM inside the block only record the signal in :attr:`signum`; the loop checks it at a
    safe point and calls :meth:`reraise`.

    Installed only in the main thread (signal handlers can live nowhere else); the previous
    handlers — under the CLI, :class:`StopSignals`' — come back on exit.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, object] = {}

    def __enter__(self) -> DeferredStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def reraise(self) -> None:
        """Stop as the handler that was there before would have (:class:`StopSignals` records
        which signal it was, for the exit code); else as Python does."""
        old = self._old.get(self.signum)
        if callable(old):
            old(self.signum, None)
        if self.signum == signal.SIGTERM:
            raise Terminated()
        raise KeyboardInterrupt
