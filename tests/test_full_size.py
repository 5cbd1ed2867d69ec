"""Heavy check (``pytest -m slow``): full-size 1024 checkpoints through the real loaders.

Writes random-weight files with the released models' exact sizes (e4e ≈1.2 GB, CLIPInverter
≈200 MB, CLIP ViT-B/32 ≈350 MB) and runs one edit and one interpolation at 1024 on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from clipinvert.nets import GeneratorConfig
    from clipinvert.testing.clip import write_random_clip
    from clipinvert.testing.models import write_clipinverter, write_e4e

    d = tmp_path_factory.mktemp("full")
    cfg = GeneratorConfig(size=1024)
    return {"e4e": write_e4e(d / "e4e_ffhq_encode.pt", cfg),
            "ci": write_clipinverter(d / "pretrained_faces.pt", cfg),
            "clip": write_random_clip(d, arch="ViT-B-32-quickgelu", fmt="openai")}


def test_released_sizes_load_and_edit_at_1024(full_files: dict[str, Path],
                                              face_crop: Image.Image) -> None:
    from clipinvert import Editor
    from clipinvert.checkpoints import read_checkpoint

    ci = read_checkpoint(full_files["ci"])["state_dict"]
    assert sum(k.startswith("adapter.") for k in ci) == 45
    assert sum(k.startswith("decoder.") for k in ci) == 171 + 144
    e4e = read_checkpoint(full_files["e4e"])
    assert sum(k.startswith("encoder.") for k in e4e["state_dict"]) == 621
    assert e4e["latent_avg"].shape == (18, 512)

    ed = Editor.from_files(e4e=full_files["e4e"], clipinverter=full_files["ci"],
                           clip=full_files["clip"], device="cpu")
    enc = ed.encode([face_crop])
    assert enc.w.shape == (1, 18, 512)
    assert [tuple(f.shape[1:]) for f in enc.features] == [(128, 64, 64), (256, 32, 32),
                                                          (512, 16, 16)]
    out = ed.edit(enc, "she has wavy blond hair")
    assert out.images.shape == (1, 3, 1024, 1024) and torch.isfinite(out.images).all()
    frames = ed.interpolate(enc, "she has wavy blond hair", steps=2)
    assert torch.equal(frames[-1].images, out.images)
    assert torch.equal(frames[0].images, ed.invert(enc).images)
