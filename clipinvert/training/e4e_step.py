"""One step of e4e's own encoder training (docs/training.md#e4e-stage).

The order and every term are those of encoder4editing's ``training/coach.py``:

1. the latent discriminator: real codes are mapped z, fake ones the encoder's ``w0 +
   latent_avg`` (no gradient; with the w-pool, a random *active* index of each sample's codes,
   maybe swapped for an older code); ``softplus(−D(real)) + softplus(D(fake))``, an Adam step;
2. every ``d_reg_every`` steps, R1 on the real codes: ``r1/2 · E‖∇D‖² · d_reg_every``, its own
   Adam step;
3. the encoder: ``adv · mean_i softplus(−D(w_i))`` over the active indices ``0..stage``
   + ``delta · Σ‖w_i − w_0‖`` + ``id · identity`` + ``l2 · MSE`` + ``lpips · LPIPS`` on the
   generator's output pooled to 256; one Ranger step.  The decoder and ``latent_avg`` never
   change.

Randomness comes from ``(seed, step)`` alone (:func:`~clipinvert.training.data.derive_seed`):
the discriminator's z, the generator's noise and the w-pool's draws, each drawn for the global
batch and cut into the rows of this rank (``r::world_size``, as the sampler deals the samples),
so a resumed run and a DDP run draw what an uninterrupted single process draws.  Under DDP the
w-pools see the codes of the global batch (gathered), so every process holds the same pools —
those of one process of the global batch.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..losses.e4e import (
    delta_regularization,
    discriminator_logistic,
    encoder_adversarial,
    r1_penalty,
)
from .data import derive_seed

ImageLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class E4EWeights:
    """The encoder's loss weights; defaults are e4e's README training command."""

    l2: float = 1.0
    lpips: float = 0.8
    id: float = 0.1  # 0.5 with MoCo (the README's cars command): see default_id_weight
    adv: float = 0.1  # e4e's w_discriminator_lambda
    delta: float = 2e-4  # e4e's delta_norm_lambda


def default_id_weight(identity: str) -> float:
    """e4e's id_lambda: 0.1 with ArcFace (faces), 0.5 with MoCo (its cars command)."""
    return 0.1 if identity == "arcface" else 0.5


@dataclass
class E4ESettings:
    """How the discriminator and the progression run; defaults are e4e's training command."""

    weights: E4EWeights = field(default_factory=E4EWeights)
    d_lr: float = 2e-5
    r1: float = 10.0
    d_reg_every: int = 16
    progressive_start: int = 20_000
    progressive_step_every: int = 2_000
    w_pool_size: int = 50
    delta_norm: int = 2
    loss_size: int = 256  # e4e's face_pool: the output is pooled to this before the losses


def progressive_steps(start: int, every: int, n_styles: int) -> list[int]:
    """e4e's ``setup_progressive_steps``: step ``steps[i]`` starts delta ``i``."""
    return [0] + [start + k * every for k in range(n_styles - 1)]


def progressive_stage(step: int, settings: E4ESettings, n_styles: int) -> int:
    """The number of deltas trained at (0-based) ``step``: the last ``i`` with
    ``steps[i] ≤ step`` — what e4e's stage is after its updates at each step."""
    steps = progressive_steps(settings.progressive_start, settings.progressive_step_every,
                              n_styles)
    return max(i for i, s in enumerate(steps) if s <= step)


class WPool:
    """e4e's ``LatentCodesPool``: up to ``size`` codes; while filling it returns (and keeps)
    what it is given, then for each code, with probability 1/2, returns a stored one and keeps
    the new one in its place.  A ``(N, k, D)`` query first picks a random index of the ``k``
    for each sample.  Draws come from the ``random.Random`` the caller passes (seeded from
    ``(seed, step)``), made in e4e's order, so the same seed reproduces e4e's choices."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.codes: list[torch.Tensor] = []

    def query(self, ws: torch.Tensor, rng: random.Random) -> torch.Tensor:
        if self.size == 0:
            return ws
        out = []
        for w in ws:
            if w.ndim == 2:
                w = w[rng.randint(0, len(w) - 1)]
            if len(self.codes) < self.size:
                self.codes.append(w)
                out.append(w)
            elif rng.uniform(0, 1) > 0.5:
                j = rng.randint(0, self.size - 1)
                out.append(self.codes[j].clone())
                self.codes[j] = w
            else:
                out.append(w)
        return torch.stack(out, 0)

    def state_dict(self) -> dict[str, Any]:
        codes = torch.stack(self.codes).cpu() if self.codes else torch.empty(0)
        return {"size": self.size, "codes": codes}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.size = int(state["size"])
        self.codes = [c.to(device) for c in state["codes"]] if len(state["codes"]) else []


def rank_rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rows of the global batch this rank holds (``rank::world_size``)."""
    return t[rank::world_size] if world_size > 1 else t


def global_rows(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """The inverse of :func:`rank_rows`: every rank's rows gathered into the global batch's
    order (global row ``i`` is row ``i // N`` of rank ``i % N``).  Collective under DDP."""
    if world_size <= 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)


def real_z(seed: int, step: int, global_batch: int, style_dim: int = 512) -> torch.Tensor:
    """The discriminator's z of ``step`` for the whole global batch (CPU)."""
    g = torch.Generator().manual_seed(derive_seed("e4e_real_z", seed, step))
    return torch.randn((global_batch, style_dim), generator=g)


def step_noise(decoder: Any, seed: int, step: int, global_batch: int) -> list[torch.Tensor]:
    """The generator's fresh noise of ``step`` (e4e decodes with ``randomize_noise=True``)."""
    g = torch.Generator().manual_seed(derive_seed("e4e_noise", seed, step))
    return decoder.noise_maps(global_batch, g)


def _value(t: torch.Tensor) -> float:
    return float(t.detach().reshape(()))


@dataclass
class E4ECriteria:
    """The frozen loss networks: ``identity`` an :class:`~clipinvert.losses.IdentityLoss`
    (its ``with_improvement`` gives ``id_improve``), ``lpips`` LPIPS-alex."""

    identity: Any
    lpips: ImageLoss


@dataclass
class E4EParts:
    """Everything one step touches.  ``encoder``/``discriminator`` may be DDP-wrapped (only
    their forward is called); ``decoder`` and ``latent_avg`` are frozen."""

    encoder: torch.nn.Module
    decoder: Any
    latent_avg: torch.Tensor  # (n_styles, style_dim)
    discriminator: torch.nn.Module
    optimizer: torch.optim.Optimizer  # Ranger over the encoder
    d_optimizer: torch.optim.Optimizer  # Adam over the discriminator
    real_pool: WPool
    fake_pool: WPool


def _requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _codes(parts: E4EParts, x: torch.Tensor, stage: int) -> torch.Tensor:
    codes = parts.encoder(x, stage=stage)
    return codes + parts.latent_avg.to(codes).unsqueeze(0)


@torch.no_grad()
def real_and_fake(parts: E4EParts, x: torch.Tensor, *, step: int, seed: int, stage: int,
                  rank: int = 0, world_size: int = 1, pool: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """e4e's ``sample_real_and_fake_latents``: mapped z of ``(seed, step)`` and the encoder's
    codes (one per sample), through the w-pools when ``pool`` (training; validation leaves
    them alone, so how often it runs never changes what training draws)."""
    global_batch = x.shape[0] * world_size
    z = rank_rows(real_z(seed, step, global_batch, parts.latent_avg.shape[-1]), rank,
                  world_size).to(x.device)
    real_w = parts.decoder.mapping(z)
    fake_w = _codes(parts, x, stage)[:, : stage + 1, :]
    if pool:
        # One pool for the global batch, the same in every process: the codes of all ranks
        # are gathered in the sampler's order, queried with the draws of ``(seed, step)``,
        # and each rank keeps its rows (as one process of the global batch would).
        rng = random.Random(derive_seed("e4e_w_pool", seed, step, 0))
        real_w = rank_rows(parts.real_pool.query(global_rows(real_w, world_size), rng), rank,
                           world_size)
        fake_w = rank_rows(parts.fake_pool.query(global_rows(fake_w, world_size), rng), rank,
                           world_size)
    if fake_w.ndim == 3:
        fake_w = fake_w[:, 0, :]
    return real_w, fake_w


def discriminator_step(parts: E4EParts, x: torch.Tensor, *, step: int, seed: int,
                       settings: E4ESettings, stage: int, rank: int = 0,
                       world_size: int = 1) -> dict[str, float]:
    """e4e's ``train_discriminator``: the logistic step, then R1 when ``step % d_reg_every
    == 0``.  ``step`` is 0-based (e4e's ``global_step``)."""
    logs: dict[str, float] = {}
    disc = parts.discriminator
    _requires_grad(disc, True)
    real_w, fake_w = real_and_fake(parts, x, step=step, seed=seed, stage=stage, rank=rank,
                                   world_size=world_size,
                                   pool=settings.w_pool_size > 0)
    real_loss, fake_loss = discriminator_logistic(disc(real_w), disc(fake_w))
    loss = real_loss + fake_loss
    logs["d_real_loss"], logs["d_fake_loss"] = _value(real_loss), _value(fake_loss)
    logs["discriminator_loss"] = _value(loss)
    parts.d_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.d_optimizer.step()

    if step % settings.d_reg_every == 0:
        real_w = real_w.detach().requires_grad_(True)
        real_pred = disc(real_w)
        r1 = r1_penalty(real_pred, real_w)
        parts.d_optimizer.zero_grad(set_to_none=True)
        # + 0·D(real)[0]: every parameter is in the graph (DDP's reducer expects all of them)
        r1_final = settings.r1 / 2 * r1 * settings.d_reg_every + 0 * real_pred[0]
        r1_final.backward()
        parts.d_optimizer.step()
        logs["discriminator_r1_loss"] = _value(r1_final)
    _requires_grad(disc, False)
    return logs


def encoder_loss(parts: E4EParts, x: torch.Tensor, *, step: int, seed: int,
                 settings: E4ESettings, criteria: E4ECriteria, stage: int, rank: int = 0,
                 world_size: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """e4e's ``forward`` + ``calc_loss``: the encoder's loss (call ``.backward()``) and its
    logged terms, summed in e4e's order."""
    w = settings.weights
    codes = _codes(parts, x, stage)
    noise = [rank_rows(n, rank, world_size).to(x) for n in
             step_noise(parts.decoder, seed, step, x.shape[0] * world_size)]
    size = settings.loss_size
    y_hat = F.adaptive_avg_pool2d(parts.decoder(codes, noise=noise), (size, size))
    logs: dict[str, float] = {}
    loss = x.new_zeros(())
    if w.adv > 0:
        # The plain discriminator (frozen here): through a DDP wrapper this forward would ready
        # its reducer for a backward that never reaches the discriminator's parameters.
        disc = getattr(parts.discriminator, "module", parts.discriminator)
        adv = encoder_adversarial(disc, codes, range(stage + 1))
        logs["encoder_discriminator_loss"] = _value(adv)
        loss = loss + w.adv * adv
    if w.delta > 0:  # e4e regularises whenever progressive training is on (ours always is)
        total, terms = delta_regularization(codes, stage, settings.delta_norm)
        for i, t in enumerate(terms, start=1):
            logs[f"delta{i}_loss"] = _value(t)
        logs["total_delta_loss"] = _value(total)
        loss = loss + w.delta * total
    if w.id > 0:
        loss_id, improve = criteria.identity.with_improvement(y_hat, x)
        logs["loss_id"], logs["id_improve"] = _value(loss_id), improve
        loss = loss + loss_id * w.id
    if w.l2 > 0:
        loss_l2 = F.mse_loss(y_hat, x)
        logs["loss_l2"] = _value(loss_l2)
        loss = loss + loss_l2 * w.l2
    if w.lpips > 0:
        loss_lpips = criteria.lpips(y_hat, x)
        logs["loss_lpips"] = _value(loss_lpips)
        loss = loss + loss_lpips * w.lpips
    logs["loss"] = _value(loss)
    return loss, logs


def e4e_step(parts: E4EParts, x: torch.Tensor, *, step: int, seed: int,
             settings: E4ESettings, criteria: E4ECriteria, stage: int, rank: int = 0,
             world_size: int = 1) -> dict[str, float]:
    """The whole step (discriminator, R1, encoder); returns every logged term."""
    common = {"step": step, "seed": seed, "settings": settings, "stage": stage, "rank": rank,
              "world_size": world_size}
    logs = discriminator_step(parts, x, **common) if settings.weights.adv > 0 else {}
    loss, enc_logs = encoder_loss(parts, x, criteria=criteria, **common)
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"the e4e loss is {float(loss.detach())} at step {step + 1}")
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    return {**logs, **enc_logs}


def ensure_groups(optimizer: torch.optim.Optimizer, groups: Sequence[Sequence[torch.nn.Parameter]],
                  stage: int) -> None:
    """Add the progressive groups ``1..stage`` the optimizer does not hold yet (each starts
    its own step count: e4e's Ranger counts per parameter)."""
    for i in range(len(optimizer.param_groups), min(stage, len(groups) - 1) + 1):
        optimizer.add_param_group({"params": list(groups[i])})
