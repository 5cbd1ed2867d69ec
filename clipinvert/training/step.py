"""One training step of the released recipe: the real pass, the cycle pass, their losses.

docs/training.md#step.  Per step ONE coin for the whole batch decides the target captions: with
probability ``1 − match_prob`` (3/4 as released) they are the batch's captions rolled by one
(mismatched), else the true ones; without a mismatch the directional CLIP term is skipped in both
passes.  The coin comes from ``(seed, step)`` alone, so every DDP rank and a resumed run draw the
same one.

* real pass: ``ŷ = pool256(G(w + 0.1·Δ(x, t_tgt)))`` against ``x``;
* cycle pass: ``ŷ`` detached (not clamped) is edited back with the true captions → ``y_rec``,
  the same terms against ``x``, with the directional term from ŷ to y_rec; its total × cycle.

Both passes' losses are summed: one backward, one optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import CLIPInverter, EditOutput
from .config import LossWeights

ImageLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) → scalar
# (source image, edited image, source text embedding, target text embedding) → scalar
DirectionalLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LOSS_SIZE = 256  # the release pools every output to 256 before its losses


@dataclass
class Criteria:
    """The loss networks (frozen); each returns a batch-mean scalar."""

    identity: ImageLoss
    lpips: ImageLoss
    directional: DirectionalLoss


def mismatch_coin(seed: int, step: int, match_prob: float) -> bool:
    """True when this step's target captions are the rolled (mismatched) ones."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return bool(torch.rand((), generator=g) >= match_prob)


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def pool(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images, (LOSS_SIZE, LOSS_SIZE))


def _terms(out: EditOutput, y: torch.Tensor, x: torch.Tensor, *, model: CLIPInverter,
           w: LossWeights, crit: Criteria, stage: int, mismatch: bool,
           src_img: torch.Tensor, t_src: torch.Tensor, t_tgt: torch.Tensor,
           plain: torch.Tensor | None, suffix: str) -> tuple[torch.Tensor, dict[str, float]]:
    """One pass's weighted loss against the input ``x`` and its logged terms."""
    logs: dict[str, float] = {}
    total = y.new_zeros(())
    if w.id > 0:
        loss_id = crit.identity(y, x)
        logs[f"loss_id_{suffix}"] = _value(loss_id)
        total = total + w.id * loss_id
    if w.l2 > 0:
        loss_l2 = F.mse_loss(y, x)
        if plain is not None:  # stage 2: stay close to the output without the remapper
            loss_l2 = loss_l2 + w.remap_ratio * F.mse_loss(y, plain)
        logs[f"loss_l2_{suffix}"] = _value(loss_l2)
        total = total + w.l2 * loss_l2
    if w.lpips > 0:
        loss_lpips = crit.lpips(y, x)
        if plain is not None:
            loss_lpips = loss_lpips + w.remap_ratio * crit.lpips(y, plain)
        logs[f"loss_lpips_{suffix}"] = _value(loss_lpips)
        total = total + w.lpips * loss_lpips
    if stage == 1 and w.w_norm > 0:
        avg = model.latent_avg.expand_as(out.w_hat[0])
        loss_w = (out.w_hat - avg).norm(2, dim=(1, 2)).mean()
        logs[f"loss_w_norm_{suffix}"] = _value(loss_w)
        total = total + w.w_norm * loss_w
    if mismatch and w.clip > 0:
        loss_dir = crit.directional(src_img, y, t_src, t_tgt)
        logs[f"loss_directional_{suffix}"] = _value(loss_dir)
        total = total + w.clip * loss_dir
    logs[f"loss_{suffix}"] = _value(total)
    return total, logs


def training_step(model: CLIPInverter, x: torch.Tensor, t_true: torch.Tensor, *,
                  mismatch: bool, weights: LossWeights, criteria: Criteria,
                  stage: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed loss of both passes (call ``.backward()`` on it) and the logged terms.

    ``x``: the batch ``(B,3,256,256)`` in [-1,1]; ``t_true``: the raw CLIP embeddings of its true
    captions ``(B, D)``.  ``model`` may be wrapped (DDP): only its ``forward`` is called, plus
    ``latent_avg`` read from the underlying module.
    """
    core: CLIPInverter = getattr(model, "module", model)
    t_tgt = t_true.roll(1, dims=0) if mismatch else t_true
    common = {"model": core, "w": weights, "crit": criteria, "stage": stage,
              "mismatch": mismatch}

    out = model(x, t_tgt)
    y_hat = pool(out.images)
    plain = None
    if stage == 2:
        with torch.no_grad():  # the same edit without the remapper, as a target
            plain = pool(core(x, t_tgt, remap=False).images)
    loss_real, logs = _terms(out, y_hat, x, src_img=x, t_src=t_true, t_tgt=t_tgt, plain=plain,
                             suffix="real", **common)

    y_in = y_hat.detach()  # re-encoded as it is: not clamped
    out_c = model(y_in, t_true)
    y_rec = pool(out_c.images)
    plain_c = None
    if stage == 2:
        with torch.no_grad():
            plain_c = pool(core(y_in, t_true, remap=False).images)
    loss_cycle, logs_c = _terms(out_c, y_rec, x, src_img=y_in, t_src=t_tgt, t_tgt=t_true,
                                plain=plain_c, suffix="cycle", **common)

    loss = loss_real + weights.cycle * loss_cycle
    logs.update(logs_c)
    logs["loss"] = _value(loss_real) + weights.cycle * _value(loss_cycle)
    return loss, logs
