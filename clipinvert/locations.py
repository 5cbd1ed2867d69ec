"""Where weight files live and whether the network may be used, read from the environment.

Shared by the registry (which says what files exist) and by :mod:`clipinvert.weights` (which
finds, downloads and caches them): keeping these answers here lets both import them without
importing each other.  Nothing heavy is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

_TRUE = {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Where downloaded weights live: ``$CLIPINVERT_HOME``, else the XDG cache folder."""
    home = os.environ.get("CLIPINVERT_HOME")
    if home:
        return Path(home).expanduser()
    return Path(platformdirs.user_cache_dir("clipinvert", appauthor=False))


def is_offline(flag: bool | None = None) -> bool:
    """``--offline``, else ``CLIPINVERT_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value."""
    if flag:
        return True
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("CLIPINVERT_OFFLINE", "HF_HUB_OFFLINE"))
