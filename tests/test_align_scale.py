"""Face search on a downscaled copy (``detect_size`` / ``--detect-size``): the box mapping, the
fall-back to full resolution, and the crop's distance from today's on real photos.

The bound checked is the one docs/alignment.md#alignment-at-scale states from measurement
(benchmarks/bench_align.py): the quad corners move by at most ~1% of the quad's side — not the
0.5 px the issue hoped for, which is why the option is off by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

skimage_data = pytest.importorskip("skimage.data")

from clipinvert.align import FaceDetector, align_image, ffhq_quad  # noqa: E402
from clipinvert.align.landmarks import detection_copy_size, scale_box  # noqa: E402

LANCZOS = PIL.Image.Resampling.LANCZOS
# The stated bound (docs/alignment.md#alignment-at-scale): quad-corner difference / quad side.
BOUND = 0.012


@pytest.fixture(scope="module")
def astronaut_2x(astronaut: PIL.Image.Image) -> PIL.Image.Image:
    return astronaut.resize((1024, 1024), LANCZOS)


def quad_of(detector: FaceDetector, photo: PIL.Image.Image, detect_size: int | None):
    (face,) = detector.detect(np.asarray(photo), detect_size)[:1]
    quad, qsize = ffhq_quad(face.landmarks)
    return face, quad, qsize


# --------------------------------------------------------------------------- pure functions


def test_copy_size_keeps_the_aspect_and_never_upscales() -> None:
    assert detection_copy_size((4000, 3000), 1000) == (1000, 750)
    assert detection_copy_size((3000, 4000), 1000) == (750, 1000)
    assert detection_copy_size((1001, 10), 1000) == (1000, 10)
    assert detection_copy_size((1000, 700), 1000) is None  # already small enough
    assert detection_copy_size((4000, 3000), None) is None
    assert detection_copy_size((100_000, 3), 1000) == (1000, 1)  # never a 0-px side


def test_scale_box_maps_pixel_edges() -> None:
    # a box covering pixels 10..19 of the copy covers edges [10, 20), i.e. pixels 40..79 at 4x
    assert scale_box((10, 10, 19, 19), (100, 100), (400, 400)) == (40, 40, 79, 79)
    assert scale_box((0, 0, 99, 49), (100, 50), (400, 200)) == (0, 0, 399, 199)  # whole image
    assert scale_box((7, 3, 30, 40), (64, 64), (64, 64)) == (7, 3, 30, 40)  # same size
    # per axis, and non-integer scales round each edge to the nearest pixel edge
    assert scale_box((10, 10, 19, 19), (100, 100), (250, 300)) == (25, 30, 49, 59)
    assert scale_box((1, 1, 2, 2), (3, 3), (10, 10)) == (3, 3, 9, 9)
    # up then down by a whole factor is the identity; down loses what the copy cannot hold
    assert scale_box((40, 40, 79, 79), (400, 400), (100, 100)) == (10, 10, 19, 19)
    assert scale_box((123, 45, 678, 901), (1200, 1000), (600, 500)) == (62, 22, 339, 450)


# --------------------------------------------------------------------------- real photos


def test_copy_quad_within_the_stated_bound(detector, astronaut_2x) -> None:
    today, quad, qsize = quad_of(detector, astronaut_2x, None)
    copy, quad_copy, _ = quad_of(detector, astronaut_2x, 512)
    assert today.detected_at is None and copy.detected_at == (512, 512)
    assert copy.box != today.box  # the copy's box really is another one
    delta = np.abs(quad_copy - quad).max()
    assert 0 < delta <= BOUND * qsize  # measured 1.57 px of a 346 px quad
    # through align_image: the transform says where the face was searched
    (aligned,) = align_image(astronaut_2x, detector, detect_size=512)
    assert aligned.transform["detected_at"] == [512, 512]
    assert np.abs(np.asarray(aligned.transform["landmarks"]) - copy.landmarks).max() == 0


def test_no_face_on_the_copy_falls_back_to_full_resolution(detector, astronaut) -> None:
    # the 90-px face in a 768² canvas is 11 px on a 96-px copy: dlib cannot see it there
    canvas = PIL.Image.new("RGB", (768, 768), (128, 128, 128))
    canvas.paste(astronaut, (200, 200))
    today = detector.detect(np.asarray(canvas))
    fallback = detector.detect(np.asarray(canvas), 96)
    assert today and fallback[0].detected_at is None
    assert [f.box for f in fallback] == [f.box for f in today]
    assert np.array_equal(fallback[0].landmarks, today[0].landmarks)


def test_all_faces_ignores_the_copy_and_small_photos_are_not_resized(detector,
                                                                     astronaut) -> None:
    # all faces: the 512² astronaut's face and its mission patch, searched at full size
    every = align_image(astronaut, detector, all_faces=True, detect_size=256)
    today = align_image(astronaut, detector, all_faces=True)
    assert len(every) == 2
    assert [a.transform for a in every] == [a.transform for a in today]
    assert all("detected_at" not in a.transform for a in every)
    # a photo no larger than detect_size is searched as it is
    (face,) = align_image(astronaut, detector, detect_size=512)
    assert "detected_at" not in face.transform and face.transform == today[0].transform


@pytest.mark.slow  # ~2-4 s: loads the predictor again, times every stage
def test_bench_align_reports_stages_and_deltas(tmp_path: Path, capsys,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # the script runs as `python benchmarks/bench_align.py`: its shared module by its plain name
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_align

    out = tmp_path / "align.json"
    assert bench_align.main(["--sizes", "0.1", "--repeats", "1", "--detect-size", "256",
                             "--variants-quick", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    (row,) = figures["stages"]
    assert row["size"] == [316, 316] and row["copy_size"] == [256, 256]
    assert set(row["ms"]) == set(bench_align.STAGES) and all(v > 0 for v in row["ms"].values())
    assert row["ms_per_mp"]["detect"] == pytest.approx(row["ms"]["detect"] / row["megapixels"])
    half, one = figures["variants"]
    assert half["variant"] == "0.5x" and half["copy_size"] is None  # 256 px: no copy
    assert half["quad_delta_px"] == 0 and not half["fell_back"]
    assert one["variant"] == "1x" and one["copy_size"] == [256, 256]
    assert 0 < one["quad_delta_px"] <= BOUND * one["qsize"] and one["crop_psnr_db"] > 20
    table = capsys.readouterr().out
    assert "landmarks ms/MP" in table and "quad Δ px" in table


# --------------------------------------------------------------------------- the full matrix


def _variants(astronaut: PIL.Image.Image) -> dict[str, PIL.Image.Image]:
    big = astronaut.resize((2048, 2048), LANCZOS)
    out = {"0.5x": astronaut.resize((256, 256), LANCZOS),
           "2x": astronaut.resize((1024, 1024), LANCZOS), "4x": big,
           "4x mirrored": big.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)}
    for angle in (-25, -10, 10, 25):
        out[f"4x rot {angle:+d}"] = big.rotate(angle, PIL.Image.Resampling.BICUBIC, expand=True)
    canvas = PIL.Image.new("RGB", (4000, 3000), (128, 128, 128))
    canvas.paste(astronaut, (2900, 400))
    out["pad 4000x3000"] = canvas
    return out


@pytest.mark.slow
@pytest.mark.parametrize("detect_size", [512, 1024, 2048])
def test_every_variant_within_the_stated_bound(detector, astronaut, detect_size) -> None:
    for name, photo in _variants(astronaut).items():
        _today, quad, qsize = quad_of(detector, photo, None)
        _copy, quad_copy, _ = quad_of(detector, photo, detect_size)
        delta = np.abs(quad_copy - quad).max()
        assert delta <= BOUND * qsize, f"{name} at {detect_size}: {delta:.2f} px of {qsize:.0f}"
