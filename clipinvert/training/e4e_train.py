"""``clipinvert train --stage e4e``: e4e's encoder training as a stage of the training loop.

:func:`build_e4e` assembles what the stage trains from the registry — only the roles it uses:
``stylegan2`` (the frozen decoder and ``latent_avg``), ``lpips``, the identity network
(``arcface`` or ``moco``) and, without ``--init``, ``encoder_init`` (the IR-SE50 body the
encoder starts from); no CLIP, no captions.  :class:`E4ETrainer` is the loop's hooks around
:func:`~clipinvert.training.e4e_step.e4e_step`: the sampler, validation, metrics, grids and
``resume.pt`` bookkeeping are :class:`~clipinvert.training.loop.Loop`'s, as in stages 1–2.

Distributed (docs/training-ddp.md#e4e-stage): DDP wraps the encoder (``find_unused_parameters``:
the heads of later progressive stages are not called yet) and the discriminator (its logistic and
R1 gradients averaged across ranks); the frozen decoder and loss networks are not wrapped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ..losses.e4e import discriminator_logistic
from ..nets import Encoder4Editing, Generator, LatentDiscriminator
from ..nets.batchnorm import synchronise_batchnorm
from ..registry import Domain, Registry
from .build import _own, _seeded, build_datasets, check_init, locate_training_files
from .checkpoint import e4e_checkpoint, e4e_opts, save_e4e
from .config import TrainConfig
from .data import derive_seed
from .e4e_step import (
    E4ECriteria,
    E4EParts,
    WPool,
    e4e_step,
    encoder_loss,
    ensure_groups,
    progressive_stage,
    real_and_fake,
)
from .loop import Loop
from .optim import make_optimizer


def e4e_roles(cfg: TrainConfig) -> list[str]:
    """The registry roles the e4e stage reads: with ``--init`` the encoder, decoder and
    ``latent_avg`` come from that file, so neither ``stylegan2`` nor ``encoder_init`` is read."""
    assert cfg.e4e is not None
    roles = ["lpips", cfg.e4e.identity]
    return roles if cfg.init else ["stylegan2", *roles, "encoder_init"]


@dataclass
class E4EModel:
    """The networks of the e4e stage: the trained encoder and discriminator, the frozen
    decoder and ``latent_avg`` (``(n_styles, style_dim)``)."""

    encoder: Encoder4Editing
    decoder: Generator
    latent_avg: torch.Tensor
    discriminator: LatentDiscriminator

    def to(self, device: torch.device) -> E4EModel:
        return E4EModel(self.encoder.to(device), self.decoder.to(device),
                        self.latent_avg.to(device), self.discriminator.to(device))


@dataclass
class E4EBuilt:
    model: E4EModel
    criteria: E4ECriteria
    train_set: Any
    val_set: Any
    files: dict[str, Path]


def initial_encoder(body_file: Path, decoder: Generator, seed: int, *,
                    trust: bool = False) -> Encoder4Editing:
    """e4e's start without a checkpoint: an encoder of the decoder's style count and width
    whose input layer and body are the ``encoder_init`` IR-SE50's (loaded ``strict=False`` as
    e4e loads ``ir_se50``: its output layer is left out), heads and lateral layers random
    (from ``seed``)."""
    from ..checkpoints import load_arcface

    body = load_arcface(body_file, trust=trust)
    with _seeded(seed):
        encoder = Encoder4Editing(n_styles=decoder.n_latent, style_dim=decoder.style_dim,
                                  stages=body.stages)
    result = encoder.load_state_dict(body.state_dict(), strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith("output_layer.")]
    missing = [k for k in result.missing_keys if not k.startswith(("styles.", "latlayer"))]
    if unexpected or missing:
        raise WeightsError(f"encoder_init {body_file} is not an IR-SE body the e4e encoder "
                           f"can start from (keys {(unexpected + missing)[:3]} do not fit)")
    return encoder


def build_e4e_model(files: dict[str, Path], cfg: TrainConfig, *,
                    trust: bool = False) -> E4EModel:
    """From ``--init`` (an e4e checkpoint: encoder, decoder, ``latent_avg`` and the
    discriminator when it holds one), else from the domain's generator and ``encoder_init``.

    ``latent_avg`` without ``--init`` is the generator file's (rosinality files carry it), else
    the mean of 10,000 mapped z — what e4e's ``pSp.__load_latent_avg`` computes then."""
    from ..checkpoints import build_generator, load_e4e, load_stylegan2

    seed = derive_seed("e4e_init", cfg.seed)
    disc_sd = None
    if cfg.init:
        init = load_e4e(cfg.init, trust=trust)
        if not init.decoder_sd:
            raise WeightsError(f"--init {cfg.init}: an e4e checkpoint holds its decoder "
                               "(decoder.* keys); this one has none")
        decoder = build_generator(init.decoder_sd, "e4e decoder", Path(cfg.init))
        # load_e4e hands out a frozen inference encoder: trainable again here
        encoder: Encoder4Editing = _own(init.encoder).requires_grad_(True)  # type: ignore
        latent_avg = init.latent_avg
        disc_sd = _discriminator_state(Path(cfg.init), trust)
    else:
        decoder, avg = load_stylegan2(files["stylegan2"], trust=trust)
        encoder = initial_encoder(files["encoder_init"], decoder, seed, trust=trust)
        latent_avg = avg.reshape(1, -1).repeat(decoder.n_latent, 1)
    if (encoder.n_styles, encoder.style_dim) != (decoder.n_latent, decoder.style_dim):
        raise WeightsError(f"the encoder gives {encoder.n_styles}×{encoder.style_dim} codes, "
                           f"the decoder takes {decoder.n_latent}×{decoder.style_dim}")
    with _seeded(seed + 1):
        disc = LatentDiscriminator(decoder.style_dim)
    if disc_sd is not None:
        try:
            disc.load_state_dict(disc_sd)
        except RuntimeError as exc:
            raise WeightsError(f"--init {cfg.init}: its discriminator does not fit the "
                               f"decoder's {decoder.style_dim}-d codes ({exc})") from None
    decoder = _own(decoder).eval().requires_grad_(False)  # type: ignore[assignment]
    return E4EModel(encoder.train(), decoder, latent_avg.float().clone(), disc)


def _discriminator_state(path: Path, trust: bool) -> dict[str, torch.Tensor] | None:
    """The ``discriminator_state_dict`` of an e4e checkpoint, when it holds one."""
    from ..checkpoints import read_checkpoint

    sd = read_checkpoint(path, "e4e", trust=trust).get("discriminator_state_dict")
    return dict(sd) if isinstance(sd, dict) and sd else None


def build_e4e(cfg: TrainConfig, registry: Registry, device: torch.device, *,
              warn: Callable[[str], None] = print, trust: bool = False) -> E4EBuilt:
    """Everything :class:`E4ETrainer` receives, from the registry (missing roles: one line)."""
    from ..losses import IdentityLoss, LPIPSLoss

    assert cfg.e4e is not None
    domain: Domain = registry.domain(cfg.domain)
    files = locate_training_files(registry, domain, e4e_roles(cfg))
    check_init(cfg)
    train_set, val_set = build_datasets(cfg, domain, warn=warn, images_only=True)
    model = build_e4e_model(files, cfg, trust=trust).to(device)
    role = cfg.e4e.identity
    criteria = E4ECriteria(identity=IdentityLoss.from_file(role, files[role], trust=trust)
                           .to(device),
                           lpips=LPIPSLoss.from_file(files["lpips"], trust=trust).to(device))
    return E4EBuilt(model, criteria, train_set, val_set, files)


class E4ETrainer(Loop):
    """The e4e stage over the shared loop: one :func:`e4e_step` per batch."""

    min_batch = 1  # no caption to roll across the batch
    grid_labels = ("input", "reconstruction")

    def __init__(self, cfg: TrainConfig, model: E4EModel, criteria: E4ECriteria,
                 train_set: Any, val_set: Any | None, *, device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__(cfg, train_set, val_set, device=device, log=log, rank=rank,
                         world_size=world_size)
        assert cfg.e4e is not None
        self.model, self.criteria = model, criteria
        self.settings = cfg.e4e.settings(cfg.weights)
        self.groups = model.encoder.progressive_groups()
        self.parts = E4EParts(
            encoder=model.encoder, decoder=model.decoder, latent_avg=model.latent_avg,
            discriminator=model.discriminator,
            optimizer=make_optimizer(self.groups[0], cfg.lr),
            d_optimizer=torch.optim.Adam(list(model.discriminator.parameters()),
                                         lr=self.settings.d_lr),
            real_pool=WPool(self.settings.w_pool_size),
            fake_pool=WPool(self.settings.w_pool_size))
        self._ddp: E4EParts | None = None
        if world_size > 1:
            # The encoder's BatchNorm normalises over the global batch, as one process of it.
            synchronise_batchnorm(model.encoder)
            ids = [self.device.index if self.device.index is not None
                   else torch.cuda.current_device()] if self.device.type == "cuda" else None
            ddp = torch.nn.parallel.DistributedDataParallel
            self._ddp = dataclasses.replace(
                self.parts,
                encoder=ddp(model.encoder, device_ids=ids, find_unused_parameters=True),
                discriminator=ddp(model.discriminator, device_ids=ids))

    def stage(self, step: int | None = None) -> int:
        """The progressive stage of (0-based) ``step``, default the one about to run."""
        step = self.step if step is None else step
        return progressive_stage(step, self.settings, self.model.encoder.n_styles)

    def trained_stage(self) -> int:
        """The stage of the last step trained: what validation and grids look at (e4e
        validates before its step count moves on)."""
        return self.stage(max(self.step - 1, 0))

    # ---- the loop's hooks ----------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        x = batch["image"].to(self.device)
        stage = self.stage()
        ensure_groups(self.parts.optimizer, self.groups, stage)
        return e4e_step(self._ddp or self.parts, x, step=self.step, seed=self.cfg.seed,
                        settings=self.settings, criteria=self.criteria, stage=stage,
                        rank=self.rank, world_size=self.world_size)

    def val_step(self, index: int, batch: dict[str, Any]) -> dict[str, float] | None:
        """e4e's ``validate``: the discriminator's losses (w-pools left alone) and the
        encoder's terms, at fixed randomness per batch (steps −1, −2, …)."""
        x = batch["image"].to(self.device)
        common = {"step": -1 - index, "seed": self.cfg.seed, "stage": self.trained_stage()}
        logs: dict[str, float] = {}
        if self.settings.weights.adv > 0:
            real_w, fake_w = real_and_fake(self.parts, x, pool=False, **common)
            disc = self.parts.discriminator
            real, fake = discriminator_logistic(disc(real_w), disc(fake_w))
            logs = {"d_real_loss": float(real), "d_fake_loss": float(fake),
                    "discriminator_loss": float(real + fake)}
        _, enc_logs = encoder_loss(self.parts, x, settings=self.settings,
                                   criteria=self.criteria, **common)
        return {**logs, **enc_logs}

    def grid_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """input | reconstruction (the decoder's own noise, so grids compare across steps)."""
        x = batch["image"].to(self.device)
        codes = self.model.encoder(x, stage=self.trained_stage()) + \
            self.model.latent_avg.unsqueeze(0)
        size = self.settings.loss_size
        y = nn.functional.adaptive_avg_pool2d(self.model.decoder(codes), (size, size))
        return [x, y]

    def set_training(self, mode: bool) -> None:
        self.model.encoder.train(mode)

    def save_checkpoint(self, path: Path) -> None:
        """e4e's layout (``save_e4e``): ``load_e4e`` and e4e's own ``setup_model`` read it."""
        assert self.cfg.e4e is not None
        opts = e4e_opts(stylegan_size=self.model.decoder.size, settings=self.settings,
                        lr=self.cfg.lr, batch_size=self.cfg.batch_size,
                        max_steps=self.cfg.max_steps, identity=self.cfg.e4e.identity,
                        domain=self.cfg.domain)
        m = self.model
        save_e4e(path, e4e_checkpoint(m.encoder, m.decoder, m.latent_avg, m.discriminator, opts))

    def trained_state(self) -> dict[str, Any]:
        """Encoder, Ranger (its per-head groups), discriminator, Adam and both w-pools."""
        def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}

        p = self.parts
        return {"encoder": cpu(self.model.encoder.state_dict()),
                "optimizer": p.optimizer.state_dict(),
                "discriminator": cpu(self.model.discriminator.state_dict()),
                "d_optimizer": p.d_optimizer.state_dict(),
                "real_pool": p.real_pool.state_dict(), "fake_pool": p.fake_pool.state_dict()}

    def load_trained_state(self, state: dict[str, Any]) -> None:
        p = self.parts
        self.model.encoder.load_state_dict(state["encoder"])
        self.model.discriminator.load_state_dict(state["discriminator"])
        # the heads the saved run had reached are groups of its Ranger: add them first
        ensure_groups(p.optimizer, self.groups, len(state["optimizer"]["param_groups"]) - 1)
        p.optimizer.load_state_dict(state["optimizer"])
        p.d_optimizer.load_state_dict(state["d_optimizer"])
        p.real_pool.load_state_dict(state["real_pool"], self.device)
        p.fake_pool.load_state_dict(state["fake_pool"], self.device)
