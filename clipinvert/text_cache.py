"""Text embeddings kept on disk, so a prompt already seen costs no CLIP at all.

An edit needs CLIP only for its prompts' embeddings, but reaching them costs start-up: importing
open_clip (about 2 s on the 2-core CI machine), reading and building the 577 MiB ViT-B/32 (1 s),
then one text forward.  Batch pipelines run the same prompts again and again, so each
embedding is stored under the cache folder (``text-embeddings/``), keyed by the CLIP file's
content (its sha256, itself cached), the architecture, the device type and dtype CLIP ran in
(so a reuse gives exactly the bits a fresh computation would), and the prompt.  With it the
token count is kept, which the prompt check reports.  ``CLIPINVERT_NO_TEXT_CACHE=1`` turns it
off.  Nothing here imports open_clip.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write
from .locations import cache_dir

VERSION = 2  # bump when the embedding's computation changes (2: CLIP always in float32)


@dataclass(frozen=True)
class CachedText:
    embedding: torch.Tensor  # (D,) float32, on the CPU
    tokens: int
    context_length: int


class TextCache:
    """Embeddings of one CLIP file run on one device type and dtype."""

    def __init__(self, weights: Path, arch: str, device: torch.device, dtype: torch.dtype
                 ) -> None:
        from .weights.cache import file_identity

        self.enabled = os.environ.get("CLIPINVERT_NO_TEXT_CACHE", "").strip() in ("", "0")
        ident = file_identity(weights)["sha256"] if self.enabled else ""
        self.scope = f"{VERSION}|{ident}|{arch}|{device.type}|{dtype}"
        self.folder = cache_dir() / "text-embeddings"

    def _path(self, prompt: str) -> Path:
        key = hashlib.sha256(f"{self.scope}|{prompt}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, prompt: str) -> CachedText | None:
        if not self.enabled:
            return None
        try:
            with np.load(self._path(prompt)) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("prompt") != prompt:  # a hash collision, however unlikely
                    return None
                return CachedText(torch.from_numpy(z["embedding"].copy()), int(meta["tokens"]),
                                  int(meta["context_length"]))
        except (OSError, ValueError, KeyError):  # absent or damaged: computed again
            return None

    def put(self, prompt: str, embedding: torch.Tensor, tokens: int,
            context_length: int) -> None:
        if not self.enabled:
            return
        buffer = io.BytesIO()
        meta = json.dumps({"prompt": prompt, "tokens": tokens, "context_length": context_length})
        np.savez(buffer, embedding=embedding.detach().float().cpu().numpy(), meta=np.array(meta))
        try:
            atomic_write(self._path(prompt), lambda tmp: tmp.write_bytes(buffer.getvalue()))
        except OSError:
            pass  # a read-only cache folder only costs the next run the computation
