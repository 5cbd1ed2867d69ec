"""The directional CLIP loss of the released training code.

For an edited image ŷ of a source image x, and the raw CLIP text embeddings of the target
description (what ŷ should show) and of the source description (what x shows)::

    u(v)  = v / (‖v‖ + 1e-6)
    ΔI    = u( u(E_I(ŷ)) − u(E_I(x)) )
    ΔT    = u( u(t_target) − u(t_source) )
    loss  = 1 − ΔI · ΔT            per sample, then the batch mean

``E_I`` is CLIP's image tower on :class:`~clipinvert.losses.ClipImageInput` (the release's
×7-upsample-and-pool input, un-normalised, by default).  Which samples the loss applies to
(e.g. only those whose text does not describe the source) is the trainer's decision: use
``reduction="none"`` and mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .clip_input import ClipImageInput

if TYPE_CHECKING:
    from ..clip_encoder import ClipEncoder

EPS = 1e-6


def unit(v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``v / (‖v‖ + eps)`` along the last dimension (the release's normalisation)."""
    return v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")


class DirectionalCLIPLoss(nn.Module):
    """``1 − cos``-style agreement between the image edit direction and the text direction.

    ``clip``: a :class:`~clipinvert.clip_encoder.ClipEncoder` (frozen; kept as a plain
    attribute, so ``.to()`` on this loss does not move it and its weights are not in this
    module's ``state_dict``).  ``preprocess``: ``"release"`` (default, as trained) or
    ``"clip"`` (CLIP's own normalisation), see :class:`ClipImageInput`.
    """

    def __init__(self, clip: ClipEncoder, preprocess: str = "release") -> None:
        super().__init__()
        self.clip = clip
        self.input = ClipImageInput(preprocess, image_size=clip.image_size)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image embeddings (B, D) of images in [−1, 1], keeping the graph to them."""
        return self.clip.encode_image_tensor(self.input(images))

    def forward(self, edited: torch.Tensor, source: torch.Tensor, target_text: torch.Tensor,
                source_text: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """``edited`` ŷ and ``source`` x: (B, 3, H, W) in [−1, 1]; ``target_text`` /
        ``source_text``: raw ``encode_text`` embeddings, (B, D) or (D,) (broadcast).

        Returns a 0-dim tensor (batch mean), or (B,) with ``reduction="none"``.  Gradients
        reach both images (the source is usually data and needs none).
        """
        source = source.to(edited)
        if source.shape == edited.shape:  # one pass through the image tower
            both = self.image_embeddings(torch.cat([edited, source]))
        else:
            both = torch.cat([self.image_embeddings(edited), self.image_embeddings(source)])
        n = edited.shape[0]
        img_edit, img_src = unit(both[:n]), unit(both[n:])
        t_tgt = unit(target_text.to(both).reshape(-1, both.shape[1]))
        t_src = unit(source_text.to(both).reshape(-1, both.shape[1]))
        d_img = unit(img_edit - img_src)
        d_txt = unit(t_tgt - t_src)
        return reduce(1 - (d_img * d_txt).sum(dim=-1), reduction)
