"""Exceptions that map onto the exit codes scripts rely on (see README, "Exit codes").

0 all inputs done; 1 one or more inputs failed or a runtime error (a full disk included);
2 usage error (an output folder in use by another run included); 3 weights missing or invalid.
Every error carries a one-line, actionable message: the CLI prints ``str(err)`` and never a
traceback for these.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_WEIGHTS = 3


class ClipInvertError(Exception):
    """Base class; ``exit_code`` tells the CLI how to end."""

    exit_code = EXIT_FAILED


class UsageError(ClipInvertError):
    """The command line or the registry asks for something that cannot be done."""

    exit_code = EXIT_USAGE


class WeightsError(ClipInvertError):
    """A weight file is missing, unreadable, not a checkpoint, or has the wrong layout."""

    exit_code = EXIT_WEIGHTS


class InputError(ClipInvertError):
    """One input (image, reference) cannot be used; the batch goes on without it."""

    exit_code = EXIT_FAILED


class DiskFullError(ClipInvertError, OSError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT).

    A fault of the run, not of one input: every later output would fail the same way, so the
    run stops at once (exit 1) instead of reporting each remaining input as failed.  ``path`` is
    the file that could not be written.  Also an ``OSError`` (errno ENOSPC), so library callers
    that caught the plain error before still do.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, path: object = None) -> None:
        import errno

        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of an exception's message, at most ``limit`` characters.

    For the ``(…)`` detail of a one-line error: torch, zipfile and HTTP libraries raise
    messages that run to paragraphs of advice.  An exception without a message gives its type
    name.
    """
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."
