"""e4e's latent discriminator: an MLP that tells mapped W codes from the encoder's.

The layout is e4e's ``LatentCodesDiscriminator(512, 4)`` (``models/discriminator.py``): three
``Linear(512, 512)`` + ``LeakyReLU(0.2)`` and a ``Linear(512, 1)``, under ``mlp.{0,2,4,6}``, so
the ``discriminator_state_dict`` of an e4e training checkpoint loads strictly and ours loads in
e4e.  Initialised as ``nn.Linear`` initialises itself (PyTorch's default), as e4e's is.
"""

from __future__ import annotations

import torch
from torch import nn


class LatentDiscriminator(nn.Module):
    """``(N, style_dim)`` W codes → ``(N, 1)`` logits (real = mapped z)."""

    def __init__(self, style_dim: int = 512, n_mlp: int = 4) -> None:
        super().__init__()
        self.style_dim = style_dim
        layers: list[nn.Module] = []
        for _ in range(n_mlp - 1):
            layers += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(style_dim, 1))
        self.mlp = nn.Sequential(*layers)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> LatentDiscriminator:
        """The shape a saved ``discriminator_state_dict`` holds (weights not loaded)."""
        n = sum(1 for k in sd if k.startswith("mlp.") and k.endswith(".weight"))
        if n == 0 or "mlp.0.weight" not in sd:
            raise KeyError("not a latent discriminator state dict (no mlp.*.weight keys)")
        return cls(style_dim=int(sd["mlp.0.weight"].shape[1]), n_mlp=n)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(w)
