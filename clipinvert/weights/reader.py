"""The one way to read a weight file: :func:`read_weights`.

Every loader — e4e, CLIPInverter, StyleGAN2, CLIP, and those still to come — reads its file
through :func:`read_weights` and then only checks the *layout* it expects.  So every file gets
the same checks and the same one-line :class:`~clipinvert.errors.WeightsError` (exit 3) naming
it: not found, a folder, empty, an HTML quota page saved as ``.pt``, truncated or corrupt, not a
checkpoint, a pickle that wants to run code.  Safe by default (``torch.load(weights_only=True)``
with :data:`~clipinvert.weights.safety.SAFE_GLOBALS`; TorchScript archives read for their
tensors without running their code); ``trust=True`` (``--trust-checkpoint``) lifts that with a
warning line.  Fast: released files (>= 8 MiB) are served from a memory-mapped safetensors copy
after their first load (:mod:`.cache`).

A new loader is a few lines, e.g. the LPIPS AlexNet trunk and an ArcFace backbone::

    from clipinvert.errors import WeightsError
    from clipinvert.weights.reader import read_weights

    def load_alexnet_trunk(path, *, trust=False):  # alexnet-owt-7be5be79.pth: a state dict
        sd = read_weights(path, what="LPIPS AlexNet", trust=trust)
        trunk = {k: v for k, v in sd.items() if k.startswith("features.")}
        if not trunk:
            raise WeightsError(f"LPIPS AlexNet weights {path} hold no features.* keys")
        return trunk

    def load_arcface(path, *, trust=False):  # model_ir_se50.pth
        sd = read_weights(path, what="ArcFace", trust=trust)
        return build_module(Backbone, sd, "ArcFace", Path(path))  # clipinvert.checkpoints

MoCo (``{'state_dict': {'module.encoder_q.*'}, …}``) and pytorch-fid's Inception
(``pt_inception-2015-12-05-6726825d.pth``) are the same two lines: read, then pick the keys.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from .cache import cached_state
from .safety import CHECKPOINT, TORCHSCRIPT, check_format, load_checkpoint

__all__ = ["CHECKPOINT", "TORCHSCRIPT", "read_weights"]


def read_weights(path: Path | str, *, what: str, trust: bool = False,
                 formats: Collection[str] = (CHECKPOINT,), cache: bool = True) -> dict:
    """Read a weight file into a dict on the CPU, safely; every failure is one exit-3 line.

    ``what`` names the weights in messages (``"e4e"`` → "e4e weights file … is truncated …").
    ``formats``: :data:`CHECKPOINT` (``torch.save`` files, the default) and/or
    :data:`TORCHSCRIPT` (``torch.jit.save`` archives such as OpenAI's CLIP, which come back as a
    flat ``{name: tensor}`` state dict).  ``trust``: the user's ``--trust-checkpoint``; the
    pickle may then run code, a warning line says so, and the file is never converted to the
    cache.  ``cache=False`` skips the safetensors cache (the copy is otherwise written on the
    first load of a file >= 8 MiB and used from then on; ``$CLIPINVERT_NO_SAFETENSORS_CACHE=1``
    turns it off everywhere).  What comes back is what the file holds: checking its layout is
    the caller's job.
    """
    path = Path(path)

    def load(p: Path) -> dict:
        return load_checkpoint(p, trust=trust, what=what, formats=formats)

    if not cache:
        return load(path)
    check_format(path, what, formats)  # before a cache hit too: the same checks for every load
    return cached_state(path, trust=trust, what=what, loader=load)
