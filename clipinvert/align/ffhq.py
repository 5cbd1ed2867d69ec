"""FFHQ face alignment (docs/alignment.md), reproducing the released crops step by step.

The released e4e / CLIPInverter models were trained and evaluated on crops made by the FFHQ
alignment procedure, so a different crop (even a "similar" one) shifts the inputs away from what
the encoder knows.  :func:`align_ffhq` therefore follows the same steps with the same constants and
filters — quad from the landmarks, integer shrink (LANCZOS), crop with a border, reflection pad
with blur and median blend, QUAD warp (BILINEAR) on ``quad + 0.5``, LANCZOS resize — and in
addition returns where the crop came from, so an edited crop can be pasted back.

Pixel conventions (both matter, and they differ):

* *index* coordinates: the centre of pixel column ``i`` is at ``x = i``.  dlib landmarks, and the
  quad computed from them, use this.
* *edge* coordinates: pixel column ``i`` covers ``[i, i + 1)``, its centre is at ``i + 0.5``.
  Pillow's ``transform`` uses this, which is why the released code passes ``quad + 0.5``.

The transform dict stores the final quad in **edge** coordinates of the **original** photo: the
quad that ``original.transform((N, N), Image.Transform.QUAD, quad)`` would need to reproduce the
crop (up to the shrink and pad filtering).  The point helpers below take and return index
coordinates, converting internally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import scipy.ndimage

from clipinvert.align.landmarks import FaceDetector
from clipinvert.errors import InputError

TRANSFORM_VERSION = 1
DEFAULT_SIZE = 256


@dataclass
class AlignedFace:
    """One aligned crop: the image, how it maps onto the original, and which face it is.

    ``index`` is the face's rank among the detections (0 = most confident).
    """

    image: PIL.Image.Image
    transform: dict
    score: float
    index: int


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """Oriented crop square of the FFHQ method, in index coordinates of the photo.

    Returns ``quad`` (4, 2) as ``[top-left, bottom-left, bottom-right, top-right]`` of the face
    (the order Pillow's QUAD transform takes) and its side length ``qsize``.  The arithmetic is
    done in the released order because the later floor/ceil of the quad bounds are sensitive to
    the last bit.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = float(np.hypot(*x) * 2)
    return quad, qsize


def _shrink(
    img: PIL.Image.Image, quad: np.ndarray, qsize: float, output_size: int
) -> tuple[PIL.Image.Image, np.ndarray, float, int, tuple[float, float]]:
    """Downscale by an integer factor when the face is much larger than the output.

    Returns the image, quad, qsize, the factor, and the true per-axis scale back to the original.
    The released code divides the quad by the integer factor while the image size is rounded, so
    the true scale (``W / round(W / s)``) is tracked separately for the transform dict.
    """
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink <= 1:
        return img, quad, qsize, 1, (1.0, 1.0)
    width, height = img.size
    rsize = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
    img = img.resize(rsize, PIL.Image.Resampling.LANCZOS)
    return img, quad / shrink, qsize / shrink, shrink, (width / rsize[0], height / rsize[1])


def _quad_bounds(quad: np.ndarray) -> tuple[int, int, int, int]:
    """Integer bounds of the quad, floor for the low side and ceil for the high side."""
    return (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )


def _crop(
    img: PIL.Image.Image, quad: np.ndarray, border: int
) -> tuple[PIL.Image.Image, np.ndarray, tuple[int, int, int, int]]:
    """Cut the quad bounds plus ``border``, clipped to the image; skipped if nothing is cut."""
    left, top, right, bottom = _quad_bounds(quad)
    box = (
        max(left - border, 0),
        max(top - border, 0),
        min(right + border, img.size[0]),
        min(bottom + border, img.size[1]),
    )
    if box[2] - box[0] < img.size[0] or box[3] - box[1] < img.size[1]:
        return img.crop(box), quad - box[0:2], box
    return img, quad, (0, 0, img.size[0], img.size[1])


def _pad(
    img: PIL.Image.Image, quad: np.ndarray, qsize: float, border: int
) -> tuple[PIL.Image.Image, np.ndarray, tuple[int, int, int, int]]:
    """Reflect-pad where the quad (plus border) leaves the image, then hide the seam.

    The reflected band is blurred (sigma 0.02·qsize) and blended towards the median colour the
    further it is from the photo, as the released code does, so that the encoder does not see
    mirrored faces.  The blur reaches a third of the pad width into the photo itself.
    """
    left, top, right, bottom = _quad_bounds(quad)
    need = (
        max(-left + border, 0),
        max(-top + border, 0),
        max(right - img.size[0] + border, 0),
        max(bottom - img.size[1] + border, 0),
    )
    if max(need) <= border - 4:
        return img, quad, (0, 0, 0, 0)
    pad = np.maximum(need, int(np.rint(qsize * 0.3)))
    arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w, _ = arr.shape
    yy, xx, _ = np.ogrid[:h, :w, :1]
    mask = np.maximum(
        1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
        1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
    )
    blur = qsize * 0.02
    arr += (scipy.ndimage.gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(
        mask * 3.0 + 1.0, 0.0, 1.0
    )
    arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
    out = PIL.Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)))
    return out, quad + pad[:2], (int(pad[0]), int(pad[1]), int(pad[2]), int(pad[3]))


def align_ffhq(
    image: PIL.Image.Image,
    landmarks: np.ndarray,
    output_size: int = DEFAULT_SIZE,
    transform_size: int = DEFAULT_SIZE,
) -> tuple[PIL.Image.Image, dict]:
    """Crop one face the way the released FFHQ alignment does; return the crop and its transform.

    ``landmarks`` are dlib's 68 points in index coordinates of ``image``.  The warp runs at
    ``transform_size`` and is then resized (LANCZOS) to ``output_size`` when they differ; the
    released models use 256 for both.  (The released code only resizes *down*; asking for an
    output larger than the warp also resizes here instead of silently returning the warp size.)

    The returned dict (see :func:`make_transform`) is JSON-able and maps crop ⇄ original.
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    source_size = img.size
    quad, qsize = ffhq_quad(landmarks)

    img, quad, qsize, shrink, scale = _shrink(img, quad.copy(), qsize, output_size)
    border = max(int(np.rint(qsize * 0.1)), 3)
    img, quad, crop_box = _crop(img, quad, border)
    img, quad, pad = _pad(img, quad, qsize, border)

    warp_quad = quad + 0.5
    img = img.transform(
        (transform_size, transform_size),
        PIL.Image.Transform.QUAD,
        tuple(warp_quad.flatten()),
        PIL.Image.Resampling.BILINEAR,
    )
    if output_size != transform_size:
        img = img.resize((output_size, output_size), PIL.Image.Resampling.LANCZOS)

    # Undo pad and crop offsets (in shrunk pixels), then the shrink's true per-axis scale.
    shrunk_edge = warp_quad - np.array(pad[:2], dtype=np.float64) + np.array(crop_box[:2])
    source_quad = shrunk_edge * np.array(scale)
    transform = make_transform(
        source_quad,
        source_size=source_size,
        output_size=output_size,
        landmarks=landmarks,
        extra={
            "transform_size": int(transform_size),
            "shrink": int(shrink),
            "crop": list(crop_box),
            "pad": list(pad),
        },
    )
    return img, transform


def make_transform(
    source_quad: np.ndarray,
    *,
    source_size: tuple[int, int],
    output_size: int,
    landmarks: np.ndarray | None = None,
    score: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict:
    """Build the JSON-able transform dict (version 1).

    Keys: ``version``, ``method`` ("ffhq"), ``source_size`` [W, H], ``output_size`` N, ``quad``
    (4×[x, y], edge coordinates of the original: the corners that crop points (0,0), (0,N),
    (N,N), (N,0) land on), ``crop_to_source`` (2×3 affine, edge coordinates, ``[x, y] = A·[u,
    v, 1]`` for crop edge coordinates u, v in 0..N), ``landmarks`` (68×[x, y], index coordinates)
    and ``score``; ``extra`` adds bookkeeping (shrink, crop, pad).
    """
    q = np.asarray(source_quad, dtype=np.float64)
    n = float(output_size)
    affine = np.stack([(q[3] - q[0]) / n, (q[1] - q[0]) / n, q[0]], axis=1)
    transform: dict[str, Any] = {
        "version": TRANSFORM_VERSION,
        "method": "ffhq",
        "pixel_convention": "edge",
        "source_size": [int(source_size[0]), int(source_size[1])],
        "output_size": int(output_size),
        "quad": q.tolist(),
        "crop_to_source": affine.tolist(),
    }
    if landmarks is not None:
        transform["landmarks"] = np.asarray(landmarks, dtype=float).tolist()
    transform["score"] = None if score is None else float(score)
    if extra:
        transform.update(extra)
    return transform


def check_transform(transform: dict) -> None:
    """Raise InputError when a transform dict (e.g. read from a sidecar file) is unusable."""
    try:
        ok = (
            int(transform["version"]) == TRANSFORM_VERSION
            and transform["method"] == "ffhq"
            and np.asarray(transform["quad"], dtype=float).shape == (4, 2)
            and len(transform["source_size"]) == 2
            and int(transform["output_size"]) > 0
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"not a version-{TRANSFORM_VERSION} ffhq transform (keys: version, method, quad, "
            "source_size, output_size)"
        )


def crop_to_source_matrix(transform: dict, crop_size: int | None = None) -> np.ndarray:
    """3×3 matrix taking crop edge coordinates (of a crop ``crop_size`` wide) to source edges.

    Derived from the quad, the source of truth.  ``crop_size`` lets an edited crop of another
    size (e.g. a 1024 generator output) use the same transform.
    """
    check_transform(transform)
    q = np.asarray(transform["quad"], dtype=np.float64)
    n = float(crop_size if crop_size is not None else transform["output_size"])
    m = np.eye(3)
    m[:2, 0] = (q[3] - q[0]) / n
    m[:2, 1] = (q[1] - q[0]) / n
    m[:2, 2] = q[0]
    return m


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    homog = np.concatenate([pts + 0.5, np.ones((len(pts), 1))], axis=1)
    return (homog @ matrix.T)[:, :2] - 0.5


def source_to_crop_points(
    transform: dict, points: np.ndarray, crop_size: int | None = None
) -> np.ndarray:
    """Map (K, 2) points from the original photo into the crop; index coordinates both sides."""
    return _apply(np.linalg.inv(crop_to_source_matrix(transform, crop_size)), points)


def crop_to_source_points(
    transform: dict, points: np.ndarray, crop_size: int | None = None
) -> np.ndarray:
    """Map (K, 2) points from the crop back into the original photo; index coordinates."""
    return _apply(crop_to_source_matrix(transform, crop_size), points)


def align_image(
    image: PIL.Image.Image,
    detector: FaceDetector,
    *,
    name: str = "image",
    output_size: int = DEFAULT_SIZE,
    all_faces: bool = False,
    detect_size: int | None = None,
) -> list[AlignedFace]:
    """Detect faces in a photo and return FFHQ crops, most confident face first.

    By default only the face dlib is most confident of is returned (the released code keeps the
    last detection, which can be a logo); ``all_faces=True`` returns every detected face.  The
    warp runs at ``max(256, output_size)`` so the default matches the released crops and larger
    outputs are not upscaled from 256.  Raises :class:`InputError` when there is no face.

    ``detect_size`` (opt-in) searches the face on a copy whose long side is at most that many
    pixels, landmarks at full resolution (:meth:`FaceDetector.find`; crops within the bound of
    docs/alignment.md#alignment-at-scale).  It is ignored with ``all_faces``: a face too small
    for the copy would be missed while others are found, and "every face" means every face the
    full-resolution search finds.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    faces = detector.detect(np.asarray(rgb), None if all_faces else detect_size)
    if not faces:
        raise InputError(f"no face found in {name} — try a frontal photo or --aligned")
    if not all_faces:
        faces = faces[:1]
    results: list[AlignedFace] = []
    for index, face in enumerate(faces):
        crop, transform = align_ffhq(
            rgb,
            face.landmarks,
            output_size=output_size,
            transform_size=max(DEFAULT_SIZE, output_size),
        )
        transform["score"] = float(face.score)
        transform["box"] = list(face.box)
        transform["index"] = index
        if face.detected_at is not None:
            transform["detected_at"] = list(face.detected_at)
        results.append(AlignedFace(image=crop, transform=transform, score=face.score, index=index))
    return results
