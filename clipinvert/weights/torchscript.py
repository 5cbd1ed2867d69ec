"""The weights of a TorchScript archive, read as data: none of the archive's code runs.

OpenAI published CLIP as TorchScript archives (``ViT-B-32.pt``).  ``torch.jit.load`` compiles
the archive's ``code/`` and rebuilds its objects through it, and ``torch.load(weights_only=True)``
refuses such archives outright.  But the weights need neither: an archive is a zip holding

* ``<root>/data.pkl`` — a pickle of the module tree: each module is a ``__torch__.*`` class
  rebuilt from a dict of its attributes, each tensor a ``torch._utils._rebuild_tensor_v2`` call
  on a storage that is a persistent id ``('storage', torch.<T>Storage, key, location, numel)``;
* ``<root>/data/<key>`` — the raw bytes of each storage;
* ``<root>/code/**.py`` — the module classes, whose ``__parameters__`` / ``__buffers__`` lists
  say which tensor attributes belong in the state dict.

:func:`read_state_dict` unpickles ``data.pkl`` with an allow-list even smaller than
``weights_only``'s: tensors, storages, ``OrderedDict``, ``torch.device`` and TorchScript's
identity list builders.  ``__torch__`` classes become inert records of their attributes; any
other global raises :class:`UnsafeGlobal` before it is called.  The class files are parsed with
:mod:`ast` (never executed) for the parameter and buffer names.  The result is what
``torch.jit.load(path).state_dict()`` returns: parameters, then buffers, then each submodule's,
under dotted names.
"""

from __future__ import annotations

import ast
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import IO

import torch


class UnsafeGlobal(pickle.UnpicklingError):
    """``data.pkl`` names a global outside the allow-list (its ``args[0]``: ``module.name``)."""


def is_torchscript(names: Sequence[str]) -> bool:
    """TorchScript archives hold ``<root>/constants.pkl`` and ``<root>/code/``; torch.save not."""
    parts = [n.split("/") for n in names]
    return any(p[1:] == ["constants.pkl"] or (len(p) > 2 and p[1] == "code") for p in parts)


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32,
    "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _StorageType:
    """Stands for ``torch.<T>Storage`` in a persistent id: just its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ScriptObject:
    """A ``__torch__.*`` object (a module) as plain data: its class name and attribute state."""

    qualname = ""

    def __setstate__(self, state: object) -> None:  # pickle's BUILD; runs nothing of the file
        self.state = state


def _identity(value: object, *_: object) -> object:
    return value


_ALLOWED: dict[tuple[str, str], Callable[..., object]] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "device"): torch.device,
    # TorchScript's typed containers: in torch.jit._pickle these return their argument.
    **{("torch.jit._pickle", n): _identity for n in (
        "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
        "restore_type_tag")},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, fh: IO[bytes], zf: zipfile.ZipFile, root: str) -> None:
        super().__init__(fh)
        self._zf, self._root = zf, root
        self._classes: dict[str, type[_ScriptObject]] = {}
        self._storages: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise UnsafeGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, _location, _numel = pid
        if key not in self._storages:
            data = bytearray(self._zf.read(f"{self._root}/data/{key}"))
            raw = (torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data
                   else torch.UntypedStorage(0))
            self._storages[key] = torch.storage.TypedStorage(
                wrap_storage=raw, dtype=kind.dtype, _internal=True)
        return self._storages[key]


def _class_slots(zf: zipfile.ZipFile, root: str, names: Sequence[str]
                 ) -> dict[str, tuple[bool, list[str]]]:
    """``{qualname: (is a module, parameter + buffer names)}`` from the archive's class files."""
    prefix = f"{root}/code/"
    out: dict[str, tuple[bool, list[str]]] = {}
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix):-3].replace("/", ".")
        try:
            tree = ast.parse(zf.read(name).decode("utf-8"))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # classes without information keep every tensor attribute
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            slots: dict[str, list[str]] = {"__parameters__": [], "__buffers__": []}
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id in slots and isinstance(stmt.value, ast.List)):
                    slots[stmt.targets[0].id] = [e.value for e in stmt.value.elts
                                                 if isinstance(e, ast.Constant)
                                                 and isinstance(e.value, str)]
            is_module = any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases)
            out[f"{module}.{node.name}"] = (is_module,
                                            slots["__parameters__"] + slots["__buffers__"])
    return out


def _collect(obj: _ScriptObject, prefix: str, slots: dict[str, tuple[bool, list[str]]],
             out: dict[str, torch.Tensor], path: tuple[int, ...]) -> None:
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or id(obj) in path:
        return
    known = slots.get(obj.qualname)
    keys = known[1] if known is not None else [k for k in state if isinstance(k, str)]
    for key in keys:
        if isinstance(state.get(key), torch.Tensor):
            out[prefix + key] = state[key].detach()
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, _ScriptObject):
            sub = slots.get(value.qualname)
            if sub is None or sub[0]:  # submodules (or classes we know nothing about)
                _collect(value, f"{prefix}{key}.", slots, out, (*path, id(obj)))


def read_state_dict(zf: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """The parameters and buffers of the module a TorchScript archive holds, on the CPU.

    Raises :class:`UnsafeGlobal` for a pickle that names anything beyond tensors and module
    records, and ``KeyError`` / ``pickle.UnpicklingError`` / ``RuntimeError`` (bad offsets,
    missing records) for a damaged archive.
    """
    names = zf.namelist()
    root = next((n[: -len("/data.pkl")] for n in names
                 if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if root is None:
        raise KeyError("the archive has no data.pkl")
    order = next((n for n in names if n == f"{root}/byteorder"), None)
    if order is not None and zf.read(order).decode(errors="replace").strip() != sys.byteorder:
        raise ValueError("the archive was written on a machine with the other byte order")
    with zf.open(f"{root}/data.pkl") as fh:
        top = _Unpickler(fh, zf, root).load()
    out: dict[str, torch.Tensor] = {}
    if isinstance(top, _ScriptObject):
        _collect(top, "", _class_slots(zf, root, names), out, ())
    return out
