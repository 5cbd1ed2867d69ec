"""Atomic file writes: a file appears whole, or not at all.

Every file clipinvert writes — edited images, tensors, manifests, reports, the safetensors cache,
``checksums.json`` — goes through :func:`atomic_write`, so a crash, Ctrl-C or a full disk never
leaves a half-written file that a later run would take for a finished one.  This module imports
nothing heavy (no torch, no PIL) so any module may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _temp_sibling(path: Path) -> Path:
    """Create (exclusively) and return an empty temporary file next to ``path``.

    Same directory so ``os.replace`` is an atomic rename; hidden so folder listings (ours
    included) ignore it; ``.partial`` plus the real suffix so writers that pick the format from
    the name (PIL, ffmpeg) still do the right thing.  Created with ``O_EXCL`` and mode 0o666 so
    it is unique and the final file gets the user's normal umask permissions (``mkstemp`` would
    leave outputs readable by the owner only).
    """
    stem = path.name[:120]  # keep the temporary name within NAME_MAX for long output names
    for _ in range(100):
        tmp = path.parent / f".{stem}.{secrets.token_hex(4)}.partial{path.suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` and move the result onto ``path``: the output appears whole or not at all.

    The parent folder is created if needed.  Any exception, including ``KeyboardInterrupt``,
    removes the temporary file and is re-raised, leaving an existing ``path`` untouched.  This
    protects against crashes and interrupts of this process; it does not fsync, so it is not a
    guarantee against power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path | str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_json(path: Path | str, data: object) -> None:
    """Write ``data`` as indented, key-sorted JSON (plus a final newline) atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
