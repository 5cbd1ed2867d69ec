"""clipinvert: text-driven editing of real photos with CLIPInverter.

The Python API mirrors the command line::

    from clipinvert import Editor
    editor = Editor("faces")                      # weights from models.toml, loaded lazily
    result = editor.edit(images, "she has wavy blond hair", strength=1.0)
    result.pil()[0].save("edited.png")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .pipeline import Editor, Encoded, Result, resolve_device  # noqa: E402

__all__ = ["Editor", "Encoded", "Result", "resolve_device", "__version__"]
