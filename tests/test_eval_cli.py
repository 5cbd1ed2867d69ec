"""`clipinvert eval` end to end on tiny random models written in the released layouts."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinvert.cli import main
from clipinvert.evaluation.protocol import FACE_ATTRIBUTES


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipinvert.testing.training import write_eval_domain

    return write_eval_domain(tmp_path_factory.mktemp("eval-domain"))


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CelebA-HQ-shaped set: images/<index>.jpg and the 40-attribute annotation file."""
    root = tmp_path_factory.mktemp("celebahq")
    (root / "images").mkdir()
    names = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
             "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry",
             "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee",
             "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
             "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
             "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
             "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
             "Wearing_Necklace", "Wearing_Necktie", "Young"]
    rng = np.random.default_rng(0)
    lines = ["6", " ".join(names)]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.jpg")
        labels = ["1" if (i + k) % 3 == 0 else "-1" for k in range(40)]
        lines.append(f"{i}.jpg " + " ".join(labels))
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(lines) + "\n")
    return root


def _args(domain: Path, *extra: str) -> list[str]:
    return ["--models", str(domain), "--domain", "trainable", "--device", "cpu", *extra]


@pytest.mark.slow  # the whole protocol: 44 edits, every metric, twice, then compare (~70 s)
def test_benchmark_edits_scores_resumes_and_compares(domain: Path, celeba: Path,
                                                     tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    rc = main(["eval", "benchmark", "--data", str(celeba), "-o", str(out), "--per-target", "2",
               "--identity", "dlib", *_args(domain), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "clipinvert-report.json").read_text())
    selection = json.loads((out / "selection.json").read_text())
    assert report["schema"] == "clipinvert-eval/1" and report["command"] == "eval benchmark"
    # 15 attributes + 7 combinations, 2 inputs each (an input never has its target attribute)
    assert len(selection["edits"]) == 22 * 2 == report["counts"]["scored"]
    assert set(report["metrics"]) == {"fid", "cmp", "ama_single", "ama_multiple", "id",
                                      "lpips", "mse"}
    for name, value in report["metrics"].items():
        assert value is not None and np.isfinite(value), name
    assert set(report["details"]["ama_single"]["per_attribute"]) == set(FACE_ATTRIBUTES)
    assert report["details"]["id"]["identity"] == "dlib"
    assert report["details"]["ama_multiple"]["threshold"] == 0.9
    assert set(report["models"]) >= {"clip", "inception", "attributes", "lpips"}
    assert all(len(m["sha256"]) == 64 for m in report["models"].values())
    assert report["benchmark"]["seed"] == 0 and report["benchmark"]["per_target"] == 2
    assert (out / "summary.png").stat().st_size > 1000 and (out / "pairs.jsonl").exists()
    made = sorted((out / "edits").rglob("*.png"))
    assert len(made) == 44
    stamps = {p: p.stat().st_mtime_ns for p in made}
    # A second run keeps every edit (same model and selection) and scores the same.
    capsys.readouterr()
    assert main(["eval", "benchmark", "--data", str(celeba), "-o", str(out), "--per-target",
                 "2", "--identity", "dlib", *_args(domain), "--quiet"]) == 0
    assert "editing 0 of 44" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in made} == stamps
    again = json.loads((out / "clipinvert-report.json").read_text())
    assert again["metrics"] == report["metrics"]
    # The same edits scored through `eval metrics` and the two reports side by side.
    other = tmp_path / "metrics"
    assert main(["eval", "metrics", str(out / "pairs.jsonl"), "-o", str(other),
                 "--metrics", "cmp,mse", *_args(domain), "--quiet", "--no-summary"]) == 0
    scored = json.loads((other / "clipinvert-report.json").read_text())
    assert scored["metrics"]["cmp"] == pytest.approx(report["metrics"]["cmp"], rel=1e-6)
    capsys.readouterr()
    assert main(["eval", "compare", str(out / "clipinvert-report.json"),
                 str(other / "clipinvert-report.json"), "--attributes"]) == 0
    table = capsys.readouterr().out
    assert "bench" in table and "metrics" in table and "Blond_Hair" in table


def test_eval_scores_an_edit_folder_and_never_replaces_its_report(
        domain: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            photos / f"p{i}.png")
    edited = tmp_path / "edited"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("blond hair\na beard\n")
    assert main(["edit", str(photos), "--prompts", str(prompts), "-o", str(edited),
                 "--workers", "0", *_args(domain), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "metrics", str(edited), "-o", str(edited), "--metrics", "mse",
                 *_args(domain)]) == 2
    assert "not an eval report" in capsys.readouterr().err
    out = tmp_path / "scores"
    assert main(["eval", "metrics", str(edited), "-o", str(out), "--metrics", "cmp,lpips,mse",
                 *_args(domain), "--quiet"]) == 0
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"pairs": 6, "scored": 6, "skipped": 0, "without_prompt": 0,
                                "resized": 0}
    assert sorted({p["prompt"] for p in report["pairs"]}) == ["a beard", "blond hair"]


def test_missing_weights_are_named_at_once(tmp_path: Path, capsys) -> None:
    from clipinvert.testing.training import write_training_domain

    toml = write_training_domain(tmp_path / "d")  # no inception, no attributes
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"input": "a.png", "output": "b.png", "prompt": "p",
                                 "attributes": ["Smiling"]}) + "\n")
    rc = main(["eval", "metrics", str(pairs), "-o", str(tmp_path / "o"), "--metrics",
               "fid,ama_single", "--models", str(toml), "--domain", "trainable"])
    err = capsys.readouterr().err
    assert rc == 3 and "inception" in err and "attributes" in err
    assert len(err.strip().splitlines()) == 1


def test_train_classifier_resume_means_what_it_means_for_train(tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    """Off by default: an unfinished run or an existing file is refused in one line naming
    --resume (and --overwrite); --resume needs a run to continue.  All before any data is read
    (the CelebA folder named does not exist)."""
    import clipinvert.evaluation.classifier as clf

    out = tmp_path / "attrs.pt"
    base = ["eval", "train-classifier", "--celeba", str(tmp_path / "none"), "-o", str(out),
            "--device", "cpu"]

    def err_line() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert main([*base, "--resume"]) == 2
    assert "--resume" in err_line()
    clf.state_path_for(out).write_bytes(b"a saved run")
    assert main(base) == 2
    line = err_line()
    assert "unfinished run" in line and "--resume" in line and "--overwrite" in line
    clf.state_path_for(out).unlink()
    out.write_bytes(b"someone's classifier")
    assert main(base) == 2
    line = err_line()
    assert "already exists" in line and "--resume" in line and "--overwrite" in line
    # With the flag the library is asked to continue (or, with --overwrite, to start over).
    calls: list[dict] = []

    def fake(celeba, output, **kw):
        calls.append(kw)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: what matters is what it was asked
        time.sleep(5)  # the handler raises KeyboardInterrupt here

    monkeypatch.setattr(clf, "train_classifier", fake)
    assert main([*base, "--resume"]) == 130
    assert "--resume" in capsys.readouterr().err  # the stop line says how to go on
    assert main([*base, "--overwrite"]) == 130
    assert [(c["resume"], c["overwrite"]) for c in calls] == [(True, False), (False, True)]


def test_stretched_inputs_of_an_edit_folder_are_scored_and_unknown_shapes_are_not(
        domain: Path, tmp_path: Path, capsys) -> None:
    """A domain that stretches (the default) turns a 48×32 photo into a square edit: the edit
    folder's report says so, and eval compares them as the model saw the input.  A manifest
    of unknown provenance with shapes that differ is still skipped."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)
                    ).save(photos / "wide.png")
    edited = tmp_path / "edited"
    assert main(["edit", str(photos), "blond hair", "-o", str(edited), "--workers", "0",
                 *_args(domain), "--quiet"]) == 0
    out = tmp_path / "scores"
    assert main(["eval", "metrics", str(edited), "-o", str(out), "--metrics", "mse",
                 *_args(domain), "--quiet"]) == 0
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"]["scored"] == 1 and report["pairs"][0]["resize"] == "stretch"
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"input": str(photos / "wide.png"),
                                    "output": str(edited / "wide.png")}) + "\n")
    capsys.readouterr()
    assert main(["eval", "metrics", str(manifest), "-o", str(tmp_path / "m"), "--metrics",
                 "mse", *_args(domain), "--quiet"]) == 2
    assert "differ in shape" in capsys.readouterr().err
