"""Face detection and 68-point landmarks with dlib, as the released FFHQ alignment does it.

The released alignment runs dlib's HOG frontal face detector with one upsampling step and the
68-point shape predictor ``shape_predictor_68_face_landmarks.dat``.  We do the same, with two
deliberate differences:

* we keep every detection with its confidence (``detector.run``) and sort by it, so that the
  default pick is the face dlib is most sure of; the released code keeps the *last* box, which
  on scikit-image's astronaut photo is the mission patch, not the face;
* the detection threshold defaults to 0.0, the one ``detector(img, 1)`` uses, so that exactly
  the faces the released code could see are candidates (a negative threshold adds junk boxes).

Detection on a downscaled copy (``detect_size``, off by default) finds the face boxes on a copy
whose long side is at most ``detect_size`` px, maps them back, and runs the predictor on the
full-resolution photo: dlib's HOG scan costs ~0.45 s per megapixel while the predictor costs the
same at any size.  The box is not the one full-resolution detection gives, so the crop moves a
little (measured in docs/alignment.md#alignment-at-scale: up to ~1% of the quad side, the order
of today's own jitter when the photo is shifted by a pixel) — hence opt-in.

The predictor comes offline from the PyPI package ``face-recognition-models``.  That package's
``__init__`` imports ``pkg_resources``, which current setuptools no longer ships, so we locate its
``models/`` folder through the import system without executing the package.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from clipinvert.errors import WeightsError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
_MODELS_PACKAGE = "face_recognition_models"
_HOW_TO_GET = (
    "install it with `pip install face-recognition-models` "
    "or pass the path of shape_predictor_68_face_landmarks.dat"
)


def default_predictor_path() -> Path:
    """Path of the 68-point predictor shipped by ``face-recognition-models``."""
    return packaged_model(PREDICTOR_FILE)


def packaged_model(filename: str) -> Path:
    """Path of one of the dlib models ``face-recognition-models`` ships (the 68- and 5-point
    predictors, the face-recognition ResNet).

    ``importlib.util.find_spec`` on a top-level package only reads its location; it does not run
    the package's ``__init__`` (which would fail on the missing ``pkg_resources``).  Raises
    :class:`WeightsError` when the package is not installed; the file itself is checked by the
    caller (:func:`check_predictor_path`).
    """
    try:
        spec = importlib.util.find_spec(_MODELS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsError(f"dlib model {filename} not found: install it with "
                           "`pip install face-recognition-models`")
    for location in locations:
        candidate = Path(location) / "models" / filename
        if candidate.is_file():
            return candidate
    return Path(locations[0]) / "models" / filename


def check_predictor_path(path: Path) -> Path:
    """Fail early, with a one-line actionable message, when the predictor file is unusable.

    A missing or obviously truncated file (e.g. a git-lfs pointer) is caught here, before dlib
    gives a less helpful RuntimeError.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"dlib landmark model missing: {path} — {_HOW_TO_GET}")
    if path.stat().st_size < 1_000_000:
        raise WeightsError(
            f"dlib landmark model {path} is truncated or not a model — {_HOW_TO_GET}"
        )
    return path


@dataclass
class Face:
    """One detected face.

    ``box`` is dlib's rectangle ``(left, top, right, bottom)`` in pixels; ``score`` the detector
    confidence (higher is surer); ``landmarks`` the 68 points as a (68, 2) float array of
    ``(x, y)`` in pixel-index coordinates (the centre of pixel column ``i`` is ``x = i``), which
    is what dlib returns and what the FFHQ quad is computed from.
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray = field(repr=False)
    detected_at: tuple[int, int] | None = None  # (W, H) of the downscaled copy; None: full size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for logs and sidecar files."""
        out: dict[str, Any] = {
            "box": list(self.box),
            "score": float(self.score),
            "landmarks": np.asarray(self.landmarks, dtype=float).tolist(),
        }
        if self.detected_at is not None:
            out["detected_at"] = list(self.detected_at)
        return out


Box = tuple[int, int, int, int]


def detection_copy_size(size: tuple[int, int], detect_size: int | None) -> tuple[int, int] | None:
    """``(w, h)`` of the copy detection runs on, or None when the photo is used as it is.

    The copy's long side is exactly ``detect_size`` and its aspect is kept (sides rounded, at
    least 1); a photo whose long side is at most ``detect_size`` is not resized — upscaling would
    only make detection slower and the boxes different.
    """
    width, height = size
    if detect_size is None or max(width, height) <= detect_size:
        return None
    scale = max(width, height) / detect_size
    return max(1, round(width / scale)), max(1, round(height / scale))


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """Map a dlib box from an image of ``from_size`` onto the same picture at ``to_size``.

    dlib boxes are inclusive ``(left, top, right, bottom)`` in index coordinates, so the box
    covers the edges ``[left, right + 1)``; those edges are scaled per axis (a resize maps edge
    coordinates linearly) and rounded back to an inclusive integer box.  The rounding moves an
    edge by at most half a pixel, far less than the detector's own quantisation (8-px HOG cells
    at each pyramid level).
    """
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    left, top, right, bottom = box
    return (round(left * sx), round(top * sy),
            round((right + 1) * sx) - 1, round((bottom + 1) * sy) - 1)


class FaceDetector:
    """dlib frontal face detector + 68-point shape predictor, loaded lazily and once.

    Loading the predictor takes about a second and 100 MB, so it happens on first use, not at
    construction; a missing file is reported at construction though, so the CLI can exit with
    code 3 before touching any input.  Instances pickle without the dlib objects (which cannot be
    pickled) so a worker pool can ship one to each process, where it loads again on first use.

    ``upsample`` (default 1, as released) is how many times dlib doubles the image before
    detecting; ``threshold`` (default 0.0, as released) is the lowest score kept.
    """

    def __init__(
        self, predictor_path: Path | None = None, *, upsample: int = 1, threshold: float = 0.0
    ) -> None:
        path = default_predictor_path() if predictor_path is None else Path(predictor_path)
        self.predictor_path = check_predictor_path(path)
        self.upsample = int(upsample)
        self.threshold = float(threshold)
        self._lock = threading.Lock()
        self._detector: Any = None
        self._predictor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_detector"] = None
        state["_predictor"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        """Create the dlib objects on first use (thread-safe)."""
        with self._lock:
            if self._detector is None:
                import dlib

                try:
                    predictor = dlib.shape_predictor(str(self.predictor_path))
                except RuntimeError as err:
                    raise WeightsError(
                        f"dlib landmark model {self.predictor_path} cannot be read ({err}) — "
                        f"{_HOW_TO_GET}"
                    ) from None
                self._predictor = predictor
                self._detector = dlib.get_frontal_face_detector()
            return self._detector, self._predictor

    def find(
        self, image: np.ndarray, detect_size: int | None = None
    ) -> tuple[list[Box], list[float], tuple[int, int] | None]:
        """Face boxes (full-resolution pixels) and scores, in dlib's order; no landmarks.

        With ``detect_size``, the boxes are searched on a copy whose long side is at most
        ``detect_size`` (Pillow BILINEAR, antialiased when reducing) and mapped back with
        :func:`scale_box`.  If the copy shows no face the full-resolution photo is searched, so a
        face today's path detects alone is never lost because it is too small for the copy.
        Returns the boxes, the scores and the copy's size (None when the photo itself was used).
        """
        array = _rgb_array(image)
        detector, _predictor = self._load()
        height, width = array.shape[:2]
        small = detection_copy_size((width, height), detect_size)
        if small is not None:
            copy = np.asarray(
                PIL.Image.fromarray(array).resize(small, PIL.Image.Resampling.BILINEAR)
            )
            rects, scores, _kinds = detector.run(copy, self.upsample, self.threshold)
            if len(rects):
                boxes = [scale_box(_box(rect), small, (width, height)) for rect in rects]
                return boxes, [float(v) for v in scores], small
        rects, scores, _kinds = detector.run(array, self.upsample, self.threshold)
        return [_box(rect) for rect in rects], [float(v) for v in scores], None

    def landmarks(self, image: np.ndarray, box: Box) -> np.ndarray:
        """The 68 points (index coordinates) the predictor places in ``box`` of ``image``.

        Its cost does not depend on the photo's size (a fixed number of pixel lookups per
        tree), which is why only the box search is worth doing on a smaller copy.
        """
        import dlib

        array = _rgb_array(image)
        _detector, predictor = self._load()
        shape = predictor(array, dlib.rectangle(*box))
        if shape.num_parts != 68:
            raise WeightsError(
                f"{self.predictor_path} gives {shape.num_parts} landmarks, not 68 — {_HOW_TO_GET}"
            )
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def detect(self, image: np.ndarray, detect_size: int | None = None) -> list[Face]:
        """Find faces in an RGB uint8 (H, W, 3) array; most confident first.

        Ties keep dlib's order.  An empty list means no face (callers decide what that means).
        ``detect_size`` searches the boxes on a downscaled copy (see :meth:`find`; the scores are
        then the copy's); the landmarks are always placed on ``image`` itself.
        """
        array = _rgb_array(image)
        boxes, scores, small = self.find(array, detect_size)
        faces = [Face(box=box, score=score, landmarks=self.landmarks(array, box),
                      detected_at=small)
                 for box, score in zip(boxes, scores, strict=True)]
        faces.sort(key=lambda face: -face.score)
        return faces


def _rgb_array(image: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            f"expected an RGB uint8 (H, W, 3) array, got {array.dtype} {array.shape}"
        )
    return array


def _box(rect: Any) -> Box:
    return int(rect.left()), int(rect.top()), int(rect.right()), int(rect.bottom())
