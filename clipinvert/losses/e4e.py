"""The e4e encoder's own losses (docs/losses.md#e4e): the latent discriminator's logistic
loss and R1 penalty, the encoder's non-saturating adversarial term, and the delta
regularisation that keeps every W+ index close to ``w0``.

Each is written as e4e's ``training/coach.py`` computes it (same reductions, same order of
sums), so the logged values equal e4e's term by term (tests/test_e4e_stage.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def discriminator_logistic(real_pred: torch.Tensor,
                           fake_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean softplus(−D(real)), mean softplus(D(fake)))``: the non-saturating GAN loss of the
    discriminator, as its two logged halves (``d_real_loss``, ``d_fake_loss``)."""
    return F.softplus(-real_pred).mean(), F.softplus(fake_pred).mean()


def r1_penalty(real_pred: torch.Tensor, real_w: torch.Tensor) -> torch.Tensor:
    """``E‖∇_w D(w)‖²`` over the real codes, with the graph kept (it is backpropagated into
    the discriminator: a double backward)."""
    (grad,) = torch.autograd.grad(outputs=real_pred.sum(), inputs=real_w, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def encoder_adversarial(discriminator: Callable[[torch.Tensor], torch.Tensor],
                        codes: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """Mean over the discriminated W+ indices of ``mean softplus(−D(w_i))``: the encoder's
    codes should look like mapped z to the (frozen for this term) discriminator."""
    total = codes.new_zeros(())
    for i in indices:
        total = total + F.softplus(-discriminator(codes[:, i, :])).mean()
    return total / len(indices)


def delta_regularization(codes: torch.Tensor, stage: int,
                         p: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``Σ_{i=1..stage} mean‖w_i − w_0‖_p`` and its terms (``delta{i}_loss``): the deltas
    progressive training has switched on, kept small so the codes stay editable."""
    first = codes[:, 0, :]
    terms = [torch.norm(codes[:, i, :] - first, p, dim=1).mean() for i in range(1, stage + 1)]
    total = codes.new_zeros(())
    for t in terms:
        total = total + t
    return total, terms
