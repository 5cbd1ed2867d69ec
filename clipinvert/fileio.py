"""Atomic file writes: a file appears whole, or not at all.

Every file clipinvert writes — edited images, tensors, manifests, reports, the safetensors cache,
``checksums.json`` — goes through :func:`atomic_write`, so a crash, Ctrl-C or a full disk never
leaves a half-written file that a later run would take for a finished one.  This module imports
nothing heavy (no torch, no PIL) so any module may use it.

A write that fails for lack of space or quota becomes :class:`~clipinvert.errors.DiskFullError`
here, in one place, so every caller can stop its run instead of treating it as one bad input.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# The names _temp_name gives: ".<name>.<8 hex>.partial<suffix>".  Only files matching this
# are ever removed as leftovers of a killed run.
TEMP_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}\.partial(\.[^./]*)?$")


def _temp_name(path: Path) -> Path:
    """A fresh temporary name next to ``path`` (the file is not created here).

    Same directory so ``os.replace`` is an atomic rename; hidden so folder listings (ours
    included) ignore it; ``.partial`` plus the real suffix so writers that pick the format from
    the name (PIL, ffmpeg) still do the right thing.
    """
    stem = path.name[:120]  # keep the temporary name within NAME_MAX for long output names
    return path.parent / f".{stem}.{secrets.token_hex(4)}.partial{path.suffix}"


def _create_temp(path: Path, name: list[Path]) -> None:
    """Create (exclusively) an empty temporary file next to ``path``; its name goes into
    ``name[0]`` *before* the file exists, so a Ctrl-C at any instant leaves the caller a name
    to remove.  ``O_EXCL`` makes it unique and mode 0o666 gives the final file the user's
    umask permissions (``mkstemp`` would leave outputs readable by the owner only)."""
    for _ in range(100):
        name[:] = [_temp_name(path)]
        try:
            os.close(os.open(name[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return
        except FileExistsError:
            name.clear()  # another writer's file: never ours to remove
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` and move the result onto ``path``: the output appears whole or not at all.

    The parent folder is created if needed.  Any exception, including ``KeyboardInterrupt``,
    removes the temporary file and is re-raised, leaving an existing ``path`` untouched.  This
    protects against crashes and interrupts of this process; it does not fsync, so it is not a
    guarantee against power loss.
    A failure for lack of space or quota (see :func:`disk_full`) is raised as
    :class:`~clipinvert.errors.DiskFullError` naming ``path``, the original chained.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _raise_if_full(exc, path, path.parent)
        raise
    # The temporary file is created inside the try, its name known before it exists: a Ctrl-C
    # (or SIGTERM) arriving at any bytecode still removes it.
    name: list[Path] = []
    try:
        _create_temp(path, name)
        write(name[0])
        os.replace(name[0], path)
    except BaseException as exc:
        where = name[0] if name else path.parent
        full = disk_full(exc, where)  # looked at before the temporary file frees its space
        if name:
            with contextlib.suppress(OSError):
                name[0].unlink()
        if full:
            raise DiskFullError(f"disk full writing {path} ({_why(exc)})", path) from exc
        raise


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_json(path: Path | str, data: object) -> None:
    """Write ``data`` as indented, key-sorted JSON (plus a final newline) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _errnos(exc: BaseException) -> Iterator[int]:
    """The errno of ``exc`` and of every exception it was raised from (PIL and imageio wrap)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            yield cur.errno
        cur = cur.__cause__ or cur.__context__


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether ``exc`` is a write failing for lack of space or quota.

    ENOSPC/EDQUOT anywhere in its chain, or — for writers that lose the errno on the way
    (``torch.save`` raises ``RuntimeError: … unexpected pos …``) — any error while the file
    system holding ``where`` has no block left for us.  Interrupts never count.
    """
    if isinstance(exc, DiskFullError):
        return True
    if not isinstance(exc, Exception):
        return False
    if any(e in DISK_FULL_ERRNOS for e in _errnos(exc)):
        return True
    if where is None:
        return False
    try:
        st = os.statvfs(where if where.is_dir() else where.parent)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail == 0


def _why(exc: BaseException) -> str:
    code = next((e for e in _errnos(exc) if e in DISK_FULL_ERRNOS), errno.ENOSPC)
    return os.strerror(code)


def full_error(exc: BaseException, path: Path | str | None = None,
               where: Path | None = None) -> DiskFullError | None:
    """``exc`` as a :class:`DiskFullError` naming ``path`` (or the file the OSError names),
    when it is a full disk (:func:`disk_full`); None otherwise."""
    if isinstance(exc, DiskFullError):
        return exc
    if not disk_full(exc, where):
        return None
    path = path or getattr(exc, "filename", None) or "an output"
    err = DiskFullError(f"disk full writing {path} ({_why(exc)})", path)
    err.__cause__ = exc
    return err


def _raise_if_full(exc: BaseException, path: Path, where: Path | None = None) -> None:
    if (err := full_error(exc, path, where)) is not None:
        raise err


def append_line(path: Path | str, line: str) -> None:
    """Append one line to a JSON-lines log (the manifest, ``metrics.jsonl``).

    A crash or full disk can leave the last line torn (no newline); the next append starts on a
    fresh line, so a torn line only loses itself and never swallows the record after it.  A
    full disk raises :class:`~clipinvert.errors.DiskFullError`.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as fh:
            if fh.seek(0, os.SEEK_END) > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
            fh.write(data)
    except OSError as exc:
        _raise_if_full(exc, path)
        raise


def remove_stale_temps(folder: Path | str) -> list[Path]:
    """Remove the temporary files a killed run left in ``folder`` (recursively); return them.

    Only names :func:`_temp_name` makes are touched, and only by a run that holds the
    folder's lock (:mod:`clipinvert.outlock`), so no live writer's temporary file is removed.
    """
    removed = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if TEMP_PATTERN.match(name):
                p = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def read_toml(path: Path | str, what: str) -> dict:
    """A TOML file's tables, or one usage-error line naming ``what`` it is and why it cannot be
    read: the registry and the caption vocabularies are files users edit by hand, and a typo in
    one must be a line that points at it, never a traceback."""
    from .errors import UsageError

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path}: not valid TOML ({exc})") from None
