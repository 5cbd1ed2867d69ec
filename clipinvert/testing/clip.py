"""Random-weight CLIP checkpoints in the layouts users bring, for tests and benchmarks.

Nothing may be downloaded in tests, yet the loader must be exercised on both real layouts: an
open_clip ``torch.save`` state dict and OpenAI's TorchScript archive (``ViT-B-32.pt``).  These
helpers write either layout from seeded random tensors, for a tiny config (fast tests) or a
full-size built-in architecture (benchmarks with realistic cost).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import open_clip
import torch
from torch import nn

from clipinvert.clip_encoder import build_clip_model

# Small enough to build and run in milliseconds, but with the real tokenizer/vocabulary, the
# real 224-px input and the 512-d output that CLIPInverter's adapter consumes.
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 512,
    "quick_gelu": True,
    "vision_cfg": {
        "image_size": 224,
        "patch_size": 32,
        "width": 64,
        "head_width": 32,  # open_clip derives heads = width // head_width = 2
        "layers": 2,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}

FORMATS = ("open_clip", "openai")


def random_clip_state_dict(
    cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded random weights with the key layout open_clip builds for ``cfg``.

    Keys are filled in sorted order from one ``torch.Generator`` so the values depend only on
    ``seed`` and the layout, not on open_clip's module order or the global RNG.  LayerNorm scales
    sit near 1 and logit_scale at CLIP's init so activations stay in a realistic range.
    """
    with torch.device("meta"):  # layout only: no memory, no init cost even at full size
        model = build_clip_model("random", cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        leaf = key.rsplit(".", 1)[-1]
        owner = key.rsplit(".", 2)[-2] if key.count(".") else ""
        if key == "logit_scale":
            value = torch.full(shape, math.log(1 / 0.07))
        elif leaf == "weight" and owner.startswith("ln_"):
            value = 1.0 + 0.02 * torch.randn(shape, generator=gen)
        else:
            value = 0.02 * torch.randn(shape, generator=gen)
        out[key] = value.to(dtype)
    return out


def write_clip_weights(
    path: Path, state_dict: dict[str, torch.Tensor], cfg: dict, fmt: str = "open_clip"
) -> Path:
    """Write ``state_dict`` as an open_clip ``torch.save`` file or an OpenAI TorchScript archive.

    The OpenAI archive is a scripted module tree whose ``state_dict()`` yields exactly the OpenAI
    key names plus the ``input_resolution``/``context_length``/``vocab_size`` tensors that the
    real file carries, so ``torch.jit.load`` treats it as it treats ``ViT-B-32.pt``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "open_clip":
        torch.save(state_dict, path)
        return path
    if fmt != "openai":
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    image_size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    extras = {
        "input_resolution": torch.tensor(int(image_size)),
        "context_length": torch.tensor(int(cfg["text_cfg"].get("context_length", 77))),
        "vocab_size": torch.tensor(int(cfg["text_cfg"].get("vocab_size", 49408))),
    }
    root = _TensorTree()
    for key, value in {**state_dict, **extras}.items():
        *parents, leaf = key.split(".")
        module: nn.Module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 flags torch.jit as deprecated
        torch.jit.script(root).save(str(path))
    return path


class _TensorTree(nn.Module):
    """Root of the scripted tree; TorchScript needs a compilable ``forward`` to save a module."""

    def forward(self) -> int:
        return 0


def write_tiny_clip(
    directory: Path, fmt: str = "open_clip", seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Path, Path]:
    """Write ``TINY_CLIP_CONFIG`` as JSON plus seeded random weights in ``fmt``.

    ``dtype=torch.float16`` mimics OpenAI's archive, which stores half-precision weights.
    Returns ``(config_json_path, weights_path)``; pass the JSON path as ``arch``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "clip-tiny.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    state_dict = random_clip_state_dict(TINY_CLIP_CONFIG, seed=seed, dtype=dtype)
    weights = write_clip_weights(
        directory / f"clip-tiny-{fmt}.pt", state_dict, TINY_CLIP_CONFIG, fmt=fmt
    )
    return config_path, weights


def write_random_clip(
    directory: Path,
    arch: str = "ViT-B-32-quickgelu",
    fmt: str = "open_clip",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Random weights for a full-size built-in architecture (no download); returns the path.

    For benchmarks that need the real model's cost: ``ClipEncoder(arch, path)`` loads it.
    """
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    state_dict = random_clip_state_dict(cfg, seed=seed, dtype=dtype)
    return write_clip_weights(Path(directory) / f"{arch}-random-{fmt}.pt", state_dict, cfg, fmt)
