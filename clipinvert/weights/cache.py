"""Fast reloads: a safetensors copy of each released checkpoint, kept in the cache.

Why: the released files are pickles.  Unpickling a 1.2 GB e4e file means running the restricted
unpickler over hundreds of records and copying every tensor out of the zip; a safetensors file is
a JSON header plus raw bytes that are memory-mapped, with no pickle at all (so also nothing that
could run code).  The first load of a file converts it; later loads read the copy.

Layout under ``<cache_dir()>/safetensors/``::

    <sha256 of the source>.safetensors   tensors + the nested structure as JSON metadata
    keys/<fast key>                      text: the source's sha256

*Keyed by the source's hash* so two copies of one file share a conversion and a changed file can
never be served stale.  But hashing 1.2 GB on every load would cost about as much as the load we
are trying to avoid, so each load looks up a **fast key** — sha256 of (resolved path, size,
mtime_ns) — that was written next to the conversion when the source's sha256 was computed (once,
at conversion time).  Replacing or touching the source changes the fast key, so the next load
re-hashes it and either finds the conversion (same content) or converts again.

Structure: a checkpoint is a nested dict (``{'state_dict': {...}, 'latent_avg': T, 'opts': {...}}``
or rosinality's ``{'g_ema': …, 'args': Namespace}``).  Tensor leaves are stored under their
``/``-joined key path; everything else (dicts with any key type, lists, tuples, Namespaces, plain
scalars) is stored as tagged JSON in the safetensors metadata and rebuilt exactly.  One tensor
object that appears twice (``g`` and ``g_ema`` in training checkpoints) is stored once and comes
back as one object; distinct tensors that share memory are cloned (safetensors refuses shared
storage).  A checkpoint holding anything else is simply not cached.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..fileio import atomic_write, atomic_write_text
from ..locations import cache_dir
from .download import sha256_file
from .safety import load_checkpoint

FORMAT = "clipinvert-tree/1"
# Smaller files load in milliseconds from the pickle; converting them only fills the cache.
MIN_BYTES = 8 << 20
_DISABLE_ENV = "CLIPINVERT_NO_SAFETENSORS_CACHE"


def cache_root() -> Path:
    return cache_dir() / "safetensors"


def fast_key(path: Path) -> str:
    """sha256 of (resolved path, size, mtime_ns): cheap, and changes whenever the file does."""
    path = Path(path).resolve()
    st = path.stat()
    return hashlib.sha256(f"v1\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


class _Unsupported(Exception):
    """The checkpoint holds something the safetensors copy cannot represent exactly."""


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, str] = {}

    def _name(self, parts: list[str]) -> str:
        base = "/".join(parts) or "tensor"
        name, n = base, 1
        while name in self.tensors:
            name, n = f"{base}#{n}", n + 1
        return name

    def encode(self, obj: object, parts: list[str]) -> object:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized or obj.is_complex():
                raise _Unsupported(f"a {obj.layout} / {obj.dtype} tensor")
            if id(obj) not in self._by_id:
                name = self._name(parts)
                self.tensors[name] = obj.detach()
                self._by_id[id(obj)] = name
            return {"$t": self._by_id[id(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {"$d": {k: self.encode(v, [*parts, k]) for k, v in obj.items()}}
            return {"$kv": [[self.encode(k, [*parts, "key"]), self.encode(v, [*parts, str(k)])]
                            for k, v in obj.items()]}
        if isinstance(obj, list):
            return [self.encode(v, [*parts, str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, torch.Size):
            return {"$size": list(obj)}
        if isinstance(obj, tuple):
            return {"$tu": [self.encode(v, [*parts, str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, argparse.Namespace):
            return {"$ns": {k: self.encode(v, [*parts, k]) for k, v in vars(obj).items()}}
        raise _Unsupported(type(obj).__name__)

    def storable(self) -> dict[str, torch.Tensor]:
        """Contiguous tensors with no shared storage (clone where needed)."""
        owners: dict[int, int] = {}
        for t in self.tensors.values():
            if t.numel():
                ptr = t.untyped_storage().data_ptr()
                owners[ptr] = owners.get(ptr, 0) + 1
        out = {}
        for name, t in self.tensors.items():
            whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
            shared = t.numel() and owners[t.untyped_storage().data_ptr()] > 1
            out[name] = t.contiguous().clone() if shared or not whole \
                or not t.is_contiguous() else t
        return out


def _decode(obj: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    (tag, value), = obj.items()
    if tag == "$t":
        return tensors[value]
    if tag == "$d":
        return {k: _decode(v, tensors) for k, v in value.items()}
    if tag == "$kv":
        return {_freeze(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
    if tag == "$tu":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "$size":
        return torch.Size(value)
    if tag == "$ns":
        return argparse.Namespace(**{k: _decode(v, tensors) for k, v in value.items()})
    raise ValueError(f"unknown tag {tag!r}")


def _freeze(key: object) -> object:
    return tuple(_freeze(k) for k in key) if isinstance(key, list) else key


def save_tree(obj: dict, target: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``obj`` (a nested checkpoint dict) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    enc = _Encoder()
    tree = enc.encode(obj, [])
    meta = {"format": FORMAT, "tree": json.dumps(tree, separators=(",", ":")),
            **(metadata or {})}
    atomic_write(target, lambda tmp: save_file(enc.storable(), str(tmp), metadata=meta))


def load_tree(path: Path) -> dict:
    """Read a file written by :func:`save_tree` (memory-mapped; no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        tensors = {k: _aligned(fh.get_tensor(k)) for k in fh.keys()}
    obj = _decode(json.loads(meta["tree"]), tensors)
    if not isinstance(obj, dict):
        raise ValueError("the stored checkpoint is not a dict")
    return obj


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every fresh tensor


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when its data starts on a 64-byte boundary, else an aligned copy.

    Tensors memory-mapped from a safetensors file start wherever the file packs them.  CPU
    kernels take other vector paths on unaligned data, so the same weights gave other bits
    than after a plain ``torch.load``: a training run that loaded its weights from ``.pt``
    and its resumed twin that loaded the cached copy parted ways (seen at one thread).  Aligned
    tensors stay memory-mapped; only the others are copied.
    """
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def _enabled(min_bytes: int, size: int) -> bool:
    off = os.environ.get(_DISABLE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    return not off and size >= min_bytes


def cached_path(path: Path | str) -> Path | None:
    """The safetensors copy serving ``path`` right now (by fast key), if there is one."""
    with contextlib.suppress(OSError, ValueError):
        sha = (cache_root() / "keys" / fast_key(Path(path))).read_text(encoding="ascii").strip()
        copy = cache_root() / f"{sha}.safetensors"
        if copy.is_file():
            return copy
    return None


def file_identity(path: Path | str) -> dict[str, object]:
    """``{path, size, mtime_ns, sha256}`` of a weight file, hashing it at most once.

    Run manifests record which model files made their outputs.  Hashing a 1 GB file on every
    run would cost seconds, so the sha256 is remembered under the file's fast key (the same
    ``keys/`` record the safetensors conversion writes) and recomputed only when the file's
    path, size or mtime changes.
    """
    path = Path(path).resolve()
    st = path.stat()
    key_file = cache_root() / "keys" / fast_key(path)
    sha = None
    with contextlib.suppress(OSError, ValueError):
        sha = key_file.read_text(encoding="ascii").strip() or None
    if sha is None:
        sha = sha256_file(path)
        with contextlib.suppress(OSError):
            atomic_write_text(key_file, sha, encoding="ascii")
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}


def cached_state(path: Path | str, *, trust: bool = False, what: str = "model",
                 min_bytes: int = MIN_BYTES,
                 loader: Callable[[Path], dict] | None = None) -> dict:
    """Load a checkpoint dict, from its safetensors copy when there is one.

    Miss: hash the source once; if a copy of that content exists, use it; otherwise load the
    source with :func:`~clipinvert.weights.safety.load_checkpoint` (``weights_only``; ``trust``
    as given) and write the copy.  Loads made with ``trust=True`` are never converted, so a file
    that needs ``--trust-checkpoint`` keeps needing it.  Files below ``min_bytes``, and every
    file when ``$CLIPINVERT_NO_SAFETENSORS_CACHE=1``, bypass the cache.  Any cache trouble
    (unwritable folder, a damaged copy) falls back to the source: the cache is never a reason
    for a load to fail.  ``loader`` replaces the plain checkpoint reader:
    :func:`~clipinvert.weights.reader.read_weights` passes one with the caller's ``formats``
    (e.g. CLIP's TorchScript archives); what it returns is what gets cached.
    """
    path = Path(path)
    if loader is None:
        def loader(p: Path) -> dict:
            return load_checkpoint(p, trust=trust, what=what)
    if not path.is_file() or not _enabled(min_bytes, path.stat().st_size):
        return loader(path)
    root = cache_root()
    copy = cached_path(path)
    if copy is not None:
        with contextlib.suppress(Exception):
            return load_tree(copy)
        copy.unlink(missing_ok=True)  # damaged: convert again below
    try:
        key = fast_key(path)
        sha = sha256_file(path)
    except OSError:
        return loader(path)
    copy = root / f"{sha}.safetensors"
    if copy.is_file():
        with contextlib.suppress(Exception):
            obj = load_tree(copy)
            with contextlib.suppress(OSError):
                atomic_write_text(root / "keys" / key, sha, encoding="ascii")
            return obj
        copy.unlink(missing_ok=True)
    obj = loader(path)
    if trust:
        return obj
    with contextlib.suppress(_Unsupported, OSError, RuntimeError, ValueError, TypeError):
        save_tree(obj, copy, {"source": str(path.resolve()), "source_sha256": sha,
                              "source_size": str(path.stat().st_size)})
        atomic_write_text(root / "keys" / key, sha, encoding="ascii")
    return obj


def clear_cache() -> int:
    """Delete every safetensors copy; return the bytes freed."""
    root = cache_root()
    if not root.exists():
        return 0
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root, ignore_errors=True)
    return freed
