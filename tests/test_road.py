"""The whole road to a new domain (docs/new-domain.md), at tiny scale, through the real CLI.

An NVlabs-structure generator snapshot → ``models import --domain road`` → the roles the later
steps read registered beside it → ``train --stage e4e`` on bare images → its encoder registered
as the domain's ``e4e`` → ``caption --register`` → ``train --stage 1`` → ``train --stage 2`` →
``edit`` with the stage-2 run's models.toml → ``eval metrics`` on the edits; then the
non-square photos edited and scored through the domain itself (its ``resize = "center-crop"``).

Each piece has default-suite tests of its own (tests/test_import.py, test_e4e_stage.py,
test_caption.py, test_chain.py, test_train.py, test_cli.py, test_eval_cli.py); this one checks
only that each step's output is what the next step takes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipinvert.cli import main
from clipinvert.registry import Registry, register_role
from clipinvert.testing.clip import write_tiny_clip
from clipinvert.testing.models import write_alexnet_trunk, write_arcface
from clipinvert.testing.nvlabs import NVSpec, write_snapshot
from clipinvert.vocabulary import PACKAGED_DIR

SIZE = 32  # NVSpec()'s resolution: 8 W+ styles of 64


def write_road_images(directory: Path) -> tuple[list[Path], list[Path]]:
    """Bare images, no captions and no layout: ``square/`` at the generator's size and above
    it, ``wide/`` non-square (landscape and portrait).  Returns (square, non-square)."""
    rng = np.random.default_rng(19)
    groups: tuple[list[Path], list[Path]] = ([], [])
    for kind, sizes, paths in (("square", [(SIZE, SIZE), (48, 48), (SIZE, SIZE)], groups[0]),
                               ("wide", [(48, SIZE), (SIZE, 40), (40, 24)], groups[1])):
        (directory / kind).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            path = directory / kind / f"{kind}{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return groups


def run(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """``clipinvert ARGS`` in-process: exit code 0, returns stdout."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, f"clipinvert {' '.join(map(str, args))} → {rc}\n{err}"
    return out


TRAIN_COMMON = ("--device", "cpu", "--workers", "0", "-b", "2", "--val-fraction", "0.34",
                "--log-every", "1", "--val-every", "2", "--save-every", "2", "--image-every",
                "2", "--max-steps", "2", "--quiet")


def finite_losses(run_dir: Path, steps: int) -> list[dict]:
    """The run's training lines: one per step, each loss finite; validation ran."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for m in train for k, v in m.items() if k.startswith("loss"))
    assert any(m["split"] == "val" for m in lines)
    assert list((run_dir / "images").glob("step_*.png"))
    return train


@pytest.mark.slow  # nine commands, three of them training runs (~15 s on one CPU thread)
def test_road_from_an_nvlabs_snapshot_to_scored_edits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models.toml"
    data = tmp_path / "images"
    square, wide = write_road_images(data)
    images = square + wide

    # 1. models import: the snapshot becomes the new domain's stylegan2 (and resolution).
    snapshot = write_snapshot(tmp_path / "network-snapshot-000100.pkl", NVSpec())
    g = tmp_path / "weights" / "G.pt"
    out = run(capsys, "models", "import", snapshot, "-o", g, "--domain", "road",
              "--models", models)
    assert out == f"{g}\n" and g.is_file()
    road = Registry.load(models).domain("road")
    assert road.resolution == SIZE and Path(road.weights["stylegan2"]) == g.resolve()

    # 2. The other roles, each through register_role (the one function every step uses).
    weights = tmp_path / "weights"
    clip_arch, clip = write_tiny_clip(weights)
    arcface = write_arcface(weights / "arcface.pt", tiny=True)  # identity and e4e's start body
    lpips = write_alexnet_trunk(weights / "alexnet.pt")
    #    Photos of a new domain need not be square: the centred square, as for cats.
    register_role(models, "road", "clip", str(clip), clip_arch=str(clip_arch),
                  resize="center-crop")
    register_role(models, "road", "lpips", str(lpips))
    register_role(models, "road", "arcface", str(arcface))
    register_role(models, "road", "encoder_init", str(arcface))
    road = Registry.load(models).domain("road")
    assert {"stylegan2", "clip", "lpips", "arcface", "encoder_init"} <= set(road.weights)
    assert road.resolution == SIZE and road.resize == "center-crop"  # kept by every write

    # 3. train --stage e4e on the bare images; its best.pt becomes the domain's e4e.
    e4e_run = tmp_path / "runs" / "road-e4e"
    out = run(capsys, "train", "--stage", "e4e", "--domain", "road", "--models", models,
              "--data", data, "-o", e4e_run, *TRAIN_COMMON, "--progressive-start", "1",
              "--progressive-step-every", "1", "--d-reg-every", "2", "--w-pool-size", "3")
    assert out.strip().splitlines()[-1] == str(e4e_run / "models.toml")
    train = finite_losses(e4e_run, 2)
    assert "delta1_loss" in train[1]  # progression from step 1: the first delta trained
    best = e4e_run / "checkpoints" / "best.pt"
    assert best.is_file()
    run_domain = Registry.load(e4e_run / "models.toml").domain("road-e4e")
    assert Path(run_domain.weights["e4e"]) == best.resolve()
    register_role(models, "road", "e4e", str(best))

    # 4. caption --register: the manifest becomes the domain's captions.
    #    The cats vocabulary with every threshold 0: a random CLIP is sure of nothing, so at the
    #    packaged thresholds no image would get a caption (as test_caption.py does).
    vocab = tmp_path / "eager-cats.toml"
    vocab.write_text(re.sub(r"threshold = [0-9.]+", "threshold = 0.0",
                            (PACKAGED_DIR / "cats.toml").read_text(encoding="utf-8")),
                     encoding="utf-8")
    caps = tmp_path / "captions" / "road.jsonl"
    out = run(capsys, "caption", data, "-o", caps, "--domain", "road", "--models", models,
              "--vocabulary", vocab, "--device", "cpu", "--workers", "0", "--register", "-q")
    assert out == f"{caps}\n" and caps.is_file()
    manifest = [json.loads(x) for x in caps.read_text().splitlines()]
    assert len(manifest) == len(images) and all(m["captions"] for m in manifest)
    road = Registry.load(models).domain("road")
    assert road.captions_path == caps.resolve()
    assert Path(road.weights["e4e"]) == best.resolve()  # the earlier steps' keys kept

    # 5. train --stage 1 on the image folder: its captions are the ones `caption --register`
    #    named in the domain, found by --domain alone.
    s1 = tmp_path / "runs" / "road-s1"
    out = run(capsys, "train", "--stage", "1", "--domain", "road", "--models", models,
              "--data", data, "-o", s1, *TRAIN_COMMON)
    assert out.strip().splitlines()[-1] == str(s1 / "models.toml")
    finite_losses(s1, 2)
    latest = s1 / "checkpoints" / "latest.pt"
    assert latest.is_file()

    # 6. train --stage 2 from stage 1's checkpoint.
    s2 = tmp_path / "runs" / "road-s2"
    out = run(capsys, "train", "--stage", "2", "--init", latest, "--domain", "road",
              "--models", models, "--data", data, "-o", s2, *TRAIN_COMMON)
    assert out.strip().splitlines()[-1] == str(s2 / "models.toml")
    finite_losses(s2, 2)
    assert any(k.startswith("decoder.affine_mlps.") for k in torch.load(
        s2 / "checkpoints" / "latest.pt", weights_only=True)["state_dict"])

    # 7. edit with the stage-2 run's models.toml (the chain's last hand-over), then score.
    #    Square photos only: the run's domain does not carry `resize` (see test_run_registry_…).
    edits = tmp_path / "edits"
    out = run(capsys, "edit", square[0].parent, "a cat with blue eyes", "--models",
              s2 / "models.toml", "--domain", "road-s2", "-o", edits, "--device", "cpu",
              "--workers", "0", "-q")
    assert out == f"{edits / 'clipinvert-report.json'}\n"
    check_edits(edits, square)
    check_scores(capsys, edits, tmp_path / "scores", s2 / "models.toml", "road-s2", square)

    # 8. The non-square photos through the domain itself, its centre crop: the stage-2
    #    checkpoint registered as `road`'s clipinverter.
    register_role(models, "road", "clipinverter", str(s2 / "checkpoints" / "best.pt"))
    wide_edits = tmp_path / "wide-edits"
    out = run(capsys, "edit", wide[0].parent, "a cat with blue eyes", "--models", models,
              "--domain", "road", "-o", wide_edits, "--device", "cpu", "--workers", "0", "-q")
    assert out == f"{wide_edits / 'clipinvert-report.json'}\n"
    check_edits(wide_edits, wide)
    assert json.loads((wide_edits / "clipinvert-report.json").read_text())["resize"] == \
        "center-crop"
    check_scores(capsys, wide_edits, tmp_path / "wide-scores", models, "road", wide)


def check_edits(folder: Path, inputs: list[Path]) -> None:
    """One square output at the generator's size per input, all recorded as done."""
    for image in inputs:
        with Image.open(folder / f"{image.stem}.png") as im:
            assert im.size == (SIZE, SIZE)
    report = json.loads((folder / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": len(inputs), "skipped": 0, "failed": 0}


def check_scores(capsys: pytest.CaptureFixture[str], edits: Path, scores: Path, models: Path,
                 domain: str, inputs: list[Path]) -> None:
    """``eval metrics`` on an edit folder: every pair scored, finite numbers."""
    out = run(capsys, "eval", "metrics", edits, "--models", models, "--domain", domain,
              "-o", scores, "--metrics", "cmp,lpips,mse", "--device", "cpu", "-q")
    report_path = scores / "clipinvert-report.json"
    assert out == f"{report_path}\n" and (scores / "summary.png").is_file()
    report = json.loads(report_path.read_text())
    assert report["counts"]["pairs"] == report["counts"]["scored"] == len(inputs)
    assert report["counts"]["skipped"] == 0 and report["skipped"] == []
    assert set(report["metrics"]) == {"cmp", "lpips", "mse"}
    assert all(math.isfinite(v) for v in report["metrics"].values())
    assert sorted(Path(p["input"]).name for p in report["pairs"]) == \
        sorted(i.name for i in inputs)
    for pair in report["pairs"]:
        assert pair["status"] == "scored" and pair["prompt"] == "a cat with blue eyes"
        assert all(math.isfinite(v) for v in pair["scores"].values())


def test_run_registry_keeps_the_domains_resize_policy(tmp_path: Path) -> None:
    """The run's models.toml is "a complete domain named after the run" (docs/new-domain.md):
    it should square photos as the domain it was trained from did."""
    from clipinvert.training.run import run_registry

    clip_arch, clip = write_tiny_clip(tmp_path / "w")
    toml = tmp_path / "models.toml"
    toml.write_text(f'[domains.road]\nresolution = 32\nalign = "none"\nresize = "center-crop"\n'
                    f'clip_arch = "{clip_arch}"\nclip = "{clip}"\ninception = "inception-fid"\n'
                    'note = "nothing released"\n', encoding="utf-8")
    reg = Registry.load(toml)
    run_dir = tmp_path / "road-s1"
    text = run_registry(run_dir, reg.domain("road"), {"clip": clip}, tmp_path / "best.pt", reg)
    (tmp_path / "run.toml").write_text(text, encoding="utf-8")
    run = Registry.load(tmp_path / "run.toml").domain("road-s1")
    assert run.resize == "center-crop"
    # the eval roles come along (FID on the run's domain), the source's note does not
    assert run.weights["inception"] == "inception-fid" and run.note is None
    assert run.weights["clipinverter"] == str((tmp_path / "best.pt").resolve())
