"""The chain of registries (docs/new-domain.md#the-chain): after each step of the road to a new
domain, the next command finds what the step made by ``--domain`` alone, and every table
written is the complete merged domain table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipinvert.registry import PACKAGED_REGISTRY, Registry, register_role


def test_registered_captions_and_generator_keep_the_whole_table(tmp_path: Path) -> None:
    """caption --register then models import --domain into one --models file: the cats table
    keeps the packaged roles, the resize policy and each step's result."""
    models = tmp_path / "mine.toml"
    caps = tmp_path / "cats" / "captions.jsonl"
    caps.parent.mkdir()
    caps.write_text("")
    packaged = Registry.load(PACKAGED_REGISTRY, user=False).domain("cats")
    register_role(models, "cats", "captions", str(caps))
    register_role(models, "cats", "stylegan2", str(tmp_path / "g.pt"), resolution=512)
    cats = Registry.load(models).domain("cats")
    assert cats.source == models.resolve()
    assert cats.captions_path == caps and cats.weights["stylegan2"] == str(tmp_path / "g.pt")
    assert cats.resize == packaged.resize == "center-crop"
    for role in ("clip", "moco", "lpips", "inception"):
        assert cats.weights[role] == packaged.weights[role]
    # a relative captions path is read from the models.toml that names it
    rel = tmp_path / "rel.toml"
    rel.write_text('[domains.d]\nresolution = 32\ncaptions = "cats/captions.jsonl"\n')
    assert Registry.load(rel).domain("d").captions_path == caps


def test_train_reads_the_registered_captions_without_captions_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --domain D --data afhq` takes the manifest `caption --register` named; an
    explicit --captions still wins."""
    from clipinvert.testing.training import write_training_domain
    from clipinvert.training import build as build_module
    from clipinvert.training.config import TrainConfig

    toml = write_training_domain(tmp_path / "dom")
    caps = tmp_path / "caps.jsonl"
    caps.write_text("")
    register_role(toml, "trainable", "captions", str(caps))
    seen: list[object] = []

    class Stop(Exception):
        pass

    def fake_dataset(data, fmt, *, captions, **kw):
        seen.append(captions)
        raise Stop

    monkeypatch.setattr("clipinvert.training.data.ImageCaptionDataset", fake_dataset)
    for given in (None, "other.jsonl"):
        cfg = TrainConfig.for_stage(1, domain="trainable", data=str(tmp_path), captions=given,
                                    run_dir=str(tmp_path / "run"))
        with pytest.raises(Stop):
            build_module.build(cfg, Registry.load(toml), torch.device("cpu"))
    assert seen == [str(caps), "other.jsonl"]


def test_caption_register_names_the_manifest_in_the_users_domain(
        tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`caption --register` (no --models): the user's registry gets the domain's complete table
    with `captions` set, so the next step needs only --domain."""
    from PIL import Image

    from clipinvert.cli import main
    from clipinvert.registry import domain_table, set_domain_table, user_registry

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    reg = Registry.load(tiny_models)
    set_domain_table(user_registry(), "tiny",
                     domain_table(reg.domain("tiny"), reg, user_registry()))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 90, 20)).save(data / f"cat{i}.png")
    out = tmp_path / "work" / "captions.jsonl"
    assert main(["caption", str(data), "-o", str(out), "--domain", "tiny", "--vocabulary",
                 "cats", "--device", "cpu", "--workers", "0", "--register", "-q"]) == 0
    assert capsys.readouterr().out == f"{out}\n"
    tiny = Registry.load().domain("tiny")
    assert tiny.captions_path == out.resolve() and tiny.source == user_registry().resolve()
    assert tiny.weights.keys() == reg.domain("tiny").weights.keys()


def test_train_register_names_the_new_encoder_as_the_domains_e4e(tmp_path: Path,
                                                                capsys) -> None:
    """`train --stage e4e --register`: the run's checkpoint becomes the domain's e4e in the
    --models file, the rest of the table kept, so stage 1 and edit find it by --domain."""
    from clipinvert.cli import main
    from clipinvert.testing.training import write_image_set, write_training_domain

    toml = write_training_domain(tmp_path / "dom")
    before = Registry.load(toml).domain("trainable")
    images = write_image_set(tmp_path / "images", 4, size=40, seed=1)
    run = tmp_path / "run"
    assert main(["train", "--stage", "e4e", "--data", str(images), "-o", str(run), "--models",
                 str(toml), "--domain", "trainable", "--device", "cpu", "--workers", "0",
                 "-b", "2", "--val-fraction", "0.5", "--max-steps", "1", "--quiet",
                 "--register"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{run / 'models.toml'}\n"
    assert "registered: e4e = " in captured.err
    after = Registry.load(toml).domain("trainable")
    saved = run / "checkpoints"
    assert Path(after.weights["e4e"]) in {(saved / "best.pt").resolve(),
                                          (saved / "latest.pt").resolve()}
    # the same file: every other role kept as written (relative to it)
    assert {r: v for r, v in after.weights.items() if r != "e4e"} == \
        {r: v for r, v in before.weights.items() if r != "e4e"}


def test_a_plain_folder_takes_its_captions_from_a_manifest(tmp_path: Path) -> None:
    """What `caption` wrote for a read-only folder (by --captions, or the domain's registered
    captions): each image of the folder finds its captions by path; one it lacks is skipped."""
    import json

    from PIL import Image

    from clipinvert.training.data import ImageCaptionDataset

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (20, 12), (9, 9, 9)).save(folder / f"{name}.png")
    manifest = tmp_path / "work" / "captions.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps({"image": f"../photos/{n}.png",
                                            "captions": [f"cat {n}"]}) + "\n" for n in "ab"))
    lines: list[str] = []
    ds = ImageCaptionDataset(folder, captions=manifest, size=16, warn=lines.append)
    assert {Path(s.path).name: s.captions for s in ds.samples} == {"a.png": ("cat a",),
                                                                    "b.png": ("cat b",)}
    assert len(lines) == 1 and "c.png" in lines[0]
    with pytest.raises(Exception, match="cannot tell the layout"):
        ImageCaptionDataset(folder, size=16)  # without a caption source: as before
