"""Weights in the editing commands: consent to download, offline, trust, fast reload."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipinvert import Editor
from clipinvert.checkpoints import load_e4e, read_checkpoint
from clipinvert.cli import main
from clipinvert.errors import WeightsError
from clipinvert.weights.cache import cache_root


def _registry_with_urls(tiny_models: Path, tmp_path: Path) -> Path:
    """A registry whose domain names [weights.*] entries downloadable from file:// URLs."""
    root = tiny_models.parent
    lines = ["[domains.dl]", "resolution = 32", 'align = "none"',
             f'clip_arch = "{root / "clip-tiny.json"}"',
             'clip = "tiny-clip"', 'e4e = "tiny-e4e"', 'clipinverter = "tiny-ci"', ""]
    for name, file in (("tiny-clip", "clip-tiny-open_clip.pt"), ("tiny-e4e", "tiny-e4e.pt"),
                       ("tiny-ci", "tiny-clipinverter.pt")):
        lines += [f"[weights.{name}]", f'file = "{name}.pt"',
                  f'urls = ["{(root / file).as_uri()}"]', ""]
    p = tmp_path / "dl.toml"
    p.write_text("\n".join(lines))
    return p


def test_missing_weights_download_only_with_consent(tiny_models: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    face_crop: Image.Image, capsys) -> None:
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # open_clip stays offline: weights come from files
    reg = _registry_with_urls(tiny_models, tmp_path)
    img = tmp_path / "x.png"
    face_crop.save(img)
    args = ["edit", str(img), "blond", "--models", str(reg), "--domain", "dl", "--device",
            "cpu", "-q", "--workers", "0"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 3  # no consent: nothing fetched
    err = capsys.readouterr().err
    assert "not found" in err and "clipinvert models download" in err
    assert not (tmp_path / "cache" / "tiny-e4e.pt").exists()
    assert main([*args, "--offline", "--download", "-o", str(tmp_path / "b")]) == 3
    assert "offline" in capsys.readouterr().err
    assert main([*args, "--download", "-o", str(tmp_path / "c")]) == 0
    assert (tmp_path / "cache" / "tiny-e4e.pt").exists()
    assert (tmp_path / "c" / "x.png").exists()


def test_trust_checkpoint_is_explicit(tiny_models: Path, tmp_path: Path,
                                      face_crop: Image.Image) -> None:
    ckpt = read_checkpoint(tiny_models.parent / "tiny-e4e.pt")
    ckpt["opts"] = {"exp_dir": pathlib.PurePosixPath("/runs/e4e")}  # a non-allow-listed object
    odd = tmp_path / "odd_e4e.pt"
    torch.save(ckpt, odd)
    with pytest.raises(WeightsError, match="--trust-checkpoint"):
        load_e4e(odd)
    ed = Editor.from_files(e4e=odd, clipinverter=tiny_models.parent / "tiny-clipinverter.pt",
                           device="cpu", trust_checkpoint=True)
    assert ed.invert([face_crop]).images.shape == (1, 3, 32, 32)


def test_second_load_comes_from_safetensors_cache(tiny_models: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "cache"))
    src = tmp_path / "e4e.pt"
    shutil.copy(tiny_models.parent / "tiny-e4e.pt", src)  # 8.8 MB: above the 8 MiB threshold
    first = load_e4e(src)
    converted = list(cache_root().glob("*.safetensors"))
    assert len(converted) == 1
    second = load_e4e(src)
    for (k, a), b in zip(first.encoder.state_dict().items(),
                         second.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(first.latent_avg, second.latent_avg)


def test_editor_keeps_a_shared_registrys_consent(tiny_models: Path) -> None:
    """`eval benchmark` builds one registry with the user's --download/--offline, edits through
    an Editor on it, then scores: the Editor must not reset those flags half-way."""
    from clipinvert.registry import Registry

    reg = Registry.load(tiny_models)
    reg.download, reg.offline = True, True
    Editor("tiny", registry=reg, device="cpu")
    assert (reg.download, reg.offline) == (True, True)
    Editor("tiny", registry=reg, device="cpu", download=False, offline=False)
    assert (reg.download, reg.offline) == (False, False)
    own = Editor("tiny", models=tiny_models, device="cpu")
    assert own.registry.download is False and own.registry.offline is None
