"""What a training run writes: checkpoints in the released layout, and its resumable state.

``latest.pt`` / ``best.pt`` are exactly what the release saves (docs/checkpoints.md#clipinverter):
``{'state_dict': adapter.* + decoder.*, 'opts': plain dict}``, so both ``clipinvert edit`` and
the official ``infer.py`` load them.  ``resume.pt`` adds what the release never saved: optimizer
state, step, sampler position and every RNG state — enough to continue bit for bit.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write
from ..model import CLIPInverter
from .config import TrainConfig


def released_opts(model: CLIPInverter, cfg: TrainConfig) -> dict[str, Any]:
    """The ``opts`` the official inference reads (plain types only, as ``vars(opts)`` was)."""
    return {
        "stylegan_size": int(model.decoder.size),
        "start_from_latent_avg": True,
        "no_coarse_mapper": False, "no_medium_mapper": False, "no_fine_mapper": False,
        "stage": int(cfg.stage), "learning_rate": float(cfg.lr),
        "batch_size": int(cfg.batch_size), "max_steps": int(cfg.max_steps),
        "clip_model": "ViT-B/32", "domain": cfg.domain, "tool": "clipinvert",
    }


def released_state(model: CLIPInverter) -> dict[str, torch.Tensor]:
    """``adapter.*`` + ``decoder.*`` (the decoder with its remapper in stage 2), on the CPU."""
    assert model.adapter is not None
    sd = {f"adapter.{k}": v for k, v in model.adapter.state_dict().items()}
    sd.update({f"decoder.{k}": v for k, v in model.decoder.state_dict().items()})
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def save_released(path: Path, model: CLIPInverter, cfg: TrainConfig) -> None:
    ckpt = {"state_dict": released_state(model), "opts": released_opts(model, cfg)}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def rng_states() -> dict[str, Any]:
    """Every RNG state as tensors and plain types, so ``resume.pt`` loads with
    ``weights_only=True`` like any other file."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np.asarray(np_keys, np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_resume(path: Path, *, model: CLIPInverter, optimizer: torch.optim.Optimizer,
                step: int, epoch: int, position: int, best: float | None,
                cfg: TrainConfig) -> None:
    state = {"format": "clipinvert-train/1", "step": step, "epoch": epoch,
             "position": position, "best_val": best, "config": cfg.to_dict(),
             "model": released_state(model), "optimizer": optimizer.state_dict(),
             "rng": rng_states()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict[str, Any]:
    """``resume.pt`` through the one safe reader (tensors and plain types only)."""
    from ..weights.reader import read_weights

    state = read_weights(path, what="training state", cache=False)
    if state.get("format") != "clipinvert-train/1":
        from ..errors import UsageError

        raise UsageError(f"{path} is not a clipinvert training state")
    return state
