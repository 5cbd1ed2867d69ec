"""A tiny trainable domain and a tiny captioned image set, for tests and benchmarks.

Random weights in the released layouts (e4e with its decoder, the matching rosinality
``g_ema``, ArcFace, torchvision's AlexNet trunk for LPIPS, CLIP), read back through the real
loaders by ``clipinvert train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .models import tiny_config, write_alexnet_trunk, write_arcface, write_domain, write_stylegan2


def write_training_domain(directory: Path, *, name: str = "trainable", size: int = 32,
                          style_dim: int = 64, max_channels: int = 32) -> Path:
    """``models.toml`` of a domain with every role training needs; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    write_domain(directory, size=size, style_dim=style_dim, max_channels=max_channels,
                 name=name, toml_name="edit.toml")
    cfg = tiny_config(size, style_dim, max_channels)
    write_stylegan2(directory / "stylegan2.pt", cfg, seed=1)  # = the e4e file's decoder
    write_arcface(directory / "arcface.pt", tiny=True)
    write_alexnet_trunk(directory / "alexnet.pt")
    edit = (directory / "edit.toml").read_text(encoding="utf-8")
    extra = ('stylegan2 = "stylegan2.pt"\narcface = "arcface.pt"\nlpips = "alexnet.pt"\n'
             'encoder_init = "arcface.pt"\n')  # the e4e stage starts its encoder from it
    toml = directory / "models.toml"
    toml.write_text(edit.rstrip("\n") + "\n" + extra, encoding="utf-8")
    return toml


CAPTIONS = ("a person with blond hair", "a person with a beard", "a smiling person",
            "a person wearing glasses", "a person with red lipstick", "a person with grey hair")


def write_image_set(directory: Path, n: int = 6, *, size: int = 48, seed: int = 0) -> Path:
    """``n`` small random images ``img000.png``…, nothing else (the e4e stage's data)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(directory / f"img{i:03d}.png")
    return directory


def write_caption_set(directory: Path, n: int = 6, *, size: int = 48, seed: int = 0) -> Path:
    """``n`` small random images with sidecar captions (two lines each)."""
    write_image_set(directory, n, size=size, seed=seed)
    for i in range(n):
        lines = [CAPTIONS[i % len(CAPTIONS)], CAPTIONS[(i + 1) % len(CAPTIONS)]]
        (directory / f"img{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def write_eval_domain(directory: Path, *, name: str = "trainable") -> Path:
    """``models.toml`` of a tiny domain with every role evaluation needs (the training roles
    plus a random FID Inception and a tiny attribute classifier); returns its path."""
    from .models import write_attribute_classifier, write_inception

    toml = write_training_domain(directory, name=name)
    write_inception(directory / "inception.pt")
    write_attribute_classifier(directory / "attributes.pt", tiny=True)
    text = toml.read_text(encoding="utf-8").rstrip("\n")
    toml.write_text(text + '\ninception = "inception.pt"\nattributes = "attributes.pt"\n',
                    encoding="utf-8")
    return toml
