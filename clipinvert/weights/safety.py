"""Safe reading of one weight file: tensors and plain data only, unless the user vouches.

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

OpenAI's TorchScript archives (CLIP) are read by :mod:`.torchscript` for their tensors alone,
with an even smaller allow-list and without running any of their code.

Loaders do not call this module directly: :func:`clipinvert.weights.reader.read_weights` is the
one way to read a weight file (it adds the safetensors cache).  This module reads the file
itself, and every failure is one :class:`~clipinvert.errors.WeightsError` line naming it.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Collection
from pathlib import Path

import torch

from ..errors import WeightsError, first_line
from .sniff import PICKLE_MAGIC, ZIP_MAGIC, looks_like_html
from .torchscript import UnsafeGlobal, is_torchscript, read_state_dict

# Harmless types the released files need beyond tensors and builtins.  rosinality StyleGAN2
# *training* checkpoints pickle their ``argparse.Namespace`` options; nothing else is needed by
# e4e, CLIPInverter, ArcFace or MoCo files.  A type is harmless when building it runs no code
# beyond setting attributes — never add functions here.
SAFE_GLOBALS: list[type] = [argparse.Namespace]

# The file formats a loader may accept (``formats=`` of :func:`load_checkpoint`).
CHECKPOINT = "checkpoint"  # torch.save: a zip archive, or a pre-1.6 pickle
TORCHSCRIPT = "torchscript"  # torch.jit.save, e.g. OpenAI's CLIP ViT-B-32.pt
_FORMAT_NAMES = {CHECKPOINT: "a torch.save checkpoint", TORCHSCRIPT: "a TorchScript archive"}

_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_TRUST_HINT = "If you trust this file, pass --trust-checkpoint"


def refused_global(exc: BaseException) -> str | None:
    """The global a ``weights_only`` load refused, e.g. ``'posix.system'``, if it says so.

    ``None`` when the message names none (e.g. an unsupported pickle opcode) — the file is then
    still refused, just without a name.
    """
    m = _GLOBAL_RE.search(str(exc))
    return m.group(1) if m else None


def check_file(path: Path, what: str) -> bytes:
    """Fail early, with one line, on the commonest broken downloads; return the first bytes.

    Not found, a folder, unreadable, empty, an HTML page (a quota or permission page saved
    under the checkpoint's name) — all before any unpickling.
    """
    try:
        if path.is_dir():
            raise WeightsError(f"{what} weights path is a folder, not a file: {path}")
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(512)
    except FileNotFoundError:
        raise WeightsError(f"{what} weights not found: {path}") from None
    except OSError as exc:
        raise WeightsError(
            f"{what} weights file {path} cannot be read: {first_line(exc)}") from None
    if size == 0:
        raise WeightsError(f"{what} weights file is empty (0 bytes): {path} — download it again")
    if looks_like_html(head):
        raise WeightsError(
            f"{what} weights file {path} is an HTML page, not a checkpoint — the download hit a "
            "quota or permission page; download it again")
    return head


def warn_trusted(path: Path) -> None:
    print(f"clipinvert: warning: loading {path} with --trust-checkpoint: its pickle may run "
          "code; do this only for files you made or vouch for", file=sys.stderr)


def _refused(path: Path, what: str, name: str | None) -> WeightsError:
    detail = name or "an unsupported pickle instruction"
    return WeightsError(f"{what} weights file {path} contains code/objects that are not plain "
                        f"weights ({detail}); refused. {_TRUST_HINT}")


def check_format(path: Path, what: str, formats: Collection[str]) -> tuple[str, bool]:
    """:func:`check_file`, then the file's format — refused unless the caller accepts it.

    Returns ``(format, zipped)``.  Cheap (the first bytes and, for a zip, its directory, which
    sits at the end: a truncated download fails here), so :func:`~.reader.read_weights` runs it
    before the cache too: a cached copy never bypasses the checks or the caller's ``formats``.
    """
    head = check_file(path, what)
    if head.startswith(PICKLE_MAGIC):  # torch.save's legacy (pre-1.6) format
        fmt, zipped = CHECKPOINT, False
    elif head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                script = is_torchscript(zf.namelist())
        except Exception as exc:  # zipfile raises many types for a damaged archive
            raise WeightsError(f"{what} weights file {path} is truncated or corrupt (unreadable "
                               f"zip archive: {first_line(exc)}) — download it again") from None
        fmt, zipped = (TORCHSCRIPT if script else CHECKPOINT), True
    else:
        raise WeightsError(f"{what} weights file {path} is truncated or not a PyTorch checkpoint "
                           "(neither a zip archive nor a pickle) — download it again")
    if fmt not in formats:
        wanted = " or ".join(_FORMAT_NAMES[f] for f in formats if f in _FORMAT_NAMES)
        raise WeightsError(f"{what} weights file {path} is {_FORMAT_NAMES[fmt]}; {what} weights "
                           f"are read from {wanted or 'no known format'}")
    return fmt, zipped


def load_checkpoint(path: Path | str, *, trust: bool = False, what: str = "model",
                    formats: Collection[str] = (CHECKPOINT,)) -> dict:
    """Read a weight file on the CPU, refusing anything that is not plain weights; no cache.

    ``formats`` names what the caller accepts: :data:`CHECKPOINT` (``torch.save``, read with
    ``weights_only=True`` and :data:`SAFE_GLOBALS`) and/or :data:`TORCHSCRIPT` (read by
    :mod:`.torchscript` as a ``{name: tensor}`` state dict, running none of its code).
    ``trust=True`` lifts the restriction with a warning line (``weights_only=False``; for a
    TorchScript archive our reader cannot represent, ``torch.jit.load``): the caller must only
    pass it when the user asked for it explicitly (``--trust-checkpoint``).  Every failure is
    one :class:`WeightsError` line that names the file.
    """
    path = Path(path)
    fmt, zipped = check_format(path, what, formats)
    if zipped:
        _check_zip_members(path, what)
    if fmt == TORCHSCRIPT:
        obj: object = _read_torchscript(path, what, trust)
    else:
        obj = _torch_load(path, what, trust)
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} weights file {path} is not a state dict or checkpoint: it "
                           f"holds a {type(obj).__name__}, not a dict")
    return obj


def _check_zip_members(path: Path, what: str) -> None:
    """CRC of every member: catches corruption inside the archive, which torch does not check
    (about 1 GB/s; only on loads the cache does not serve)."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as exc:  # a member's header is damaged
        raise WeightsError(f"{what} weights file {path} is corrupt ({first_line(exc)}) — "
                           "download it again") from None
    if bad is not None:
        raise WeightsError(f"{what} weights file {path} is corrupt (checksum mismatch in {bad}) "
                           "— download it again")


def _read_torchscript(path: Path, what: str, trust: bool) -> dict:
    try:
        with zipfile.ZipFile(path) as zf:
            return read_state_dict(zf)
    except UnsafeGlobal as exc:
        if not trust:
            raise _refused(path, what, exc.args[0]) from None
    except Exception as exc:  # damaged records or offsets: all mean the same
        raise WeightsError(f"{what} weights file {path} is a TorchScript archive that cannot be "
                           f"read: {first_line(exc)} — download it again") from None
    return _jit_load(path, what)


def _jit_load(path: Path, what: str) -> dict:
    """The trusted fallback for a TorchScript archive: compile and run it, take its tensors."""
    warn_trusted(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch >= 2.9 flags torch.jit as deprecated
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as exc:
        raise WeightsError(f"{what} weights file {path} could not be loaded even with "
                           f"--trust-checkpoint ({first_line(exc)})") from None


def _torch_load(path: Path, what: str, trust: bool) -> object:
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4 …" and similar are noise for a user; errors still raise.
            warnings.simplefilter("ignore")
            if trust:
                warn_trusted(path)
                return torch.load(path, map_location="cpu", weights_only=False)
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust and ("Weights only load failed" in text or "WeightsUnpickler" in text):
            raise _refused(path, what, refused_global(exc)) from None
        raise WeightsError(f"{what} weights file {path} is corrupt: {first_line(exc)}") from None
    except Exception as exc:  # torch raises many types for a bad file; all mean the same
        if trust:
            raise WeightsError(f"{what} weights file {path} could not be loaded even with "
                               f"--trust-checkpoint ({first_line(exc)})") from None
        raise WeightsError(
            f"{what} weights file {path} is truncated or not a PyTorch checkpoint "
            f"({first_line(exc)}) — download it again") from None
