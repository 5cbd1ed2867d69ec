"""Random-weight checkpoints in the *released* file layouts, for tests and benchmarks.

The real weights cannot be fetched offline, so tests write small random models of the real
architectures in exactly the layouts users have on disk and read them back through the real
loaders (the way diffusers and open_clip test).  Everything is seeded: the same arguments always
write the same tensors.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..nets import CLIPAdapter, Encoder4Editing, Generator, GeneratorConfig, IRSEBackbone
from ..nets.irse import IR_SE50_STAGES, Stage, check_stages
from ..nets.stylegan2 import default_channels


@dataclass(frozen=True)
class EncoderSpec:
    """The widths of an e4e encoder: its IR-SE body ``((in, depth, units), ...)`` and FPN.

    The CLIPAdapter that goes with it modulates the taps, so its widths (fine, medium, coarse)
    are the depths of stages 2, 3 and 4 (:attr:`adapter_widths`).
    """

    stages: tuple[Stage, ...] = IR_SE50_STAGES
    fpn_width: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", check_stages(self.stages))

    @property
    def adapter_widths(self) -> tuple[int, int, int]:
        fine, medium, coarse = (depth for _, depth, _ in self.stages[1:])
        return fine, medium, coarse


# The released IR-SE50 (31 M parameters in the body; seconds per image on a CPU), and a quarter
# of its widths with one unit per stage (milliseconds): same keys per unit, same feature-map
# sizes (c1 64×64, c2 32×32, c3 16×16), so every code path runs.  Adapter widths 32/64/128:
# multiples of 32, as the adapter's GroupNorm needs.
RELEASED_ENCODER = EncoderSpec()
TINY_ENCODER = EncoderSpec(((16, 16, 1), (16, 32, 1), (32, 64, 1), (64, 128, 1)), 128)
ENCODERS = {"released": RELEASED_ENCODER, "tiny": TINY_ENCODER}


def encoder_spec(encoder: str | EncoderSpec) -> EncoderSpec:
    """``"released"``, ``"tiny"`` or an :class:`EncoderSpec` → the spec."""
    if isinstance(encoder, EncoderSpec):
        return encoder
    try:
        return ENCODERS[encoder]
    except KeyError:
        raise ValueError(f"unknown encoder {encoder!r}: use one of {sorted(ENCODERS)} or an "
                         "EncoderSpec") from None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Deterministic module initialisation without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_config(size: int = 32, style_dim: int = 64, max_channels: int = 32,
                text_dim: int | None = None) -> GeneratorConfig:
    """A narrow generator of the real architecture (rosinality layout, fewer channels)."""
    channels = {r: min(c, max_channels) for r, c in default_channels(size).items()}
    return GeneratorConfig(size=size, style_dim=style_dim, channels=channels, text_dim=text_dim)


def make_generator(config: GeneratorConfig, seed: int = 0) -> Generator:
    with seeded(seed):
        g = Generator(config)
        if g.has_remapper:
            # Released lambdas are trained away from their 0.05 init; vary them so a test
            # would notice a wrong index or a swapped blend.
            for j, lam in enumerate(g.lambdas):
                lam.data.fill_(0.05 + 0.4 * j / max(len(g.lambdas) - 1, 1))
        for m in g.modules():  # trained noise strengths are not zero; make the noise matter
            if m.__class__.__name__ == "NoiseInjection":
                m.weight.data.normal_(0, 0.1)
    return g.eval()


def _random_batchnorm_stats(module: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics so eval-mode normalisation is exercised."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(1000)


def make_encoder(n_styles: int, style_dim: int, seed: int = 1,
                 encoder: str | EncoderSpec = "released") -> Encoder4Editing:
    spec = encoder_spec(encoder)
    with seeded(seed):
        enc = Encoder4Editing(n_styles=n_styles, style_dim=style_dim, stages=spec.stages,
                              fpn_width=spec.fpn_width)
        _random_batchnorm_stats(enc)
    return enc.eval()


def make_adapter(text_dim: int = 512, seed: int = 2,
                 widths: tuple[int, int, int] = RELEASED_ENCODER.adapter_widths) -> CLIPAdapter:
    with seeded(seed):
        return CLIPAdapter(text_dim=text_dim, widths=widths).eval()


def make_arcface(tiny: bool = True, seed: int = 4) -> IRSEBackbone:
    """ArcFace IR-SE50 (``model_ir_se50.pth``'s sizes), or ``tiny``: the tiny encoder's stages
    and a 128-d embedding, still on 112×112 crops."""
    with seeded(seed):
        net = (IRSEBackbone(TINY_ENCODER.stages, 112, 128) if tiny
               else IRSEBackbone(IR_SE50_STAGES, 112, 512))
        _random_batchnorm_stats(net)
    return net.eval()


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def write_e4e(path: Path, config: GeneratorConfig, *, seed: int = 1,
              latent_avg: str = "full", drop_kernels: bool = False,
              encoder: str | EncoderSpec = "released") -> Path:
    """``{'state_dict': {encoder.*, decoder.*}, 'opts', 'latent_avg'}`` like e4e_ffhq_encode.pt.

    ``latent_avg`` "full" stores (n_latent, style_dim), "single" the (style_dim) variant.
    ``encoder``: the released IR-SE50 widths, ``"tiny"`` or an :class:`EncoderSpec`.
    """
    plain = GeneratorConfig(size=config.size, style_dim=config.style_dim, n_mlp=config.n_mlp,
                            channels=config.channels)
    g = make_generator(plain, seed=seed + 100)
    enc = make_encoder(plain.n_latent, plain.style_dim, seed=seed, encoder=encoder)
    with seeded(seed + 200):
        avg = g.mean_latent(1000)
    dec_sd = g.state_dict()
    if drop_kernels:
        dec_sd = {k: v for k, v in dec_sd.items() if not k.endswith("kernel")}
    ckpt = {
        "state_dict": {**_prefixed("encoder.", enc.state_dict()), **_prefixed("decoder.", dec_sd)},
        "opts": {"stylegan_size": config.size, "start_from_latent_avg": True,
                 "encoder_type": "Encoder4Editing"},
        "latent_avg": avg[None].repeat(plain.n_latent, 1) if latent_avg == "full" else avg,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_clipinverter(path: Path, config: GeneratorConfig, *, text_dim: int = 512,
                       seed: int = 3, remapper: bool = True, prefix: str = "adapter.",
                       encoder: str | EncoderSpec = "released") -> Path:
    """``{'state_dict': {adapter.*|mapper.*, decoder.*}, 'opts'}`` like pretrained_faces.pt.

    The decoder shares the e4e file's generator weights (same seed), as the released files do;
    the adapter's widths are those of the ``encoder`` it goes with (see :func:`write_e4e`).
    """
    cfg = GeneratorConfig(size=config.size, style_dim=config.style_dim, n_mlp=config.n_mlp,
                          channels=config.channels, text_dim=text_dim if remapper else None)
    g = make_generator(cfg, seed=1 + 100)
    if remapper:
        with seeded(seed + 50):
            for mlp in g.affine_mlps:
                for layer in mlp:
                    if isinstance(layer, torch.nn.Linear):
                        layer.reset_parameters()
    adapter = make_adapter(text_dim, seed=seed, widths=encoder_spec(encoder).adapter_widths)
    ckpt = {
        "state_dict": {**_prefixed(prefix, adapter.state_dict()),
                       **_prefixed("decoder.", g.state_dict())},
        "opts": {"stylegan_size": config.size, "clip_model": "ViT-B/32"},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_stylegan2(path: Path, config: GeneratorConfig, *, seed: int = 1,
                    training: bool = False) -> Path:
    """rosinality files: ``{'g_ema', 'latent_avg'}``, or a training checkpoint with ``args``."""
    g = make_generator(GeneratorConfig(size=config.size, style_dim=config.style_dim,
                                       n_mlp=config.n_mlp, channels=config.channels),
                       seed=seed + 100)
    sd = g.state_dict()
    if training:
        ckpt = {"g": sd, "d": {}, "g_ema": sd, "g_optim": {}, "d_optim": {},
                "args": argparse.Namespace(size=config.size, channel_multiplier=2),
                "ada_aug_p": 0.0}
    else:
        ckpt = {"g_ema": sd, "latent_avg": g.mean_latent(1000)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_arcface(path: Path, tiny: bool = True, *, seed: int = 4,
                  prefix: str = "") -> Path:
    """A random-weight ArcFace backbone as a plain state dict in ``model_ir_se50.pth``'s layout
    (``prefix="module."`` for a DataParallel-saved copy).  See :func:`make_arcface`."""
    sd = _prefixed(prefix, make_arcface(tiny, seed=seed).state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def write_domain(directory: Path, *, size: int = 32, style_dim: int = 64,
                 max_channels: int = 32, clip_format: str = "open_clip",
                 name: str = "tiny", align: str = "none",
                 encoder: str | EncoderSpec = "tiny", file_prefix: str = "",
                 toml_name: str = "models.toml") -> Path:
    """A complete tiny domain — CLIP, e4e, CLIPInverter files and a models.toml naming them by
    relative paths — ready for ``Editor(name, models=<returned path>)`` or ``--models``.

    ``encoder`` "tiny" (default) is a narrow IR-SE body (milliseconds per image); "released"
    has IR-SE50's widths (seconds per image) and the same tensors as before encoders were
    configurable.  ``file_prefix`` and ``toml_name`` let two domains share one folder (and its
    CLIP files): ``{file_prefix}e4e.pt``, ``{file_prefix}clipinverter.pt``, ``toml_name``.
    """
    from .clip import write_tiny_clip

    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(size, style_dim, max_channels)
    clip_cfg, clip_weights = write_tiny_clip(directory, fmt=clip_format)
    e4e = write_e4e(directory / f"{file_prefix}e4e.pt", cfg, encoder=encoder)
    ci = write_clipinverter(directory / f"{file_prefix}clipinverter.pt", cfg, encoder=encoder)
    toml = directory / toml_name
    toml.write_text(
        f"[domains.{name}]\n"
        f"resolution = {size}\n"
        f'align = "{align}"\n'
        f'clip_arch = "{clip_cfg.name}"\n'
        f'clip = "{clip_weights.name}"\n'
        f'e4e = "{e4e.name}"\n'
        f'clipinverter = "{ci.name}"\n', encoding="utf-8")
    return toml


def write_alexnet_trunk(path: Path, seed: int = 5, *, prefix: str = "") -> Path:
    """A random AlexNet trunk in torchvision's ``alexnet-owt-7be5be79.pth`` layout: the
    ``features.{0,3,6,8,10}.{weight,bias}`` tensors at the real shapes (PyTorch's default conv
    initialisation).  The 58 M-parameter ``classifier.*`` that the real file also holds is left
    out: LPIPS never reads it.  ``prefix="module."`` mimics a DataParallel-saved copy."""
    from ..checkpoints import ALEXNET_CONVS

    sd: dict[str, torch.Tensor] = {}
    with seeded(seed):
        for i, (cout, cin, k) in ALEXNET_CONVS.items():
            conv = torch.nn.Conv2d(cin, cout, k)
            sd[f"{prefix}features.{i}.weight"] = conv.weight.detach().clone()
            sd[f"{prefix}features.{i}.bias"] = conv.bias.detach().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def make_moco_encoder(tiny: bool = True, seed: int = 6) -> torch.nn.Module:
    """MoCo-v2's query encoder: torchvision's ResNet-50 with the MLP projection head
    ``fc = Linear(2048, 2048) → ReLU → Linear(2048, 128)``; ``tiny``: a BasicBlock ResNet with
    one block per stage (ResNet-18's layout with fewer blocks, 4.9 M parameters, 512-d
    features) and the same kind of head."""
    from torchvision.models.resnet import BasicBlock, ResNet, resnet50

    with seeded(seed):
        net = ResNet(BasicBlock, [1, 1, 1, 1]) if tiny else resnet50()
        dim = net.fc.in_features
        net.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(),
                                     torch.nn.Linear(dim, 128))
        _random_batchnorm_stats(net)
    return net.eval()


def write_moco(path: Path, tiny: bool = True, *, seed: int = 6, prefix: str = "module.",
               queue: int | None = None) -> Path:
    """A random MoCo-v2 checkpoint in ``moco_v2_800ep_pretrain.pth``'s layout:
    ``{'epoch', 'arch', 'state_dict': {module.encoder_q.*, module.encoder_k.*, module.queue,
    module.queue_ptr}, 'optimizer'}``.  ``encoder_k`` (the momentum encoder) holds slightly
    different values so a loader that read it instead of ``encoder_q`` would be caught.

    ``tiny`` (default): the small BasicBlock ResNet of :func:`make_moco_encoder` (a ~40 MB file,
    written in a fraction of a second); ``tiny=False``: a real ResNet-50 (~200 MB).  The queue
    holds ``queue`` keys (65536 in the released file; 64 by default here, 4096 when not tiny).
    """
    q = make_moco_encoder(tiny, seed=seed).state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    k = {name: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point()
                else v.clone()) for name, v in q.items()}
    n_queue = queue if queue is not None else (64 if tiny else 4096)
    keys = torch.nn.functional.normalize(torch.randn(128, n_queue, generator=gen), dim=0)
    sd = {**_prefixed(f"{prefix}encoder_q.", q), **_prefixed(f"{prefix}encoder_k.", k),
          f"{prefix}queue": keys, f"{prefix}queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 800, "arch": "resnet50", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [
                {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def make_inception(seed: int = 7) -> torch.nn.Module:
    """pytorch-fid's FID Inception (:class:`~clipinvert.nets.inception.FIDInceptionV3`) with
    random but well-scaled weights: He-normal convolutions and BatchNorm statistics near
    (0, 1), so the 2048 pool3 features of an image are of order one and differ between images
    (PyTorch's default init shrinks activations layer by layer towards zero over the ~100
    convolutions, which would make two networks trivially agree)."""
    from ..nets.inception import FIDInceptionV3

    with seeded(seed):
        net = FIDInceptionV3()
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        _random_batchnorm_stats(net)
    return net.eval()


def write_inception(path: Path, *, seed: int = 7, batches_tracked: bool = True) -> Path:
    """A random FID Inception as a plain state dict in pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` layout (torchvision ``Inception3`` names, 1008-class
    ``fc``, no ``AuxLogits``), ~96 MB.  ``batches_tracked=False`` leaves out the BatchNorm
    ``num_batches_tracked`` counters, as files written by PyTorch < 0.4.1 do."""
    sd = make_inception(seed).state_dict()
    if not batches_tracked:
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in sd.items()}, path)
    return path


def make_attribute_net(tiny: bool = True, seed: int = 8, *,
                       input_size: int | None = None) -> torch.nn.Module:
    """The CelebA attribute classifier (:class:`~clipinvert.nets.attributes.AttributeNet`,
    MobileNet-v1 with mish, 40 outputs) with random weights and BatchNorm statistics.  ``tiny``:
    an eighth of MobileNet's widths (thousands of parameters) at 32 px, milliseconds per batch;
    else the real 3.2 M-parameter network at 224 px."""
    from ..nets.attributes import INPUT_SIZE, AttributeNet, mobilenet_widths

    size = input_size or (32 if tiny else INPUT_SIZE)
    with seeded(seed):
        net = AttributeNet(mobilenet_widths(0.125 if tiny else 1.0), input_size=size)
        _random_batchnorm_stats(net)
    return net.eval()


def write_attribute_classifier(path: Path, tiny: bool = True, *, seed: int = 8,
                               input_size: int | None = None) -> Path:
    """A random attribute classifier in the file format ``clipinvert eval train-classifier``
    writes (docs/attribute-classifier.md), loadable by
    :func:`clipinvert.checkpoints.load_attribute_classifier` (registry role ``attributes``)."""
    from ..evaluation.classifier import save_attribute_classifier

    net = make_attribute_net(tiny, seed, input_size=input_size)
    save_attribute_classifier(path, net, training={"note": "random weights, for tests"})
    return path


# ---- the `clipinvert models demo` domain ----------------------------------------------------

#: Shown by ``models list`` next to every file of a demo domain (its models.toml ``label``).
DEMO_LABEL = "random weights — for trying the commands, not real edits"


def write_demo_files(directory: Path, *, size: int = 32) -> dict[str, str]:
    """Random-weight files for every registry role a small face domain uses, so that ``align``,
    ``invert``, ``edit``, ``interpolate``, ``train`` and ``eval metrics`` all run without the real
    weights (``clipinvert models demo``).  Every file is named ``random-*`` so no listing can
    pass it off as a real model.  Returns ``{role: file name}`` (plus ``clip_arch``: the tiny
    CLIP's config), names relative to ``directory``.

    The models are the tests' tiny ones (a 32 px generator, a narrow e4e encoder, a tiny CLIP,
    ArcFace, MobileNet and AlexNet trunks; seconds on a CPU); only the FID Inception has its
    real size (~96 MB), because its features must be 2048-d.
    """
    from .clip import write_tiny_clip

    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(size)
    arch, clip = write_tiny_clip(directory)
    files = {
        "clip_arch": arch.replace(directory / "random-clip.json"),
        "clip": clip.replace(directory / "random-clip.pt"),
        "e4e": write_e4e(directory / "random-e4e.pt", cfg, encoder="tiny"),
        "clipinverter": write_clipinverter(directory / "random-clipinverter.pt", cfg,
                                           encoder="tiny"),
        "stylegan2": write_stylegan2(directory / "random-stylegan2.pt", cfg, seed=1),
        "arcface": write_arcface(directory / "random-arcface.pt", tiny=True),
        "lpips": write_alexnet_trunk(directory / "random-alexnet.pt"),
        "inception": write_inception(directory / "random-inception.pt"),
        "attributes": write_attribute_classifier(directory / "random-attributes.pt", tiny=True),
    }
    return {role: path.name for role, path in files.items()}
