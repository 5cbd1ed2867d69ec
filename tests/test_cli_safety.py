"""Never losing a user's work: inputs untouched, names that never collide, resume that knows its
settings, every option validated, honest about what is skipped, missing weights named at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from clipinvert.cli import main
from clipinvert.manifest import MANIFEST_NAME


def run(args: list[str], models: Path, capsys) -> tuple[int, str]:
    rc = main([*args, "--models", str(models), "--domain", "tiny", "--device", "cpu",
               "--workers", "0", "--quiet"])
    return rc, capsys.readouterr().err


def report(out: Path) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"report holds {name}: not valid JSON")

    return json.loads((out / "clipinvert-report.json").read_text(), parse_constant=refuse)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def photos(tmp_path: Path, face_crop: Image.Image) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    face_crop.resize((64, 64)).save(d / "a.png")
    face_crop.resize((64, 64)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(d / "b.png")
    return d


def test_output_equal_to_input_is_refused_and_photos_untouched(photos: Path, tiny_models: Path,
                                                                capsys) -> None:
    before = snapshot(photos)
    for extra in ([], ["--overwrite"]):
        rc, err = run(["invert", str(photos), "-o", str(photos), *extra], tiny_models, capsys)
        assert rc == 2 and "is the input folder" in err and len(err.strip().splitlines()) == 1
    # A single file whose output would be itself.
    rc, err = run(["invert", str(photos / "a.png"), "-o", str(photos), "--overwrite"],
                  tiny_models, capsys)
    assert rc == 2 and "would replace an input image" in err
    assert snapshot(photos) == before


def test_output_inside_input_is_not_read_back(photos: Path, tiny_models: Path, capsys) -> None:
    out = photos / "out"
    assert run(["invert", str(photos), "-o", str(out)], tiny_models, capsys)[0] == 0
    rc, _ = run(["invert", str(photos), "-o", str(out)], tiny_models, capsys)
    assert rc == 0
    rep = report(out)
    assert rep["counts"] == {"done": 0, "skipped": 2, "failed": 0}
    assert not (out / "out").exists()
    # Reading a sub-folder of OUT as input stays allowed (edit work/aligned -o work).
    rc, _ = run(["invert", str(out), "-o", str(photos / "again")], tiny_models, capsys)
    assert rc == 0 and report(photos / "again")["counts"]["done"] == 2


def test_same_stem_inputs_get_their_suffix(photos: Path, tiny_models: Path, tmp_path: Path,
                                           capsys) -> None:
    Image.open(photos / "b.png").save(photos / "a.jpg")
    out = tmp_path / "out"
    rc, err = run(["invert", str(photos), "-o", str(out)], tiny_models, capsys)
    assert rc == 0
    assert "share an output name" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["a_jpg.png", "a_png.png", "b.png"]
    names = {Path(r["input"]).name: r.get("output_name") for r in report(out)["inputs"]}
    assert names == {"a.jpg": "a_jpg", "a.png": "a_png", "b.png": None}
    assert any("share an output name" in w for w in report(out)["warnings"])


def test_reserved_and_clashing_folders_are_renamed_not_overwritten(
        photos: Path, tiny_models: Path, tmp_path: Path, capsys) -> None:
    # A prompt named like the compare folder.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("compare\nblond hair\n")
    out = tmp_path / "many"
    rc, _ = run(["edit", str(photos / "a.png"), "--prompts", str(prompts), "--compare",
                 "-o", str(out)], tiny_models, capsys)
    assert rc == 0
    assert (out / "compare-1" / "a.png").exists() and (out / "compare" / "a.png").exists()
    strip = Image.open(out / "compare" / "a.png")
    assert strip.width > strip.height  # the strip, not an edit
    # An input sub-folder named "compare": its edit and another input's strip would share a path.
    (photos / "compare").mkdir()
    Image.open(photos / "b.png").save(photos / "compare" / "a.png")
    out = tmp_path / "one"
    rc, err = run(["edit", str(photos), "blond hair", "--compare", "-o", str(out)], tiny_models,
                  capsys)
    assert rc == 0 and "output renamed" in err
    rep = report(out)
    outputs = [p for r in rep["inputs"] for p in r["outputs"]]
    assert len(outputs) == len(set(outputs)) == 6  # 3 inputs × (edit + strip), all distinct
    assert {r.get("output_name") for r in rep["inputs"]} == {None, "compare/a-2"}


def test_resume_knows_its_settings(photos: Path, tiny_models: Path, tmp_path: Path,
                                   capsys) -> None:
    out = tmp_path / "out"
    base = ["edit", str(photos), "blond hair", "-o", str(out)]
    assert run(base, tiny_models, capsys)[0] == 0
    assert (out / MANIFEST_NAME).exists()
    first = snapshot(out)
    # Same settings (batch size and workers are not settings): everything skipped.
    rc, _ = run([*base, "-b", "1"], tiny_models, capsys)
    assert rc == 0 and report(out)["counts"] == {"done": 0, "skipped": 2, "failed": 0}
    # Another prompt or strength: refused before any work, nothing touched.
    for other in (["edit", str(photos), "a beard", "-o", str(out)],
                  [*base, "--strength", "0.5"]):
        rc, err = run(other, tiny_models, capsys)
        assert rc == 2 and "other settings" in err and "--overwrite" in err
        assert len(err.strip().splitlines()) == 1
    assert {k: v for k, v in snapshot(out).items() if k != "clipinvert-report.json"} == \
        {k: v for k, v in first.items() if k != "clipinvert-report.json"}
    # --overwrite replaces them and the report says what is on disk now.
    # (A negative strength is valid: it reverses the edit.)
    rc, _ = run([*base, "--strength", "-0.5", "--overwrite"], tiny_models, capsys)
    rep = report(out)
    assert rc == 0 and rep["counts"]["done"] == 2 and rep["params"]["strength"] == -0.5
    rc, _ = run([*base, "--strength", "-0.5"], tiny_models, capsys)
    assert rc == 0 and report(out)["counts"]["skipped"] == 2
    # Prompt order decides folder names and strips: a setting too.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    out2 = tmp_path / "out2"
    assert run(["edit", str(photos), "--prompts", str(prompts), "-o", str(out2)], tiny_models,
               capsys)[0] == 0
    prompts.write_text("b\na\n")
    assert run(["edit", str(photos), "--prompts", str(prompts), "-o", str(out2)], tiny_models,
               capsys)[0] == 2


def test_foreign_files_in_out_are_not_skipped_or_replaced(photos: Path, tiny_models: Path,
                                                           tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "a.png"
    Image.new("RGB", (8, 8), "red").save(mine)
    data = mine.read_bytes()
    rc, err = run(["invert", str(photos), "-o", str(out)], tiny_models, capsys)
    assert rc == 2 and "did not make" in err
    assert mine.read_bytes() == data


@pytest.mark.parametrize("args, needle", [
    (["edit", "{img}", "x", "--strength", "nan"], "'--strength': must be a finite number"),
    (["edit", "{img}", "x", "--strength", "inf"], "got inf"),
    (["interpolate", "{img}", "x", "--steps", "1"], "'--steps': 1 is not in the range 2..10000"),
    (["interpolate", "{img}", "x", "--steps", "10001"], "10001 is not in the range"),
    (["interpolate", "{img}", "x", "--fps", "0"], "'--fps': 0.0 is not in the range 1..120"),
    (["align", "{img}", "--size", "8"], "'--size': 8 is not in the range 16..8192"),
    (["invert", "{img}", "--workers", "999"], "'--workers': 999 is not in the range 0.."),
    (["invert", "{img}", "-b", "0"], "0 is not in the range 1..4096"),
    (["edit", "{img}", "x", "--ref-image", "{tmp}/missing.jpg"], "missing.jpg: file not found"),
    (["invert", "{img}", "-o", "{img}"], "exists and is not a folder"),
    (["invert", "{img}", "-o", "{img}/sub"], "a parent is not a folder"),
    (["invert", "{img}", "-o", "/proc/clipinvert-test-out"], "cannot create the folder"),
])
def test_bad_options_are_one_line_usage_errors(args: list[str], needle: str, tmp_path: Path,
                                               capsys) -> None:
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "gray").save(img)
    argv = [a.format(img=img, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_honest_about_what_it_skips(photos: Path, tiny_models: Path, tmp_path: Path,
                                    capsys) -> None:
    (photos / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.open(photos / "a.png").save(elsewhere / "c.png")
    os.symlink(elsewhere, photos / "linked")
    os.symlink(photos, photos / "loop")
    long_prompt = " ".join(["a person with very long flowing wavy blond hair"] * 10)
    out = tmp_path / "out"
    rc, err = run(["edit", str(photos), long_prompt, "-o", str(out)], tiny_models, capsys)
    assert rc == 1  # the HEIC file failed, the rest done
    rep = report(out)
    failed = [r for r in rep["inputs"] if r["status"] == "failed"]
    assert [Path(r["input"]).name for r in failed] == ["phone.heic"]
    assert "HEIC" in failed[0]["reason"]
    assert (out / "linked" / "c.png").exists()  # symlinked folder followed
    assert "symlink to a folder already walked" in err  # the loop, said once
    assert "tokens: CLIP reads only the first 77" in err
    cond = rep["conditions"][0]
    assert cond["truncated"] is True and cond["tokens"] > 77


def test_missing_weights_named_at_once(tmp_path: Path, capsys) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text('[domains.mine]\nresolution = 32\nalign = "none"\n'
                   'e4e = "w-e4e"\nclipinverter = "w-ci"\nclip = "w-clip"\n'
                   '[weights.w-e4e]\nfile = "e4e_mine.pt"\nurls = ["https://example.org/e.pt"]\n'
                   '[weights.w-ci]\nfile = "ci_mine.pt"\nurls = ["https://example.org/c.pt"]\n'
                   '[weights.w-clip]\nfile = "clip_mine.pt"\nurls = ["https://example.org/k.pt"]\n')
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), "gray").save(img)
    rc = main(["edit", str(img), "x", "--models", str(reg), "--domain", "mine", "-o",
               str(tmp_path / "o"), "--offline"])
    err = capsys.readouterr().err
    assert rc == 3 and len(err.strip().splitlines()) == 1
    for name in ("e4e_mine.pt", "ci_mine.pt", "clip_mine.pt", "clipinvert models download mine"):
        assert name in err


def test_version(capsys) -> None:
    from clipinvert import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"clipinvert {__version__}"
