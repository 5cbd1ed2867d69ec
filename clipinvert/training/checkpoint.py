"""What a training run writes: checkpoints in the released layout, and its resumable state.

``latest.pt`` / ``best.pt`` are exactly what the release saves (docs/checkpoints.md#clipinverter):
``{'state_dict': adapter.* + decoder.*, 'opts': plain dict}``, so both ``clipinvert edit`` and
the official ``infer.py`` load them.  ``resume.pt`` adds what the release never saved: optimizer
state, step, sampler position and every RNG state — enough to continue bit for bit.
"""

from __future__ import annotations

import math
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


def save_resume(path: Path, *, trained: dict[str, Any], step: int, epoch: int, position: int,
                best: float | None, cfg: TrainConfig) -> None:
    """``resume.pt``: the loop's position and RNG states plus ``trained``, the stage's own
    networks and optimizers (stages 1–2: ``model`` and ``optimizer``; e4e: ``training/
    e4e_train.py``) — tensors and plain types, so the safe reader loads it."""
    state = {"format": "clipinvert-train/1", "step": step, "epoch": epoch,
             "position": position, "best_val": best, "config": cfg.to_dict(),
             **trained, "rng": rng_states()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict[str, Any]:
    """``resume.pt`` through the one safe reader (tensors and plain types only)."""
    from ..weights.reader import read_weights

    state = read_weights(path, what="training state", cache=False)
    if state.get("format") != "clipinvert-train/1":
        from ..errors import UsageError

        raise UsageError(f"{path} is not a clipinvert training state")
    return state


def e4e_opts(*, stylegan_size: int, settings: Any, lr: float, batch_size: int, max_steps: int,
             identity: str, domain: str) -> dict[str, Any]:
    """``opts`` under e4e's own option names (``options/train_options.py``), so e4e's
    ``setup_model`` rebuilds the network from our checkpoint (``checkpoint_path`` and
    ``device`` it sets itself).  ``settings``: an :class:`~.e4e_step.E4ESettings`."""
    from .e4e_step import progressive_steps

    w = settings.weights
    n_styles = 2 * int(math.log2(stylegan_size)) - 2
    return {
        "encoder_type": "Encoder4Editing", "stylegan_size": int(stylegan_size),
        "start_from_latent_avg": True, "dataset_type": f"{domain}_encode",
        "batch_size": int(batch_size), "learning_rate": float(lr), "optim_name": "ranger",
        "train_decoder": False, "max_steps": int(max_steps), "lpips_type": "alex",
        "lpips_lambda": float(w.lpips), "id_lambda": float(w.id), "l2_lambda": float(w.l2),
        "w_discriminator_lambda": float(w.adv), "w_discriminator_lr": float(settings.d_lr),
        "r1": float(settings.r1), "d_reg_every": int(settings.d_reg_every),
        "use_w_pool": settings.w_pool_size > 0, "w_pool_size": int(settings.w_pool_size),
        "delta_norm": int(settings.delta_norm), "delta_norm_lambda": float(w.delta),
        "progressive_start": int(settings.progressive_start),
        "progressive_step_every": int(settings.progressive_step_every),
        "progressive_steps": progressive_steps(settings.progressive_start,
                                               settings.progressive_step_every, n_styles),
        "identity": identity, "tool": "clipinvert",
    }


def e4e_checkpoint(encoder: torch.nn.Module, decoder: torch.nn.Module, latent_avg: torch.Tensor,
                   discriminator: torch.nn.Module | None, opts: dict[str, Any]) -> dict[str, Any]:
    """e4e's checkpoint layout (its coach's ``__get_save_dict``): ``state_dict`` with
    ``encoder.*`` + ``decoder.*``, ``latent_avg`` (n_styles, 512), ``opts``, and
    ``discriminator_state_dict`` — what ``load_e4e`` and e4e's ``setup_model`` read."""
    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

    state = {f"encoder.{k}": v for k, v in cpu(encoder.state_dict()).items()}
    state.update({f"decoder.{k}": v for k, v in cpu(decoder.state_dict()).items()})
    ckpt: dict[str, Any] = {"state_dict": state, "latent_avg": latent_avg.detach().cpu().clone(),
                            "opts": dict(opts)}
    if discriminator is not None:
        ckpt["discriminator_state_dict"] = cpu(discriminator.state_dict())
    return ckpt


def save_e4e(path: Path, ckpt: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
