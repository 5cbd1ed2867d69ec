"""Weight files: where they are, how they are downloaded, how they are loaded safely and fast.

* :mod:`.reader` — :func:`read_weights`, the one way every loader reads a weight file.
* :mod:`.download` — search order (explicit path → cache → URLs with consent), verified,
  resumable downloads, offline mode, recorded checksums.
* :mod:`.safety` — the file checks, ``torch.load(weights_only=True)`` with a small allow-list;
  refused pickles.
* :mod:`.torchscript` — the tensors of a TorchScript archive (OpenAI's CLIP), running no code.
* :mod:`.cache` — safetensors copies of released checkpoints for fast, pickle-free reloads.
* :mod:`.sniff` — what a file is from its first bytes (an HTML page saved as weights).

The names below are imported from their submodule on first use, so finding and downloading
files (the registry, :mod:`.download`) does not import torch.
"""

from __future__ import annotations

from importlib import import_module

_HOME = {
    "read_weights": "reader",
    "SAFE_GLOBALS": "safety", "load_checkpoint": "safety",
    "looks_like_html": "sniff",
    "cached_state": "cache", "clear_cache": "cache",
    **{name: "download" for name in ("backend_for", "fetch", "find_file", "find_or_fetch",
                                     "is_offline", "missing_message", "places_for",
                                     "verify_file")},
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
