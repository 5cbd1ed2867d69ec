"""Alignment built into the commands, on real photos: align, auto-align, paste-back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinvert.cli import main


@pytest.fixture(scope="module")
def faces_models(tiny_models: Path) -> Path:
    """The tiny domain, but declared ``align = "ffhq"`` like the released faces domain."""
    text = tiny_models.read_text().replace("[domains.tiny]", "[domains.tinyfaces]")
    text = text.replace('align = "none"', 'align = "ffhq"')
    p = tiny_models.with_name("faces.toml")
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, cat_photo: Image.Image) -> Path:
    from skimage import data

    d = tmp_path_factory.mktemp("align-photos")
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    cat_photo.save(d / "chelsea.jpg")
    return d


@pytest.fixture(scope="module")
def two_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import data

    face = Image.fromarray(data.astronaut()).crop((120, 20, 330, 230))
    canvas = Image.new("RGB", (520, 260), (200, 200, 200))
    canvas.paste(face, (20, 25))
    canvas.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((180, 180)), (300, 40))
    d = tmp_path_factory.mktemp("two")
    canvas.save(d / "pair.png")
    return d


def test_align_command_on_real_photos(photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "aligned"
    rc = main(["align", str(photos), "-o", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1  # the cat has no face; the astronaut is still done
    assert "no face found in chelsea.jpg — try a frontal photo or --aligned" in err
    crop = Image.open(out / "astronaut.png")
    assert crop.size == (256, 256)
    t = json.loads((out / "astronaut.json").read_text())
    assert t["method"] == "ffhq" and t["source_size"] == [512, 512]
    # the most confident face (the face, score ≈ 1.16), not the mission patch (≈ 0.12)
    assert t["score"] > 1.0 and t["box"][1] < 200
    rep = json.loads((out / "clipinvert-report.json").read_text())
    assert rep["counts"] == {"done": 1, "skipped": 0, "failed": 1}
    assert any("no face" in r.get("reason", "") for r in rep["inputs"])


def test_two_faces_default_and_all_faces(two_faces: Path, tmp_path: Path) -> None:
    assert main(["align", str(two_faces), "-o", str(tmp_path / "one"), "--workers", "0",
                 "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == ["pair.png"]
    assert main(["align", str(two_faces), "-o", str(tmp_path / "all"), "--all-faces",
                 "--workers", "0", "-q"]) == 0
    names = sorted(p.name for p in (tmp_path / "all").glob("*.png"))
    assert names == ["pair_face0.png", "pair_face1.png"]
    s0 = json.loads((tmp_path / "all" / "pair_face0.json").read_text())["score"]
    s1 = json.loads((tmp_path / "all" / "pair_face1.json").read_text())["score"]
    assert s0 >= s1


def _alone(photo: Path, tmp_path: Path) -> Path:
    """A folder holding just ``photo``, as an INPUT."""
    folder = tmp_path / photo.stem
    folder.mkdir()
    shutil.copy(photo, folder)
    return folder


def _edit(args: list[str], models: Path) -> int:
    return main([*args, "--models", str(models), "--domain", "tinyfaces", "--device", "cpu",
                 "--workers", "0", "-q"])


def test_edit_aligns_automatically_and_pastes_back(photos: Path, faces_models: Path,
                                                   tmp_path: Path) -> None:
    src = _alone(photos / "astronaut.png", tmp_path)
    out = tmp_path / "pasted"
    assert _edit(["edit", str(src), "she has blond hair", "-o", str(out), "--paste-back"],
                 faces_models) == 0
    original = np.asarray(Image.open(src / "astronaut.png").convert("RGB"))
    pasted = np.asarray(Image.open(out / "astronaut.png"))
    assert pasted.shape == original.shape  # original size, not the crop's
    t = json.loads((out / "astronaut.json").read_text())
    xs = [p[0] for p in t["quad"]]
    ys = [p[1] for p in t["quad"]]
    # far from the face (outside the crop's footprint) nothing changed, bit for bit
    far = np.ones(original.shape[:2], bool)
    far[max(0, int(min(ys)) - 2):int(max(ys)) + 3, max(0, int(min(xs)) - 2):int(max(xs)) + 3] = 0
    assert far.sum() > 10_000
    assert np.array_equal(pasted[far], original[far])
    # inside the face the (random-weight) edit did change pixels
    x0, y0, x1, y1 = t["box"]
    assert np.abs(pasted[y0:y1, x0:x1].astype(int) - original[y0:y1, x0:x1]).mean() > 5

    # without --paste-back the output is the generator-sized crop
    out2 = tmp_path / "crop"
    assert _edit(["edit", str(src), "she has blond hair", "-o", str(out2)], faces_models) == 0
    assert Image.open(out2 / "astronaut.png").size == (32, 32)
    assert (out2 / "astronaut.json").exists()


def test_aligned_flag_skips_detection(photos: Path, faces_models: Path, tmp_path: Path) -> None:
    # the cat would fail detection; --aligned treats it as a ready crop
    src = _alone(photos / "chelsea.jpg", tmp_path)
    assert _edit(["invert", str(src), "-o", str(tmp_path / "o"), "--aligned"], faces_models) == 0
    assert _edit(["invert", str(src), "-o", str(tmp_path / "o2")], faces_models) == 1
    assert _edit(["edit", str(src), "x", "-o", str(tmp_path / "o3"), "--aligned",
                  "--paste-back"], faces_models) == 2  # paste-back needs alignment


def test_interpolate_paste_back_frames_are_full_photos(photos: Path, faces_models: Path,
                                                       tmp_path: Path) -> None:
    src = _alone(photos / "astronaut.png", tmp_path)
    out = tmp_path / "interp"
    assert _edit(["interpolate", str(src), "a beard", "--steps", "3", "-o", str(out),
                  "--paste-back"], faces_models) == 0
    frames = sorted((out / "astronaut").glob("*.png"))
    assert len(frames) == 3 and all(Image.open(f).size == (512, 512) for f in frames)


def test_detect_size_option(photos: Path, faces_models: Path, tmp_path: Path, capsys) -> None:
    src = _alone(photos / "astronaut.png", tmp_path)
    out = tmp_path / "copy"
    # align: the face is searched on a 256-px copy, recorded in the transform
    assert main(["align", str(src), "-o", str(out), "--detect-size", "256", "--workers", "0",
                 "-q"]) == 0
    t = json.loads((out / "astronaut.json").read_text())
    assert t["detected_at"] == [256, 256] and t["source_size"] == [512, 512]
    # the default (full) is today's path: no copy
    assert main(["align", str(src), "-o", str(tmp_path / "full"), "--workers", "0", "-q"]) == 0
    assert "detected_at" not in json.loads((tmp_path / "full" / "astronaut.json").read_text())
    # a rerun into the same folder with another --detect-size is another setting, not a skip
    capsys.readouterr()
    assert main(["align", str(src), "-o", str(out), "--workers", "0", "-q"]) == 2
    assert "already holds" in capsys.readouterr().err
    # the model commands take it too (shared with align, declared once)
    assert _edit(["invert", str(src), "-o", str(tmp_path / "inv"), "--detect-size", "256"],
                 faces_models) == 0
    assert json.loads((tmp_path / "inv" / "astronaut.json").read_text())["detected_at"] == [256,
                                                                                            256]
    for bad in ("32", "big", "-5"):
        assert main(["align", str(src), "-o", str(tmp_path / "x"), "--detect-size", bad]) == 2
        assert "--detect-size" in capsys.readouterr().err
