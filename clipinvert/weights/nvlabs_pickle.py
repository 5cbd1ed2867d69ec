"""Reading NVlabs' network pickles (``*.pkl``) as data, never as code.

Why a reader of our own: an NVlabs StyleGAN2-ADA / StyleGAN3 snapshot is a plain ``pickle`` whose
networks are ``torch_utils.persistence`` objects.  Each one pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, and that function ``exec``\\ s
``meta['module_src']`` — the Python source of the module that defined the class — to rebuild it.
Loading such a file with ``pickle.load`` (or NVlabs' ``legacy.load_network_pkl``) runs whatever
source the file carries, and allow-listing that function would allow exactly that.  NVlabs'
TensorFlow pickles (``dnnlib.tflib.network.Network``) carry their build source the same way.

So :class:`RestrictedUnpickler` resolves a handful of globals, each to a function of ours:

* ``_reconstruct_persistent_obj`` → a :class:`PersistentRecord`: an inert record of ``meta``
  (``class_name``, ``module_src`` kept as a string, ``state``, ``version``);
* ``dnnlib.tflib.network.Network`` → a :class:`TFNetworkRecord` holding the pickled state dict
  (``variables``, ``components``, ``static_kwargs``, ``build_module_src`` as a string);
* tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter(_with_state)`` and
  ``torch.storage._load_from_bytes`` (a storage pickles as the bytes of a legacy ``torch.save``
  of itself; we read those with ``torch.load(weights_only=True)``);
* numpy arrays, scalars and dtypes (``numpy.core.*`` or, from numpy 2, ``numpy._core.*``),
  ``collections.OrderedDict``, ``dnnlib.util.EasyDict`` (as a dict),
  ``torch.Size`` (as a tuple).

Anything else — ``os.system``, ``builtins.exec``, a class to build — is refused with one
:class:`~clipinvert.errors.WeightsError` line naming the global, before it could run.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import WeightsError, first_line
from .safety import check_file

# torch.save's legacy (pre-zip) format opens with protocol 2 and this magic number; a plain
# pickle (NVlabs' .pkl) opens with PROTO and anything else.
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


@dataclass
class PersistentRecord:
    """What a ``torch_utils.persistence`` object holds, as data: its class name, the module
    source it would have executed (a string, never run) and its pickled ``state`` (an
    ``nn.Module``'s ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``, attributes)."""

    class_name: str
    module_src: str = field(repr=False)
    state: dict = field(repr=False)
    version: object = None

    @property
    def init_kwargs(self) -> dict:
        kwargs = self.state.get("_init_kwargs")
        return dict(kwargs) if isinstance(kwargs, Mapping) else {}

    def child(self, name: str) -> PersistentRecord | None:
        """The submodule ``name`` (``_modules[name]``), if it is a record."""
        mods = self.state.get("_modules")
        sub = mods.get(name) if isinstance(mods, Mapping) else None
        return sub if isinstance(sub, PersistentRecord) else None

    def modules(self, prefix: str = "") -> Iterator[tuple[str, PersistentRecord]]:
        """``(dotted name, record)`` for this record and every record below it."""
        yield prefix.rstrip("."), self
        mods = self.state.get("_modules")
        for name, sub in (mods.items() if isinstance(mods, Mapping) else ()):
            if isinstance(sub, PersistentRecord):
                yield from sub.modules(f"{prefix}{name}.")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors ``nn.Module.state_dict()`` would return: parameters and persistent
        buffers of this record and its sub-records, under dotted names."""
        out: dict[str, torch.Tensor] = {}
        for name, rec in self.modules():
            pre = f"{name}." if name else ""
            skip = rec.state.get("_non_persistent_buffers_set") or set()
            for kind in ("_parameters", "_buffers"):
                table = rec.state.get(kind)
                for key, value in (table.items() if isinstance(table, Mapping) else ()):
                    if isinstance(value, torch.Tensor) and key not in skip:
                        out[pre + key] = value
        return out


def _reconstruct_record(meta: object) -> PersistentRecord:
    if not isinstance(meta, Mapping) or meta.get("type", "class") != "class":
        raise pickle.UnpicklingError("a persistent object whose record is not a class record")
    state = meta.get("state")
    return PersistentRecord(class_name=str(meta.get("class_name")),
                            module_src=str(meta.get("module_src", "")),
                            state=dict(state) if isinstance(state, Mapping) else {},
                            version=meta.get("version"))


class TFNetworkRecord:
    """A ``dnnlib.tflib.network.Network`` of NVlabs' TensorFlow pickles, as its state dict
    (``version``, ``name``, ``static_kwargs``, ``components``, ``variables``: a list of
    ``(name, ndarray)``, ``build_module_src``: a string, never run)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.state: dict = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, Mapping):
            raise pickle.UnpicklingError("a TensorFlow network whose state is not a dict")
        self.state = dict(state)

    def params(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Every variable of this network and its components, ``component/…/name`` → array
        (the names NVlabs' ``legacy.py`` matches)."""
        out: dict[str, np.ndarray] = {}
        for name, value in self.state.get("variables") or ():
            out[prefix + str(name)] = value
        for name, comp in dict(self.state.get("components") or {}).items():
            if isinstance(comp, TFNetworkRecord):
                out.update(comp.params(f"{prefix}{name}/"))
        return out


def _safe_reconstruct(cls: object, shape: object, dtype: object) -> np.ndarray:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("numpy _reconstruct of something other than an ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)  # type: ignore[call-overload]


def _safe_scalar(dtype: object, data: object = None) -> object:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not plain bytes of a plain type")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _load_storage(data: object) -> object:
    """A storage pickled by ``TypedStorage.__reduce__``: a legacy ``torch.save`` of itself."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("a storage that is not bytes")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage: object, offset: int, size: tuple, stride: tuple,
                    *args: object) -> torch.Tensor:
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())


def _rebuild_parameter(data: object, *args: object) -> torch.Tensor:
    """A ``Parameter`` as its data (no autograd state is wanted, and no hooks are kept)."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data.detach()


class PlainDict(dict):
    """``dnnlib.util.EasyDict`` (a dict subclass, pickled as one): read as a plain dict."""


def _size(*args: object) -> tuple:
    return tuple(*args)  # type: ignore[arg-type]


# numpy's pickling helpers, under numpy 1's ``numpy.core`` and numpy 2's ``numpy._core``.
_NUMPY = {(f"numpy.{pkg}.multiarray", name): fn for pkg in ("core", "_core")
          for name, fn in (("_reconstruct", _safe_reconstruct), ("scalar", _safe_scalar))}

#: (module, name) → what it resolves to.  Nothing here executes code from the file.
ALLOWED: dict[tuple[str, str], Callable[..., object] | type] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_record,
    ("dnnlib.tflib.network", "Network"): TFNetworkRecord,
    ("dnnlib.util", "EasyDict"): PlainDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch", "Size"): _size,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **_NUMPY,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global that is not in :data:`ALLOWED`; ``args[0]`` names it."""


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only :data:`ALLOWED` globals (see the module)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> Any:
        raise pickle.UnpicklingError("a persistent id (a torch.save file, not a plain pickle)")


def is_plain_pickle(head: bytes) -> bool:
    """A pickle that is not a legacy ``torch.save`` file (an NVlabs ``.pkl``)."""
    return head[:1] == b"\x80" and not head.startswith(TORCH_LEGACY_MAGIC)


def read_network_pickle(path: Path | str, what: str = "NVlabs network") -> object:
    """The contents of an NVlabs network pickle, networks as records; never runs its code.

    Every failure is one :class:`WeightsError` line naming the file: a refused global (named),
    a truncated or corrupt file, a file that is not a pickle.
    """
    path = Path(path)
    head = check_file(path, what)
    if not is_plain_pickle(head):
        raise WeightsError(f"{what} file {path} is not a network pickle")
    try:
        with path.open("rb") as fh:
            data = RestrictedUnpickler(fh).load()
    except RefusedGlobal as exc:
        raise WeightsError(f"{what} file {path} asks for {exc.args[0]}, which is not plain "
                           "weights; refused (nothing from it was run)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RuntimeError, MemoryError) as exc:
        raise WeightsError(f"{what} file {path} is truncated or corrupt ({first_line(exc)})"
                           " — download it again") from None
    return data
