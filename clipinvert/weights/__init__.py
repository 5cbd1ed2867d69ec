"""Weight files: where they are, how they are downloaded, how they are loaded safely and fast.

* :mod:`.download` — search order (explicit path → cache → URLs with consent), verified,
  resumable downloads, offline mode, recorded checksums.
* :mod:`.safety` — ``torch.load(weights_only=True)`` with a small allow-list; refused pickles.
* :mod:`.cache` — safetensors copies of released checkpoints for fast, pickle-free reloads.
"""

from __future__ import annotations

from .cache import cached_state, clear_cache
from .download import (
    backend_for,
    fetch,
    find_file,
    find_or_fetch,
    is_offline,
    missing_message,
    places_for,
    verify_file,
)
from .safety import SAFE_GLOBALS, load_checkpoint, looks_like_html

__all__ = [
    "SAFE_GLOBALS",
    "backend_for",
    "cached_state",
    "clear_cache",
    "fetch",
    "find_file",
    "find_or_fetch",
    "is_offline",
    "load_checkpoint",
    "looks_like_html",
    "missing_message",
    "places_for",
    "verify_file",
]
