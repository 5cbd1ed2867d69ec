"""Paste an edited face crop back into the original photo.

The crop's transform dict (from :func:`clipinvert.align.ffhq.align_ffhq`) says which parallelogram
of the original the crop covers.  We warp the edited face back with the inverse affine map and
blend it in with a feathered mask, so that:

* the output has the original size and mode (RGB, RGBA with its alpha kept, or L);
* pixels outside the crop's footprint are bit-identical to the original (we only touch the
  quad's bounding box, and the mask is exactly 0 at and beyond the crop border);
* reflection-padded parts of the crop, which lie outside the original photo, simply fall off the
  canvas;
* the seam is invisible: the mask is 1 inside the crop square shrunk by ``feather`` of its side
  and falls smoothly (a Gaussian-blurred edge) to exactly 0 at the crop border.

The edited face may be any square size (e.g. the generator's 1024 output): when it is larger than
its footprint in the photo it is first reduced with LANCZOS so the bicubic warp does not alias.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
from scipy.special import ndtr

from clipinvert.align.ffhq import check_transform, crop_to_source_matrix
from clipinvert.errors import InputError

_MASK_SIZE = 512
_SIGMAS = 3.0  # the Gaussian edge spans ±3 sigma across the feather band


def feather_mask(size: int, feather: float = 0.1) -> np.ndarray:
    """(size, size) float32 mask: 1 inside the square shrunk by ``feather·size``, 0 at its edge.

    This is a square of half-band inset blurred by a Gaussian (sigma = band/6), computed in
    closed form per axis (a blurred box is a product of erf profiles) and rescaled so it is
    exactly 0 on the border and exactly 1 from one band inwards — a plain blur never reaches 0.
    """
    centres = np.arange(size, dtype=np.float64) + 0.5
    dist = np.minimum(centres, size - centres)  # distance to the nearer edge, pixels
    band = float(feather) * size
    if band <= 0:
        profile = np.ones(size)
    else:
        sigma = band / (2 * _SIGMAS)
        low, high = ndtr(-_SIGMAS), ndtr(_SIGMAS)
        profile = np.clip((ndtr((dist - band / 2) / sigma) - low) / (high - low), 0.0, 1.0)
    return np.outer(profile, profile).astype(np.float32)


def paste_back(
    original: PIL.Image.Image,
    face: PIL.Image.Image,
    transform: dict,
    feather: float = 0.1,
) -> PIL.Image.Image:
    """Return ``original`` with ``face`` (an edited crop) warped back into place.

    ``transform`` is the dict returned with the crop; ``original`` must be the photo it was made
    from (same size).  ``feather`` is the width of the blended band as a fraction of the crop
    side (0 gives a hard edge).  Raises :class:`InputError` on a size mismatch or bad transform.
    """
    check_transform(transform)
    if list(original.size) != [int(v) for v in transform["source_size"]]:
        raise InputError(
            f"photo is {original.size[0]}x{original.size[1]} but the crop was made from "
            f"{transform['source_size'][0]}x{transform['source_size'][1]}"
        )
    if face.size[0] != face.size[1]:
        raise InputError(f"edited face must be square, got {face.size[0]}x{face.size[1]}")
    if not 0.0 <= feather < 0.5:
        raise ValueError("feather must be in [0, 0.5)")

    base = original if original.mode in ("RGB", "RGBA", "L") else original.convert("RGB")
    colour_mode = "L" if base.mode == "L" else "RGB"
    face = face if face.mode == colour_mode else face.convert(colour_mode)

    quad = np.asarray(transform["quad"], dtype=np.float64)
    width, height = base.size
    x0 = max(int(math.floor(quad[:, 0].min())), 0)
    y0 = max(int(math.floor(quad[:, 1].min())), 0)
    x1 = min(int(math.ceil(quad[:, 0].max())), width)
    y1 = min(int(math.ceil(quad[:, 1].max())), height)
    if x1 <= x0 or y1 <= y0:
        return base.copy()
    region = (x1 - x0, y1 - y0)

    footprint = float(np.hypot(*(quad[3] - quad[0])))
    side = max(int(math.ceil(footprint)), 1)
    if face.size[0] > side:
        face = face.resize((side, side), PIL.Image.Resampling.LANCZOS)

    def region_to_crop(crop_size: int) -> tuple[float, ...]:
        # Region edge coords → source edge coords (shift) → crop edge coords (inverse affine).
        shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
        inv = np.linalg.inv(crop_to_source_matrix(transform, crop_size)) @ shift
        return tuple(inv[:2].flatten())

    warped = face.transform(
        region,
        PIL.Image.Transform.AFFINE,
        region_to_crop(face.size[0]),
        PIL.Image.Resampling.BICUBIC,
    )
    mask_img = PIL.Image.fromarray(feather_mask(_MASK_SIZE, feather))
    mask = np.asarray(
        mask_img.transform(
            region,
            PIL.Image.Transform.AFFINE,
            region_to_crop(_MASK_SIZE),
            PIL.Image.Resampling.BILINEAR,
        ),
        dtype=np.float32,
    )

    out = np.array(base)
    box = (slice(y0, y1), slice(x0, x1))
    channels = 1 if colour_mode == "L" else 3
    old = out[box] if channels == 1 else out[box][..., :3]
    new = np.asarray(warped, dtype=np.float32)
    weight = np.clip(mask, 0.0, 1.0)
    if channels == 3:
        weight = weight[..., None]
    blended = old.astype(np.float32) + (new - old.astype(np.float32)) * weight
    blended = np.where(weight > 0, np.clip(np.rint(blended), 0, 255), old).astype(np.uint8)
    if channels == 1:
        out[box] = blended
    else:
        out[y0:y1, x0:x1, :3] = blended
    # fromarray infers L / RGB / RGBA from the array's shape, i.e. the mode of ``base``.
    return PIL.Image.fromarray(out)
