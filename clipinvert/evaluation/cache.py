"""Features worth keeping between runs: Inception statistics of FID reference sets.

A reference set (a folder of real images, or the inputs of the scored pairs) is usually scored
against many times; its mean and covariance are kept in the cache folder under a key made of
the content hashes of its images (sha256 of each file, sorted, so names and order do not
matter) and of the Inception weights.  A second run reads them instead of recomputing.
docs/evaluation.md#fid
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import imaging
from ..errors import ClipInvertError, first_line
from ..fileio import atomic_write
from ..locations import cache_dir
from ..weights.cache import file_identity
from ..weights.download import sha256_file
from .fid import FIDStatistics, fid_statistics

CACHE_VERSION = "1"


def set_key(paths: Sequence[Path], weights: Path) -> str:
    """Content key of an image set scored with the Inception file ``weights``."""
    digest = hashlib.sha256(f"fid-stats:{CACHE_VERSION}:".encode())
    digest.update(str(file_identity(weights)["sha256"]).encode())
    for sha in sorted(sha256_file(p) for p in paths):
        digest.update(sha.encode())
    return digest.hexdigest()


def reference_statistics(paths: Sequence[Path], inception: Any, weights: Path
                         ) -> tuple[FIDStatistics, int, list[str]]:
    """FID statistics of the readable images among ``paths`` (cached by content), how many
    images went in, and one note per image that could not be read."""
    notes: list[str] = []
    readable = []
    for p in paths:
        if Path(p).is_file():
            readable.append(Path(p))
        else:
            notes.append(f"FID reference {p}: not found, left out")
    key = set_key(readable, weights)
    path = cache_dir() / "fid-stats" / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                # what could not be read when the statistics were made is said again
                kept = [str(n) for n in z["notes"]] if "notes" in z.files else []
                return (FIDStatistics(z["mu"], z["sigma"], int(z["n"])), int(z["n"]),
                        notes + kept)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is recomputed and replaced
    missing = len(notes)
    feats = inception.from_pil(_images(readable, notes))
    stats = fid_statistics(feats)
    buffer = io.BytesIO()
    np.savez(buffer, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
             notes=np.array(notes[missing:], dtype=str))
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return stats, stats.n, notes


def _images(paths: Sequence[Path], notes: list[str]) -> Iterator[Any]:
    for p in paths:
        try:
            yield imaging.load_image(p)
        except (ClipInvertError, OSError) as exc:
            notes.append(f"FID reference {p}: {first_line(exc)}; left out")
