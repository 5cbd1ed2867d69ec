"""Assembling a run from the registry: the model to train, CLIP, the loss networks, the data.

Every file comes from the domain's registry roles (docs/training.md#weights): ``e4e``,
``stylegan2`` (the stage-1 decoder, ``g_ema``), ``clip``, ``lpips`` (the AlexNet trunk), and the
identity network — ArcFace when the domain names an ``arcface`` weight, else MoCo (``moco``).
All missing files are named in one line (exit 3) before anything is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, WeightsError
from ..model import CLIPInverter
from ..nets import CLIPAdapter, Generator
from ..registry import Domain, MissingWeights, Registry
from .config import TrainConfig
from .step import Criteria


def identity_role(domain: Domain) -> str:
    return "arcface" if "arcface" in domain.weights else "moco"


def training_roles(domain: Domain) -> list[str]:
    return ["e4e", "stylegan2", "clip", "lpips", identity_role(domain)]


def locate_training_files(registry: Registry, domain: Domain,
                          roles: list[str] | None = None) -> dict[str, Path]:
    """Every file training needs (``roles``, default stages 1–2's), or one exit-3 line naming
    all that are missing."""
    try:
        return registry.locate_all(domain, roles or training_roles(domain))
    except MissingWeights as exc:
        if {"e4e", "stylegan2"} & set(exc.roles) and domain.note:
            # The note (e.g. cats, birds: nothing released) is already in the message.
            raise WeightsError(f"domain {domain.name!r} cannot be trained yet: {exc}") from None
        raise


def _own(module: nn.Module) -> nn.Module:
    """Give a module its own writable tensors (loaders may hand out memory-mapped ones)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.clone()
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()
    return module


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise new layers from ``seed`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def with_remapper(plain: Generator, text_dim: int, seed: int) -> Generator:
    """The generator plus a freshly initialised CLIPRemapper (stage 2 starts from stage 1)."""
    cfg = dataclasses.replace(plain.config, text_dim=text_dim)
    with _seeded(seed):
        g = Generator(cfg)
    result = g.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k.startswith(("affine_mlps.", "lambdas.")) for k in result.missing_keys)
    return g


def build_model(files: dict[str, Path], cfg: TrainConfig, text_dim: int, *,
                trust: bool = False) -> CLIPInverter:
    """The model of stage ``cfg.stage`` with its trainable part initialised (docs/training.md)."""
    from ..checkpoints import load_clipinverter, load_e4e, load_stylegan2

    e4e = load_e4e(files["e4e"], trust=trust)
    init = load_clipinverter(cfg.init, trust=trust) if cfg.init else None
    if cfg.stage == 1:
        g_ema, _ = load_stylegan2(files["stylegan2"], trust=trust)
        decoder: Generator = g_ema
        if init is not None:
            adapter: CLIPAdapter = _own(init.adapter)  # type: ignore[assignment]
        else:
            with _seeded(cfg.seed):
                adapter = CLIPAdapter(text_dim=text_dim, widths=e4e.encoder.tap_widths)
    else:
        assert init is not None  # TrainConfig insists
        adapter = init.adapter
        decoder = init.decoder if init.decoder.has_remapper else \
            with_remapper(init.decoder, text_dim, cfg.seed)
        decoder = _own(decoder)  # type: ignore[assignment]
    if adapter.text_dim != text_dim:
        raise WeightsError(f"the adapter takes {adapter.text_dim}-d embeddings but CLIP gives "
                           f"{text_dim}-d")
    if adapter.widths != e4e.encoder.tap_widths:
        raise WeightsError(f"--init {cfg.init}: its adapter does not fit the domain's e4e "
                           f"encoder (feature widths {adapter.widths} vs "
                           f"{e4e.encoder.tap_widths})")
    try:
        return CLIPInverter(e4e.encoder, decoder, e4e.latent_avg, adapter)
    except ValueError as exc:
        raise WeightsError(f"the domain's files do not fit together: {exc}") from None


def build_criteria(files: dict[str, Path], domain: Domain, clip: Any, cfg: TrainConfig,
                   device: torch.device, *, trust: bool = False) -> Criteria:
    """The frozen loss networks: identity (ArcFace or MoCo), LPIPS, directional CLIP."""
    from ..losses import DirectionalCLIPLoss, IdentityLoss, LPIPSLoss

    role = identity_role(domain)
    identity = IdentityLoss.from_file(role, files[role], trust=trust).to(device)
    lpips = LPIPSLoss.from_file(files["lpips"], trust=trust).to(device)
    directional = DirectionalCLIPLoss(clip, preprocess=cfg.clip_preprocess)

    def direction(source: torch.Tensor, edited: torch.Tensor, t_source: torch.Tensor,
                  t_target: torch.Tensor) -> torch.Tensor:
        return directional(edited, source, t_target, t_source)

    return Criteria(identity=identity, lpips=lpips, directional=direction)


@dataclass
class Parts:
    model: CLIPInverter
    clip: Any
    criteria: Criteria
    train_set: Any
    val_set: Any
    files: dict[str, Path]


def check_init(cfg: TrainConfig) -> None:
    if cfg.init and not Path(cfg.init).is_file():
        raise UsageError(f"--init {cfg.init}: file not found")


def build_datasets(cfg: TrainConfig, domain: Domain, *, warn=print,
                   images_only: bool = False) -> tuple[Any, Any]:
    """``(train, validation)``: ``--val-data``, else a held-out ``--val-fraction`` of
    ``--data``; validation never flipped.  ``images_only``: captions neither read nor needed
    (the e4e stage)."""
    from .data import ImageCaptionDataset, split_validation

    # --captions, else the manifest `caption --register` named in the domain (the chain)
    captions = None if images_only else \
        cfg.captions or (str(domain.captions_path) if domain.captions else None)
    data = ImageCaptionDataset(cfg.data, cfg.data_format, seed=cfg.seed, flip=cfg.flip,
                               warn=warn, split=cfg.split, captions=captions,
                               resize=domain.resize, images_only=images_only)
    if cfg.val_data:
        val_set = ImageCaptionDataset(cfg.val_data, cfg.data_format, seed=cfg.seed,
                                      flip=False, warn=warn, min_samples=1,
                                      captions=captions, resize=domain.resize,
                                      images_only=images_only)
        return data, val_set
    train_set, val_set = split_validation(data, cfg.val_fraction, cfg.seed)
    val_set.flip = False
    return train_set, val_set


def build(cfg: TrainConfig, registry: Registry, device: torch.device, *,
          warn=print, trust: bool = False) -> Parts:
    """Everything a :class:`~clipinvert.training.loop.Trainer` receives, from the registry."""
    from ..clip_encoder import ClipEncoder

    domain = registry.domain(cfg.domain)
    files = locate_training_files(registry, domain)
    check_init(cfg)
    train_set, val_set = build_datasets(cfg, domain, warn=warn)
    clip = ClipEncoder(domain.clip_arch, files["clip"], device=device,
                       base_dir=domain.base_dir, trust=trust)
    model = build_model(files, cfg, clip.embed_dim, trust=trust).to(device)
    criteria = build_criteria(files, domain, clip, cfg, device, trust=trust)
    return Parts(model, clip, criteria, train_set, val_set, files)
