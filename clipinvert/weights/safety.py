"""Safe loading of PyTorch checkpoints: tensors and plain data only, unless the user vouches.

Why: ``torch.load`` unpickles, and a pickle can call any importable function while it loads — a
``.pt`` file from a mirror or a shared drive is a program, not data.  We always load with
``weights_only=True``, PyTorch's restricted unpickler, which only rebuilds tensors, builtin
containers and scalars, plus the few extra *types* named in :data:`SAFE_GLOBALS` that the
released files really contain.  A file that names any other global (a function to call, a
class to build) is refused *before* anything from it runs, with a one-line
:class:`~clipinvert.errors.WeightsError` naming the offending global.

``trust=True`` (the CLI's ``--trust-checkpoint``) is the explicit way out for a file the user
produced or vouches for: it loads with ``weights_only=False`` and prints a warning line, so the
decision shows in logs.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch

from ..errors import WeightsError

# Harmless types the released files need beyond tensors and builtins.  rosinality StyleGAN2
# *training* checkpoints pickle their ``argparse.Namespace`` options; nothing else is needed by
# e4e, CLIPInverter, ArcFace or MoCo files.  A type is harmless when building it runs no code
# beyond setting attributes — never add functions here.
SAFE_GLOBALS: list[type] = [argparse.Namespace]

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_TRUST_HINT = "If you trust this file, pass --trust-checkpoint"


def looks_like_html(head: bytes) -> bool:
    """True for the first bytes of an HTML page (Drive/quota/login pages saved as weights).

    No checkpoint format we read starts with ``<``: zip archives start with ``PK``, legacy
    pickles with ``\\x80``, safetensors with a little-endian length, dlib ``.dat`` with digits.
    """
    head = head.lstrip()
    return head[:1] == b"<" or head[:9].lower() == b"<!doctype"


def file_looks_like_html(path: Path) -> bool:
    with Path(path).open("rb") as fh:
        return looks_like_html(fh.read(512))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def refused_global(exc: BaseException) -> str | None:
    """The global a ``weights_only`` load refused, e.g. ``'posix.system'``, if it says so.

    ``None`` when the message names none (e.g. an unsupported pickle opcode) — the file is then
    still refused, just without a name.
    """
    m = _GLOBAL_RE.search(str(exc))
    return m.group(1) if m else None


def _check_file(path: Path, what: str) -> None:
    """Fail early, with one line, on the commonest broken downloads (before any unpickling)."""
    if not path.exists():
        raise WeightsError(f"{what} weights not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{what} weights path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"{what} weights file is empty (0 bytes): {path} — download it again")
    if file_looks_like_html(path):
        raise WeightsError(
            f"{what} weights file {path} is an HTML page, not a checkpoint — the download hit a "
            "quota or permission page; download it again")


def warn_trusted(path: Path) -> None:
    print(f"clipinvert: warning: loading {path} with --trust-checkpoint: its pickle may run "
          "code; do this only for files you made or vouch for", file=sys.stderr)


def load_checkpoint(path: Path | str, *, trust: bool = False, what: str = "model") -> dict:
    """Load a checkpoint dict on the CPU, refusing anything that is not plain weights.

    ``trust=True`` lifts the restriction (``weights_only=False``) with a warning line: the
    caller must only pass it when the user asked for it explicitly (``--trust-checkpoint``).
    Every failure is one :class:`WeightsError` line that names the file.
    """
    path = Path(path)
    _check_file(path, what)
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4 …" and similar are noise for a user; errors still raise.
            warnings.simplefilter("ignore")
            if trust:
                warn_trusted(path)
                obj = torch.load(path, map_location="cpu", weights_only=False)
            else:
                with torch.serialization.safe_globals(SAFE_GLOBALS):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust and ("Weights only load failed" in text or "WeightsUnpickler" in text):
            name = refused_global(exc)
            detail = name or "an unsupported pickle instruction"
            raise WeightsError(
                f"{what} weights file {path} contains code/objects that are not plain weights "
                f"({detail}); refused. {_TRUST_HINT}") from None
        raise WeightsError(f"{what} weights file {path} is corrupt: {_first_line(exc)}") from None
    except Exception as exc:  # torch raises many types for a bad file; all mean the same
        if trust:
            raise WeightsError(f"{what} weights file {path} could not be loaded even with "
                               f"--trust-checkpoint ({_first_line(exc)})") from None
        raise WeightsError(
            f"{what} weights file {path} is truncated or not a PyTorch checkpoint "
            f"({_first_line(exc)}) — download it again") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} weights file {path} holds a {type(obj).__name__}, not a dict")
    return obj
