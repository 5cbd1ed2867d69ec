"""The paper's method as one differentiable module: :class:`CLIPInverter`.

Nothing here knows about files, devices or PIL: loading lives in :mod:`.checkpoints` /
:mod:`.pipeline`, and both inference (:class:`~clipinvert.pipeline.Editor`, which wraps this
module in ``no_grad``) and training call the same ``forward``.  The composition, exactly as the
released weights expect it (docs/forward-pass.md):

1. ``c1, c2, c3 = E.body(x)`` — the e4e IR-SE body runs once per image;
2. ``w = E.heads(c1, c2, c3) + latent_avg`` — the inversion;
3. ``Δ = E.heads(A(c1, c2, c3; t))`` — the CLIPAdapter modulates the feature maps with the raw
   CLIP embedding ``t`` and e4e's own FPN + style heads turn them into a residual (no
   ``latent_avg``);
4. ``ŵ = w + 0.1·s·Δ`` (``s`` the strength, 1 as trained);
5. the CLIPRemapper blends ``t`` into the conv latents: ``(1−λ_j)·ŵ_j + λ_j·mlp_j(t)`` with
   ``λ_j = 0.9·lambdas[j]·s``;
6. ``G.synthesis`` decodes with the stored noise buffers.

Training freezes what the paper freezes (:meth:`CLIPInverter.set_stage`): stage 1 trains the
adapter only, stage 2 the remapper's ``affine_mlps`` and ``lambdas`` only; e4e stays in eval mode
and the generator is never updated, though gradients flow *through* it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .nets import CLIPAdapter, Encoder4Editing, Generator

RESIDUAL_SCALE = 0.1  # the released edit code: w_hat = w + 0.1·Δ

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Encoded:
    """An encoded batch: inversion latents and the IR-SE feature maps an edit needs."""

    w: torch.Tensor  # (B, n_latent, style_dim), latent_avg included
    features: Features  # c1, c2, c3

    def __len__(self) -> int:
        return self.w.shape[0]


@dataclass
class EditOutput:
    """What one pass of the method produces: the image and every latent a loss may need."""

    images: torch.Tensor  # (B, 3, S, S), ≈[-1, 1], not clamped
    w: torch.Tensor  # the inversion (latent_avg included)
    delta: torch.Tensor | None  # Δ, the adapter's residual (None for a plain inversion)
    w_hat: torch.Tensor  # w + 0.1·s·Δ, what the generator receives
    remapped: torch.Tensor | None  # conv latents after the CLIPRemapper, if it ran


class CLIPInverter(nn.Module):
    """e4e + CLIPAdapter + StyleGAN2 (with CLIPRemapper) + ``latent_avg``, composed as the paper.

    ``adapter`` may be None (an inversion-only model); ``decoder`` without a remapper is a
    stage-1 model.  ``latent_avg`` is ``(style_dim,)`` or ``(n_latent, style_dim)``.
    """

    def __init__(self, encoder: Encoder4Editing, decoder: Generator, latent_avg: torch.Tensor,
                 adapter: CLIPAdapter | None = None) -> None:
        super().__init__()
        if (encoder.n_styles, encoder.style_dim) != (decoder.n_latent, decoder.style_dim):
            raise ValueError(f"encoder styles {encoder.n_styles}×{encoder.style_dim} do not fit "
                             f"the generator's W+ {decoder.n_latent}×{decoder.style_dim}")
        self.encoder = encoder
        self.adapter = adapter
        self.decoder = decoder
        self.register_buffer("latent_avg", latent_avg)

    # ---- the steps -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Encoded:
        """Images ``(B,3,256,256)`` in [-1,1] → the inversion and the features edits reuse."""
        feats = self.encoder.forward_features(x)
        return Encoded(self.encoder.forward_styles(*feats) + self.latent_avg, feats)

    def residual(self, features: Features, text: torch.Tensor) -> torch.Tensor:
        """Δ: the text-modulated features through e4e's FPN + style heads (no latent_avg)."""
        if self.adapter is None:
            raise RuntimeError("this model has no CLIPAdapter (inversion only)")
        assert text.ndim == 2 and text.shape[0] == features[0].shape[0], (
            f"expected one embedding per image, got {tuple(text.shape)} for "
            f"{features[0].shape[0]} images")
        return self.encoder.forward_styles(*self.adapter(*features, text))

    def decode(self, w_hat: torch.Tensor, text: torch.Tensor | None = None,
               strength: float = 1.0,
               remap: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generator output and the remapped conv latents (None without text or remapper)."""
        remapped = None
        if remap and text is not None and self.decoder.has_remapper:
            remapped = self.decoder.remap(w_hat, text, mix=strength)
        return self.decoder.synthesis(w_hat, remapped), remapped

    def edit_encoded(self, enc: Encoded, text: torch.Tensor, delta: torch.Tensor,
                     strength: float = 1.0, remap: bool = True) -> EditOutput:
        """Steps 4–6 for an already encoded batch and its residual (interpolation reuses Δ)."""
        if strength == 0:  # exactly the inversion, as the released code decodes it
            images, _ = self.decode(enc.w)
            return EditOutput(images, enc.w, delta, enc.w, None)
        w_hat = enc.w + (RESIDUAL_SCALE * strength) * delta
        images, remapped = self.decode(w_hat, text, strength, remap)
        return EditOutput(images, enc.w, delta, w_hat, remapped)

    def forward(self, x: torch.Tensor | Encoded, text: torch.Tensor | None = None,
                strength: float = 1.0, remap: bool = True) -> EditOutput:
        """The whole method on images ``x`` (or an :class:`Encoded` batch) and embeddings ``t``.

        Without ``text`` it is the e4e inversion decoded by the plain generator.  ``remap=False``
        skips the CLIPRemapper (stage 2 compares the outputs with and without it).
        """
        enc = x if isinstance(x, Encoded) else self.encode(x)
        if text is None:
            images, _ = self.decode(enc.w)
            return EditOutput(images, enc.w, None, enc.w, None)
        return self.edit_encoded(enc, text, self.residual(enc.features, text), strength, remap)

    # ---- training ------------------------------------------------------------------------
    def set_stage(self, stage: int) -> list[nn.Parameter]:
        """Freeze everything but what ``stage`` trains; return the trainable parameters.

        Stage 1: the adapter.  Stage 2: the remapper's ``affine_mlps`` and ``lambdas``.  The
        encoder is kept in eval mode (its BatchNorm statistics are part of the released model)
        and the generator has no trainable state besides the remapper.
        """
        self.requires_grad_(False)
        self.encoder.eval()
        if stage == 1:
            if self.adapter is None:
                raise ValueError("stage 1 trains the CLIPAdapter, and this model has none")
            modules: list[nn.Module] = [self.adapter]
        elif stage == 2:
            if not self.decoder.has_remapper:
                raise ValueError("stage 2 trains the CLIPRemapper, and this decoder has none")
            modules = [self.decoder.affine_mlps, self.decoder.lambdas]
        else:
            raise ValueError(f"stage must be 1 or 2, not {stage}")
        params = [p for m in modules for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def train(self, mode: bool = True) -> CLIPInverter:
        """Like ``nn.Module.train`` but the e4e encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self
