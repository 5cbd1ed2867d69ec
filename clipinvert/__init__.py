"""clipinvert: text-driven editing of real photos with CLIPInverter.

The Python API mirrors the command line::

    from clipinvert import Editor
    editor = Editor("faces")                      # weights from models.toml, loaded lazily
    result = editor.edit(images, "she has wavy blond hair", strength=1.0)
    result.pil()[0].save("edited.png")

The API names are imported on first use (PEP 562), so ``import clipinvert.errors`` and
``clipinvert --help`` do not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Editor", "Encoded", "Result", "resolve_device", "__version__"]

_LAZY = {"Editor": "pipeline", "Encoded": "pipeline", "Result": "pipeline",
         "resolve_device": "pipeline"}

if TYPE_CHECKING:
    from .pipeline import Editor, Encoded, Result, resolve_device


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
