"""The released optimizer: Ranger (RAdam + Lookahead + gradient centralisation).

The released training scripts use the Ranger of the pSp/e4e code base: RAdam whose first steps
(while the variance estimate is not yet trustworthy, N_sma ≤ 5) are plain momentum-SGD steps,
gradients centralised (each multi-dimensional gradient minus its mean over all but the first
dimension), and Lookahead (every k = 6 steps the weights move to slow + α·(fast − slow), α = 0.5).
``pytorch-optimizer``'s :class:`Ranger` computes exactly that with ``degenerated_to_sgd=True``.
Its default ``False`` skips the update entirely on those first steps instead, which on this
model makes the loss *climb* for the first few hundred steps — so the flag is pinned here and a
test checks the result against the algorithm written out by hand (docs/training.md#optimizer).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

RANGER_SETTINGS = {"betas": (0.95, 0.999), "alpha": 0.5, "k": 6, "n_sma_threshold": 5,
                   "eps": 1e-5, "weight_decay": 0.0, "use_gc": True, "gc_conv_only": False,
                   "degenerated_to_sgd": True}


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Ranger with the released settings (only the learning rate is a flag)."""
    from pytorch_optimizer import Ranger

    return Ranger(list(params), lr=lr, foreach=False, **RANGER_SETTINGS)
