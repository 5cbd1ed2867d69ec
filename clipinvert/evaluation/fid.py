"""FID as pytorch-fid 0.3.0 computes it (the paper's numbers were measured with pytorch-fid).

Features: :class:`InceptionFeatures` runs pytorch-fid's FID Inception
(:class:`~clipinvert.nets.inception.FIDInceptionV3`, weights from the registry role
``inception``) on images in [0, 1] — pytorch-fid's own input convention, ``PIL.convert("RGB")``
then ``ToTensor`` — and returns the 2048-d pool3 features as float64, as pytorch-fid's
``get_activations`` stores them.  Statistics: :func:`fid_statistics` (``np.mean`` over images,
``np.cov(rowvar=False)``, float64).  Distance: :func:`frechet_distance` hands both to
pytorch-fid's ``calculate_frechet_distance`` (scipy's ``sqrtm``; the maths is not rewritten
here).  :func:`small_set_warning` says when a set is too small for a full-rank covariance.
See docs/metric-fid.md.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from pytorch_fid import fid_score
from scipy import linalg
from torchvision.transforms.functional import to_tensor

from ..nets.inception import FID_DIMS

# pytorch-fid's default --batch-size; the features do not depend on it.
DEFAULT_BATCH_SIZE = 50
# A little slack above 1 for images resampled in float before they reach us.
_RANGE_SLACK = 1e-3


class FIDStatistics(NamedTuple):
    """The Gaussian FID compares: mean (D,) and covariance (D, D) of a set's features, float64;
    ``n`` images went into them."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def pil_to_unit(image: Image.Image) -> torch.Tensor:
    """A PIL image → (3, H, W) float32 in [0, 1]: pytorch-fid's ``ImagePathDataset``
    (``convert("RGB")``) followed by its ``TF.ToTensor()`` (``/255``)."""
    return to_tensor(image.convert("RGB"))


class InceptionFeatures:
    """pool3 features of images for FID, batched on ``device`` under ``torch.no_grad``.

    ``net`` maps (B, 3, H, W) in [0, 1] to (B, 2048); it is the network
    :func:`clipinvert.checkpoints.load_inception` returns (or any module with that contract,
    e.g. in tests).  Images of any size: the network resizes each one to 299×299 itself.
    """

    def __init__(self, net: torch.nn.Module, *, device: torch.device | str = "cpu",
                 batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.batch_size = batch_size

    @classmethod
    def from_file(cls, path: Path | str, *, device: torch.device | str = "cpu",
                  batch_size: int = DEFAULT_BATCH_SIZE, trust: bool = False
                  ) -> InceptionFeatures:
        """The network from ``pt_inception-2015-12-05-6726825d.pth`` (registry role
        ``inception``); a wrong or broken file is one :class:`~clipinvert.errors.WeightsError`
        line naming it."""
        from ..checkpoints import load_inception

        return cls(load_inception(path, trust=trust), device=device, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) floats in [0, 1] → (B, 2048) float64 features, ``batch_size`` at a time.

        Images in [0, 255] or [−1, 1] would give plausible-looking but wrong FIDs, so the range
        is checked once per call (one device sync) and refused with a ValueError.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID features take RGB images (B, 3, H, W) in [0, 1], got shape "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"FID features take float images in [0, 1] (PIL → ToTensor), got "
                             f"{images.dtype}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
                raise ValueError(f"FID features take images in [0, 1] (PIL → ToTensor), got "
                                 f"values in [{lo:.3g}, {hi:.3g}]")
        out = np.empty((images.shape[0], FID_DIMS), dtype=np.float64)
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device, torch.float32)
            feats = self.net(batch)
            if feats.shape != (batch.shape[0], FID_DIMS):
                raise ValueError(f"the FID network returned {tuple(feats.shape)}, expected "
                                 f"({batch.shape[0]}, {FID_DIMS})")
            out[start:start + batch.shape[0]] = feats.cpu().numpy()  # float32 → float64
        return out

    def from_pil(self, images: Iterable[Image.Image]) -> np.ndarray:
        """Features of PIL images (any mode, any sizes) → (N, 2048) float64.

        Consecutive images of one size go through together, up to ``batch_size``; the
        images are converted as they are consumed, so a generator keeps memory flat.
        """
        parts = [self(torch.stack(batch)) for batch in _same_size_batches(
            (pil_to_unit(im) for im in images), self.batch_size)]
        return np.concatenate(parts) if parts else np.empty((0, FID_DIMS), dtype=np.float64)


def _same_size_batches(tensors: Iterable[torch.Tensor], size: int
                       ) -> Iterator[list[torch.Tensor]]:
    batch: list[torch.Tensor] = []
    for t in tensors:
        if batch and (len(batch) == size or t.shape != batch[0].shape):
            yield batch
            batch = []
        batch.append(t)
    if batch:
        yield batch


def fid_statistics(features: np.ndarray) -> FIDStatistics:
    """Mean and covariance of (N, D) features in float64, as pytorch-fid's
    ``calculate_activation_statistics`` computes them (``np.cov`` divides by N − 1)."""
    act = np.asarray(features, dtype=np.float64)
    if act.ndim != 2:
        raise ValueError(f"FID statistics take features (N, D), got shape {act.shape}")
    if act.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {act.shape[0]}")
    return FIDStatistics(np.mean(act, axis=0), np.cov(act, rowvar=False), int(act.shape[0]))


def small_set_warning(n_a: int, n_b: int, dims: int = FID_DIMS) -> str | None:
    """A one-line caveat when either set has no more images than feature dimensions, else None.

    The covariance of N images has rank ≤ N − 1, so with N ≤ ``dims`` it is singular: the
    FID is still computed (pytorch-fid does, and adds ε to the diagonal if ``sqrtm`` fails),
    but it is biased upwards and not comparable with FIDs over larger sets.
    """
    n = min(n_a, n_b)
    if n > dims:
        return None
    return (f"FID over {n_a} and {n_b} images: a set of ≤ {dims} images has a singular "
            f"{dims}×{dims} covariance, so this FID is biased high and not comparable with "
            f"FIDs over more than {dims} images (such as the paper's)")


def frechet_distance(a: FIDStatistics | tuple[np.ndarray, np.ndarray],
                     b: FIDStatistics | tuple[np.ndarray, np.ndarray], *,
                     notes: list[str] | None = None) -> float:
    """pytorch-fid's ``calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)`` as a float:
    ‖μa − μb‖² + Tr(Σa + Σb − 2·sqrtm(Σa·Σb)).

    pytorch-fid ``print``s a line when the product is singular and it retries with ε on the
    diagonal; that line is kept off stdout (which may carry JSON) and appended to ``notes``,
    or written to stderr when no list is given.  SciPy ≥ 1.16's deprecation warning about the
    ``disp`` argument pytorch-fid passes to ``sqrtm`` is silenced.
    """
    mu_a, sigma_a = (np.asarray(x, dtype=np.float64) for x in a[:2])
    mu_b, sigma_b = (np.asarray(x, dtype=np.float64) for x in b[:2])
    for name, mu, sigma in (("first", mu_a, sigma_a), ("second", mu_b, sigma_b)):
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FID: the {name} set's statistics have shapes mu {mu.shape}, "
                             f"sigma {sigma.shape}; expected (D,) and (D, D)")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"FID: the two sets' features differ in size ({mu_a.shape[0]} vs "
                         f"{mu_b.shape[0]})")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`disp` argument is deprecated",
                                category=DeprecationWarning)
        # SciPy's "matrix is singular" warning: pytorch-fid then retries with ε on the
        # diagonal and prints a line, which becomes a note; small_set_warning says why.
        warnings.simplefilter("ignore", category=linalg.LinAlgWarning)
        value = fid_score.calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    for line in printed.getvalue().splitlines():
        if line.strip():
            if notes is not None:
                notes.append(f"pytorch-fid: {line.strip()}")
            else:
                print(f"pytorch-fid: {line.strip()}", file=sys.stderr)
    return float(value)
