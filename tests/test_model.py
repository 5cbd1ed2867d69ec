"""CLIPInverter as a differentiable module: the stages train what the paper trains, gradients
flow through the frozen generator, and an autograd gradient matches a finite difference."""

from __future__ import annotations

import pytest
import torch

from clipinvert import Editor
from clipinvert.model import RESIDUAL_SCALE, CLIPInverter


@pytest.fixture
def model(tiny_files: dict) -> CLIPInverter:
    """A fresh model read from the tiny domain's files by the real loaders (tests change its
    requires_grad flags and dtype, so it is not shared)."""
    ed = Editor.from_files(e4e=tiny_files["e4e"], clipinverter=tiny_files["clipinverter"],
                           device="cpu")
    return ed.model


def _inputs(model: CLIPInverter, batch: int = 2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 256, 256, generator=g, dtype=dtype) * 2 - 1
    assert model.adapter is not None
    t = torch.randn(batch, model.adapter.text_dim, generator=g, dtype=dtype)
    return x, t


def _loss(model: CLIPInverter, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    w_norm = (out.w_hat - model.latent_avg).norm(dim=(1, 2)).mean()
    return out.images.square().mean() + 0.005 * w_norm


def _grads(model: CLIPInverter) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def test_forward_is_the_paper_composition(model: CLIPInverter) -> None:
    x, t = _inputs(model)
    with torch.no_grad():
        out = model(x, t, strength=0.7)
        enc = model.encode(x)
        delta = model.residual(enc.features, t)
        w_hat = enc.w + RESIDUAL_SCALE * 0.7 * delta
        remapped = model.decoder.remap(w_hat, t, mix=0.7)
        images = model.decoder.synthesis(w_hat, remapped)
        plain = model(x)
    torch.testing.assert_close(out.w, enc.w)
    torch.testing.assert_close(out.delta, delta)
    torch.testing.assert_close(out.w_hat, w_hat)
    torch.testing.assert_close(out.remapped, remapped)
    torch.testing.assert_close(out.images, images)
    assert out.images.shape == (2, 3, model.decoder.size, model.decoder.size)
    torch.testing.assert_close(plain.images, model.decoder(enc.w))
    assert plain.delta is None and plain.remapped is None


@pytest.mark.parametrize("stage, trained", [
    (1, ("adapter.",)),
    (2, ("decoder.affine_mlps.", "decoder.lambdas.")),
])
def test_stage_trains_only_its_part(model: CLIPInverter, stage: int,
                                    trained: tuple[str, ...]) -> None:
    params = model.set_stage(stage)
    model.train()
    assert not model.encoder.training  # e4e's BatchNorm statistics stay as released
    x, t = _inputs(model)
    _loss(model, x, t).backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(trained) for n in names)
    assert len(params) == len(names)
    for n, g in _grads(model).items():
        if n.startswith(trained):
            assert g is not None and torch.isfinite(g).all(), n
        else:
            assert g is None, f"{n} is frozen but received a gradient"
    assert any(float(g.abs().sum()) > 0 for n, g in _grads(model).items() if g is not None)


def test_generator_backpropagates(model: CLIPInverter) -> None:
    """The fast in-place epilogue must not break autograd through the frozen generator."""
    g = model.decoder
    w = torch.randn(2, g.n_latent, g.style_dim, requires_grad=True)
    g(w).square().mean().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    with torch.no_grad():  # and inference keeps the in-place path with the same numbers
        fast = g(w)
    torch.testing.assert_close(fast, g(w).detach())


def test_gradient_matches_finite_difference(model: CLIPInverter) -> None:
    model = model.double()
    model.set_stage(1)
    x, t = _inputs(model, dtype=torch.float64)
    # One scalar of the coarse adapter's γ head (it scales the deepest features).
    p = model.adapter.coarse_mapping.modulation_module_list[0].gamma_function[3].bias
    _loss(model, x, t).backward()
    analytic = float(p.grad[0])
    eps = 1e-6
    with torch.no_grad():
        p[0] += eps
        up = float(_loss(model, x, t))
        p[0] -= 2 * eps
        down = float(_loss(model, x, t))
        p[0] += eps
    numeric = (up - down) / (2 * eps)
    assert abs(analytic) > 1e-9
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-10)
