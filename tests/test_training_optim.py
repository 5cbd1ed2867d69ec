"""The optimizer equals Ranger as released, written out here from the algorithm's definition."""

from __future__ import annotations

import math

import torch

from clipinvert.training.optim import make_optimizer


class ReferenceRanger:
    """RAdam (momentum-SGD while N_sma ≤ 5) + gradient centralisation + Lookahead(k=6, α=0.5)."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.95, 0.999), eps=1e-5,
                 alpha=0.5, k=6, threshold=5) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.alpha, self.k, self.threshold = alpha, k, threshold
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.slow = [p.detach().clone() for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        n_max = 2 / (1 - b2) - 1
        b2t = b2**self.t
        n_sma = n_max - 2 * self.t * b2t / (1 - b2t)
        if n_sma >= self.threshold:
            size = math.sqrt((1 - b2t) * (n_sma - 4) / (n_max - 4) * (n_sma - 2) / n_sma
                             * n_max / (n_max - 2)) / (1 - b1**self.t)
        else:
            size = 1 / (1 - b1**self.t)
        for i, p in enumerate(self.params):
            g = p.grad.clone()
            if g.dim() > 1:
                g -= g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            self.m[i].mul_(b1).add_(g, alpha=1 - b1)
            if n_sma >= self.threshold:
                p -= self.lr * size * self.m[i] / (self.v[i].sqrt() + self.eps)
            else:
                p -= self.lr * size * self.m[i]
            if self.t % self.k == 0:
                self.slow[i] += self.alpha * (p - self.slow[i])
                p.copy_(self.slow[i])


def _problem(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    return [w, b], x, y


def _loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w, b = params
    return (torch.nn.functional.conv2d(x, w, b) - y).square().mean()


def test_ranger_matches_the_algorithm_written_out() -> None:
    ours, x, y = _problem(0)
    ref, _, _ = _problem(0)
    opt = make_optimizer(ours, lr=5e-4)
    reference = ReferenceRanger(ref, lr=5e-4)
    losses = []
    for _ in range(20):  # ≥ 10 steps: the SGD-like first steps, RAdam after, 3 Lookahead syncs
        for params, step in ((ours, opt.step), (ref, reference.step)):
            for p in params:
                p.grad = None
            _loss(params, x, y).backward()
            step()
        with torch.no_grad():
            losses.append(float(_loss(ours, x, y)))
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert losses[-1] < losses[0]  # the first steps descend (the default setting climbs)
