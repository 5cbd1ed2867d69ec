"""The command line end to end on a tiny folder, bad inputs included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinvert.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, face_crop: Image.Image) -> Path:
    """Good images in many modes plus every kind of bad file, in nested folders."""
    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    face_crop.save(d / "a_rgb.png")
    face_crop.convert("L").save(d / "b_grey.png")
    face_crop.convert("RGBA").save(d / "c_rgba.png")
    face_crop.convert("P").save(d / "sub" / "d_palette.gif")
    face_crop.convert("CMYK").save(d / "sub" / "e_cmyk.jpg")
    arr16 = (np.asarray(face_crop.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(d / "f_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    face_crop.crop((0, 0, 256, 200)).save(d / "g_exif.jpg", exif=exif)
    (d / "h_empty.png").write_bytes(b"")
    data = (d / "a_rgb.png").read_bytes()
    (d / "i_truncated.png").write_bytes(data[: len(data) // 2])
    (d / "j_text.jpg").write_text("not an image")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


GOOD = ["a_rgb", "b_grey", "c_rgba", "f_16bit", "g_exif", "sub/d_palette", "sub/e_cmyk"]
BAD = ["h_empty.png", "i_truncated.png", "j_text.jpg"]


def run(args: list[str], models: Path, capsys) -> tuple[int, str]:
    rc = main([*args, "--models", str(models), "--domain", "tiny", "--device", "cpu",
               "--workers", "0"])
    return rc, capsys.readouterr().err


def report(out: Path) -> dict:
    return json.loads((out / "clipinvert-report.json").read_text())


def test_edit_folder_with_bad_inputs(photos: Path, tiny_models: Path, tmp_path: Path,
                                     capsys) -> None:
    out = tmp_path / "out"
    rc, err = run(["edit", str(photos), "she has wavy blond hair", "-o", str(out), "-b", "3",
                   "--compare", "--save-latents"], tiny_models, capsys)
    assert rc == 1  # some inputs failed, the rest done
    for stem in GOOD:
        img = Image.open(out / f"{stem}.png")
        assert img.size == (32, 32) and img.mode == "RGB"
        assert (out / f"{stem}.pt").exists() and (out / "compare" / f"{stem}.png").exists()
    rep = report(out)
    assert rep["counts"] == {"done": 7, "skipped": 0, "failed": 3}
    failed = {Path(r["input"]).name: r["reason"] for r in rep["inputs"] if r["status"] == "failed"}
    assert set(failed) == set(BAD)
    assert "empty" in failed["h_empty.png"] and "truncated" in failed["i_truncated.png"]
    assert "not an image" in failed["j_text.jpg"]
    for name in BAD:  # one line each on stderr
        assert sum(name in line for line in err.splitlines()) == 1
    assert not list(out.rglob("*.partial*"))
    assert rep["weights"]["e4e"].endswith("e4e.pt") and rep["device"] == "cpu"

    # EXIF rotation respected: the portrait-on-display JPEG was read as 200×256 → the crop
    # the model saw is the rotated one (compare panel 1 is the input resized)
    import torch

    lat = torch.load(out / "a_rgb.pt", weights_only=True)
    assert lat["w"].shape == (8, 64) and lat["condition"] == "she has wavy blond hair"

    # Resume: a second run skips everything that exists, writes nothing new.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    rc, _ = run(["edit", str(photos), "she has wavy blond hair", "-o", str(out),
                 "--compare", "--save-latents", "--quiet"], tiny_models, capsys)
    assert rc == 1
    rep = report(out)
    assert rep["counts"] == {"done": 0, "skipped": 7, "failed": 3}
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    # A deleted output is redone; --overwrite redoes everything.
    (out / "b_grey.png").unlink()
    rc, _ = run(["edit", str(photos), "she has wavy blond hair", "-o", str(out), "--quiet",
                 "--compare", "--save-latents"], tiny_models, capsys)
    assert report(out)["counts"]["done"] == 1 and (out / "b_grey.png").exists()
    rc, _ = run(["edit", str(photos), "she has wavy blond hair", "-o", str(out), "--quiet",
                 "--overwrite", "--compare", "--save-latents"], tiny_models, capsys)
    assert report(out)["counts"]["done"] == 7


def test_invert_writes_images_and_latents(photos: Path, tiny_models: Path, tmp_path: Path,
                                          capsys) -> None:
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(photos / "a_rgb.png", good / "x.png")
    out = tmp_path / "inv"
    rc, _ = run(["invert", str(good), "-o", str(out)], tiny_models, capsys)
    assert rc == 0
    import torch

    w = torch.load(out / "x.pt", weights_only=True)
    assert w.shape == (8, 64) and w.dtype == torch.float32
    assert Image.open(out / "x.png").size == (32, 32)


def test_edit_many_prompts_and_reference(photos: Path, tiny_models: Path, tmp_path: Path,
                                         capsys, cat_photo: Image.Image) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nshe has blond hair\n\nhe wears glasses!\n")
    ref = tmp_path / "chelsea.jpg"
    cat_photo.save(ref)
    out = tmp_path / "many"
    rc, _ = run(["edit", str(photos / "a_rgb.png"), "-o", str(out), "--prompts", str(prompts),
                 "--ref-image", str(ref), "--strength", "0.5"], tiny_models, capsys)
    assert rc == 0
    for sub in ("she-has-blond-hair", "he-wears-glasses", "ref-chelsea"):
        assert (out / sub / "a_rgb.png").exists(), sub


def test_interpolate_frames_match_invert_and_edit(photos: Path, tiny_models: Path,
                                                  tmp_path: Path, capsys) -> None:
    src = photos / "a_rgb.png"
    rc, _ = run(["interpolate", str(src), "a bearded man", "--steps", "4", "-o",
                 str(tmp_path / "interp"), "--format", "gif", "--format", "webp"],
                tiny_models, capsys)
    assert rc == 0
    run(["invert", str(src), "-o", str(tmp_path / "inv")], tiny_models, capsys)
    run(["edit", str(src), "a bearded man", "-o", str(tmp_path / "ed")], tiny_models, capsys)
    frames = sorted((tmp_path / "interp" / "a_rgb").glob("*.png"))
    assert [f.name for f in frames] == [f"a_rgb_{k:03d}.png" for k in range(4)]
    first, last = (np.asarray(Image.open(f)) for f in (frames[0], frames[-1]))
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "inv" / "a_rgb.png")))
    assert np.array_equal(last, np.asarray(Image.open(tmp_path / "ed" / "a_rgb.png")))
    gif = Image.open(tmp_path / "interp" / "a_rgb.gif")
    assert gif.n_frames == 4
    assert (tmp_path / "interp" / "a_rgb.webp").exists()


def test_exit_codes(tiny_models: Path, tmp_path: Path, capsys) -> None:
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64), "gray").save(img)
    # 2: usage errors
    assert main(["edit", str(img), "-o", str(tmp_path / "o")]) == 2  # no prompt
    assert main(["edit", str(img), "x", "--batch-size", "0"]) == 2
    assert main(["invert", str(tmp_path / "missing.png"), "--models", str(tiny_models),
                 "--domain", "tiny", "-o", str(tmp_path / "o")]) == 2
    assert main(["invert", str(img), "--domain", "nope", "-o", str(tmp_path / "o")]) == 2
    # 3: weights missing / invalid, one line, no traceback
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[domains.b]\nresolution = 32\nalign = "none"\ne4e = "{tmp_path}/none.pt"\n')
    capsys.readouterr()
    assert main(["invert", str(img), "--models", str(bad), "--domain", "b", "-o",
                 str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    html = tmp_path / "html.pt"
    html.write_text("<html>quota exceeded</html>")
    bad.write_text(f'[domains.b]\nresolution = 32\nalign = "none"\ne4e = "{html}"\n')
    assert main(["invert", str(img), "--models", str(bad), "--domain", "b", "-o",
                 str(tmp_path / "o")]) == 3
    assert "HTML" in capsys.readouterr().err


def test_help_lists_commands(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("invert", "edit", "interpolate"):
        assert cmd in out


def test_output_format_png_level_and_auto_batch(photos: Path, tiny_models: Path,
                                                tmp_path: Path, capsys) -> None:
    """--ext picks the format (recorded in the report), --png-level only the compression, and
    --batch-size auto (the default) says what it used."""
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(photos / "a_rgb.png", good / "a.png")
    shutil.copy(photos / "b_grey.png", good / "b.png")
    jpg = tmp_path / "jpg"
    rc, _ = run(["edit", str(good), "blond hair", "-o", str(jpg), "--ext", "jpeg",
                 "--compare"], tiny_models, capsys)
    assert rc == 0
    assert sorted(p.relative_to(jpg).as_posix() for p in jpg.rglob("*.jpg")) == [
        "a.jpg", "b.jpg", "compare/a.jpg", "compare/b.jpg"]
    assert Image.open(jpg / "a.jpg").format == "JPEG" and not list(jpg.rglob("*.png"))
    rep = report(jpg)
    assert rep["params"]["ext"] == "jpg" and rep["params"]["batch_size"] == "auto"
    assert rep["batch_size"] == {"asked": "auto", "start": 4, "used": 4}
    levels = {}
    for level in (0, 9):
        out = tmp_path / f"png{level}"
        rc, _ = run(["invert", str(good), "-o", str(out), "--png-level", str(level), "-b", "1"],
                    tiny_models, capsys)
        assert rc == 0 and report(out)["params"]["png_level"] == level
        assert report(out)["batch_size"] == {"asked": 1, "start": 1, "used": 1}
        levels[level] = out / "a.png"
    assert np.array_equal(np.asarray(Image.open(levels[0])), np.asarray(Image.open(levels[9])))
    assert levels[0].stat().st_size > levels[9].stat().st_size
    rc, err = run(["invert", str(good), "-o", str(tmp_path / "x"), "--ext", "tiff"],
                  tiny_models, capsys)
    assert rc == 2 and "'tiff' is not one of png, jpg, webp" in err
    rc, err = run(["invert", str(good), "-o", str(tmp_path / "x"), "-b", "many"],
                  tiny_models, capsys)
    assert rc == 2 and "'many' is neither auto nor a whole number" in err


def test_stdout_is_the_result_and_everything_else_goes_to_stderr(photos: Path, tiny_models: Path,
                                                                 tmp_path: Path) -> None:
    """What a script captures is the path of the run's report; the summary and notes are on
    stderr.  A real process, so nothing but the command itself writes to either stream."""
    import subprocess
    import sys

    out = tmp_path / "inv"
    proc = subprocess.run(
        [sys.executable, "-m", "clipinvert.cli", "invert", str(photos / "a_rgb.png"), "-o",
         str(out), "--models", str(tiny_models), "--domain", "tiny", "--device", "cpu",
         "--workers", "0"],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out / 'clipinvert-report.json'}\n"
    assert "invert: 1 done, 0 skipped, 0 failed" in proc.stderr
    assert (out / "clipinvert-report.json").is_file()


def test_edit_and_interpolate_print_their_report_path(photos: Path, tiny_models: Path,
                                                      tmp_path: Path, capsys) -> None:
    report_file = tmp_path / "elsewhere.json"
    assert main(["edit", str(photos / "a_rgb.png"), "blond hair", "-o", str(tmp_path / "e"),
                 "--report", str(report_file), "--models", str(tiny_models), "--domain", "tiny",
                 "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{report_file}\n" and "edit: 1 done" in captured.err
    assert main(["interpolate", str(photos / "a_rgb.png"), "blond hair", "--steps", "2", "-o",
                 str(tmp_path / "i"), "-q", "--models", str(tiny_models), "--domain", "tiny",
                 "--device", "cpu", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'i' / 'clipinvert-report.json'}\n"
    assert captured.err == ""  # --quiet: nothing but the result
    # A run whose every input failed still made its report: its path is the result.
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    assert main(["invert", str(bad), "-o", str(tmp_path / "b"), "--models", str(tiny_models),
                 "--domain", "tiny", "--device", "cpu", "--workers", "0", "-q"]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'b' / 'clipinvert-report.json'}\n"
    assert "bad.png" in captured.err


def test_train_needs_data_before_anything_else(tmp_path: Path, capsys) -> None:
    """No hidden ./data: a missing --data is a usage error, before any weights are looked for
    (the registry named here does not even exist)."""
    assert main(["train", "-o", str(tmp_path / "run"), "--models",
                 str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("clipinvert: error: missing option --data (the training images; "
                           "only --resume goes without it)")
    assert not (tmp_path / "run").exists()
    # a --data that is not there is the same kind of mistake, also before any weights
    assert main(["train", "--data", str(tmp_path / "nothere"), "-o", str(tmp_path / "run"),
                 "--models", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"clipinvert: error: --data {tmp_path / 'nothere'}: not found"


def test_interpolate_without_a_condition_names_its_own_options(tmp_path: Path, capsys,
                                                               face_crop) -> None:
    """interpolate has no --prompts: its usage line must not offer one."""
    face_crop.save(tmp_path / "a.png")
    assert main(["interpolate", str(tmp_path / "a.png"), "-o", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == \
        "clipinvert: error: give a PROMPT or a --ref-image"


def test_train_and_eval_pass_download_and_offline_to_the_registry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The weight-loading commands take --download/--offline the way edit does: on the
    registry every weight file is found or fetched through."""
    import clipinvert.evaluation.benchmark as benchmark
    import clipinvert.evaluation.run as evaluation
    import clipinvert.training.run as training

    seen: dict[str, object] = {}

    def fake(name, result):
        def call(*args, registry, **kw):
            seen[name] = (registry.download, registry.offline)
            return result
        return call

    monkeypatch.setattr(training, "train", fake("train", None))
    monkeypatch.setattr(evaluation, "evaluate_pairs", fake("metrics", {}))
    monkeypatch.setattr(benchmark, "run_benchmark", fake("benchmark", {}))
    data = tmp_path / "data"
    data.mkdir()
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "r1"), "--download"]) == 0
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "r2"), "--offline"]) == 0
    assert main(["eval", "metrics", str(data), "-o", str(tmp_path / "m"), "--download",
                 "-q"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'm' / 'clipinvert-report.json'}\n"
    assert main(["eval", "benchmark", "--data", str(data), "-o", str(tmp_path / "b"),
                 "--offline", "-q"]) == 0
    assert seen == {"train": (False, True), "metrics": (True, None),
                    "benchmark": (False, True)}
    monkeypatch.setattr(training, "train", fake("train", None))
    assert main(["train", "--data", str(data), "-o", str(tmp_path / "r3"), "--download"]) == 0
    assert seen["train"] == (True, None)


def test_split_and_captions_reach_training_and_the_benchmark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--split` is one option of train and eval benchmark (the data set's own lists), and
    train's `--captions` names a caption source other than the layout's (AFHQ's manifest)."""
    import clipinvert.evaluation.benchmark as benchmark
    import clipinvert.training.run as training

    seen: dict[str, object] = {}

    def fake_train(cfg, **kw):
        seen["train"] = (cfg.split, cfg.captions)

    def fake_benchmark(*args, split, **kw):
        seen["benchmark"] = split
        return {}

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(benchmark, "run_benchmark", fake_benchmark)
    data, caps = tmp_path / "afhq", tmp_path / "captions.jsonl"
    data.mkdir()
    caps.write_text("")
    assert main(["train", "--data", str(data), "--split", "train", "--captions", str(caps),
                 "-o", str(tmp_path / "r")]) == 0
    assert main(["eval", "benchmark", "--data", str(data), "--split", "test",
                 "-o", str(tmp_path / "b"), "-q"]) == 0
    assert seen == {"train": ("train", str(caps)), "benchmark": "test"}
    assert main(["train", "--data", str(data), "--split", "val", "-o", str(tmp_path / "x")]) == 2
