"""Reading the released checkpoint files into the networks of :mod:`clipinvert.nets`.

Layouts accepted unchanged (docs/checkpoints.md: #stylegan2, #e4e, #clipinverter):

* e4e ``{'state_dict': {'encoder.*', 'decoder.*'}, 'opts', 'latent_avg': (n,512) | (512)}``
* CLIPInverter ``{'state_dict': {'adapter.*' | 'mapper.*', 'decoder.*' [+ remapper]}, 'opts'}``
* rosinality StyleGAN2 ``{'g_ema': …, 'latent_avg'?}`` (training checkpoints add ``g``, ``d``,
  optimisers and an ``argparse.Namespace``).

Every problem — missing, empty, truncated, an HTML page saved as ``.pt``, a pickle that wants to
run code, wrong keys or shapes — becomes one :class:`~clipinvert.errors.WeightsError` line that
names the file.  Nothing here ever falls back to random weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .errors import WeightsError
from .nets import CLIPAdapter, Encoder4Editing, Generator, IRSEBackbone
from .nets.stylegan2 import fir_buffer
from .weights.reader import read_weights

StateDict = dict[str, torch.Tensor]
T = TypeVar("T", bound=nn.Module)


def read_checkpoint(path: Path | str, what: str = "model", *, trust: bool = False) -> dict:
    """A ``torch.save`` checkpoint dict, through :func:`~clipinvert.weights.reader.read_weights`
    (safe, cached; every failure one :class:`WeightsError` line naming the file)."""
    return read_weights(path, what=what, trust=trust)


def sub_state_dict(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def describe_layout(sd: Mapping[str, object]) -> str:
    """Name what a checkpoint looks like, so a swapped file gets a helpful message."""
    prefixes = sorted({k.split(".", 1)[0] for k in sd})
    shown = ", ".join(f"{p}.*" for p in prefixes[:6])
    return shown + (", …" if len(prefixes) > 6 else "")


def _abbrev(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")


def mismatch_summary(expected: Mapping[str, torch.Tensor],
                     sd: Mapping[str, torch.Tensor]) -> str | None:
    """What stops ``sd`` loading strictly where ``expected`` is wanted, as a short phrase.

    ``load_state_dict`` dumps every key over many lines; users need counts and a few names.
    ``None`` when the two fit.
    """
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_abbrev(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_abbrev(unexpected)})")
    if wrong:
        parts.append(f"{len(wrong)} wrong shapes ({_abbrev(wrong, 2)})")
    return "; ".join(parts) or None


def checked_tensors(sd: Mapping[str, object], what: str, path: Path, *, shown_prefix: str = "",
                    fill_batches_tracked: bool = False) -> StateDict:
    """A copy of ``sd`` whose values are all tensors, or one :class:`WeightsError` line naming
    the first that is not (``shown_prefix``: where the keys sat in the file).

    ``fill_batches_tracked``: add the BatchNorm ``num_batches_tracked`` counters that files of
    PyTorch before 0.4.1 lack, as PyTorch's own loading does.
    """
    bad = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"{what} weights {path}: {shown_prefix}{bad} is not a tensor")
    out: StateDict = dict(sd)  # type: ignore[arg-type]
    if fill_batches_tracked:
        for k in [k for k in out if k.endswith(".running_mean")]:
            out.setdefault(k[:-len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return out


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, path: Path, *,
                assign: bool = False) -> None:
    """Strict load with a readable one-line diagnosis instead of PyTorch's multi-line dump.

    Constant FIR-kernel buffers (``*.blur.kernel``, ``*.upsample.kernel``) that some circulating
    copies lack are filled in.  ``assign`` hands the checkpoint's tensors to the module as they
    are (no copy), for modules built on the ``meta`` device.
    """
    own = module.state_dict()
    sd = dict(sd)
    for k in own:
        if k not in sd and k.endswith((".blur.kernel", ".upsample.kernel")):
            sd[k] = fir_buffer()
    problem = mismatch_summary(own, sd)
    if problem:
        raise WeightsError(f"{what} weights {path} do not fit the released layout: {problem}")
    module.load_state_dict(sd, strict=True, assign=assign)


def build_module(cls: type[T], sd: Mapping[str, torch.Tensor], what: str, path: Path) -> T:
    """``cls.from_state_dict`` (sizes read off the keys), then a strict load; frozen, eval.

    The module is built on the ``meta`` device and the checkpoint's tensors are assigned to
    it: no random initialisation that the weights would overwrite anyway, and no copy out of
    a memory-mapped safetensors cache.  (Our networks have no non-persistent buffers, so
    nothing is left on ``meta``.)
    """
    try:
        with torch.device("meta"):
            module = cls.from_state_dict(sd)  # type: ignore[attr-defined]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{what} weights {path}: {exc.args[0]}") from None
    load_strict(module, sd, what, path, assign=True)
    return module.eval().requires_grad_(False)


def build_generator(sd: Mapping[str, torch.Tensor], what: str, path: Path) -> Generator:
    return build_module(Generator, sd, what, path)


def _latent_avg(value: object, n_latent: int, style_dim: int, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"e4e weights {path} have no latent_avg tensor")
    if value.shape == (style_dim,):
        value = value[None].expand(n_latent, style_dim)
    if value.shape != (n_latent, style_dim):
        raise WeightsError(f"e4e weights {path}: latent_avg has shape {tuple(value.shape)}, "
                           f"expected ({style_dim}) or ({n_latent}, {style_dim})")
    return value.float().clone()


@dataclass
class E4EWeights:
    """The encoder, its ``latent_avg`` as (n_latent, style_dim), and its (plain) decoder weights."""

    encoder: Encoder4Editing
    latent_avg: torch.Tensor
    decoder_sd: StateDict = field(repr=False)
    opts: dict = field(default_factory=dict, repr=False)


def _read_training_checkpoint(path: Path, what: str, trust: bool) -> tuple[dict, dict, dict]:
    """The pSp/e4e-style layout both released files share: ``{'state_dict', 'opts', …}``.

    Returns (checkpoint, state_dict, opts).
    """
    ckpt = read_checkpoint(path, what, trust=trust)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise WeightsError(
            f"{what} weights {path} have no 'state_dict' (found {describe_layout(ckpt)})")
    opts = ckpt.get("opts")
    return ckpt, sd, opts if isinstance(opts, dict) else {}


def load_e4e(path: Path | str, *, trust: bool = False) -> E4EWeights:
    path = Path(path)
    ckpt, sd, opts = _read_training_checkpoint(path, "e4e", trust)
    enc_sd = sub_state_dict(sd, "encoder.")
    if not enc_sd:
        raise WeightsError(
            f"e4e weights {path} hold no encoder.* keys (found {describe_layout(sd)})"
            " — is this a CLIPInverter or StyleGAN2 file?")
    encoder = build_module(Encoder4Editing, enc_sd, "e4e", path)
    latent_avg = _latent_avg(ckpt.get("latent_avg"), encoder.n_styles, encoder.style_dim, path)
    return E4EWeights(encoder, latent_avg, sub_state_dict(sd, "decoder."), opts)


@dataclass
class CLIPInverterWeights:
    adapter: CLIPAdapter
    decoder: Generator  # carries the CLIPRemapper unless the file is a stage-1 checkpoint
    opts: dict = field(default_factory=dict, repr=False)


ADAPTER_PREFIXES = ("adapter.", "mapper.")  # the older release called the adapter "mapper"


def load_clipinverter(path: Path | str, *, trust: bool = False) -> CLIPInverterWeights:
    path = Path(path)
    _, sd, opts = _read_training_checkpoint(path, "CLIPInverter", trust)
    adapter_sd = next((s for p in ADAPTER_PREFIXES if (s := sub_state_dict(sd, p))), None)
    if not adapter_sd:
        hint = " — this looks like an e4e file" if any(k.startswith("encoder.") for k in sd) else ""
        raise WeightsError(f"CLIPInverter weights {path} hold no adapter.* (or mapper.*) keys "
                           f"(found {describe_layout(sd)}){hint}")
    adapter = build_module(CLIPAdapter, adapter_sd, "CLIPInverter adapter", path)
    dec_sd = sub_state_dict(sd, "decoder.")
    if not dec_sd:
        raise WeightsError(f"CLIPInverter weights {path} hold no decoder.* keys")
    decoder = build_generator(dec_sd, "CLIPInverter decoder", path)
    return CLIPInverterWeights(adapter, decoder, opts)


def load_stylegan2(path: Path | str, *, trust: bool = False) -> tuple[Generator, torch.Tensor]:
    """A rosinality file: ``g_ema`` and ``latent_avg`` (mean of 10,000 mapped z if absent).

    Sizes — resolution, mapping depth, channel table — come from the keys, so any file
    ``clipinvert models import`` writes loads (NVlabs' configs use 2 or 8 mapping layers and
    several channel tables).  Its ``conv_clamp`` entry, when present, is applied: NVlabs'
    generators clamp conv outputs and the imported weights reproduce their images only with it.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, "StyleGAN2", trust=trust)
    sd = ckpt.get("g_ema")
    if not isinstance(sd, dict):
        raise WeightsError(
            f"StyleGAN2 weights {path} have no 'g_ema' (found {describe_layout(ckpt)})")
    g = build_generator(sd, "StyleGAN2", path)
    clamp = ckpt.get("conv_clamp")
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, int | float) or clamp <= 0:
            raise WeightsError(f"StyleGAN2 weights {path}: conv_clamp {clamp!r} is not a "
                               "positive number")
        g.set_conv_clamp(float(clamp))
    avg = ckpt.get("latent_avg")
    if isinstance(avg, torch.Tensor) and avg.numel() == g.style_dim:
        return g, avg.reshape(g.style_dim).float()
    return g, g.mean_latent()


def load_arcface(path: Path | str, *, trust: bool = False) -> IRSEBackbone:
    """ArcFace IR-SE (``model_ir_se50.pth``: a plain state dict, optionally ``module.``-prefixed
    as DataParallel saves it) → :class:`~clipinvert.nets.IRSEBackbone`, frozen, in eval mode.

    Widths, unit counts and the embedding size are read off the keys.  ``num_batches_tracked``
    counters that pre-0.4.1 PyTorch files lack are filled in (PyTorch does the same).
    """
    path = Path(path)
    sd = read_checkpoint(path, "ArcFace", trust=trust)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = sub_state_dict(sd, "module.")
    if "input_layer.0.weight" not in sd or "output_layer.3.weight" not in sd:
        raise WeightsError(f"ArcFace weights {path} hold no input_layer.*/output_layer.* keys "
                           f"(found {describe_layout(sd)}) — expected model_ir_se50.pth")
    sd = checked_tensors(sd, "ArcFace", path, fill_batches_tracked=True)
    return build_module(IRSEBackbone, sd, "ArcFace", path)


# The convolutions of torchvision's AlexNet ``features`` (indices 1, 2, 4, 5, 7, 9, 11 are
# ReLUs and max-pools): what LPIPS's trunk holds.  (out, in, k) each.
ALEXNET_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3),
                 10: (256, 256, 3)}


def alexnet_trunk_shapes() -> dict[str, tuple[int, ...]]:
    """``features.N.weight`` / ``.bias`` → shape, as in torchvision's AlexNet file."""
    out: dict[str, tuple[int, ...]] = {}
    for i, (cout, cin, k) in ALEXNET_CONVS.items():
        out[f"features.{i}.weight"] = (cout, cin, k, k)
        out[f"features.{i}.bias"] = (cout,)
    return out


def load_alexnet_trunk(path: Path | str, *, trust: bool = False) -> StateDict:
    """The AlexNet trunk LPIPS runs on, from torchvision's ``alexnet-owt-7be5be79.pth`` (a plain
    state dict ``features.*`` + ``classifier.*``; a file of the ``features.*`` alone is fine too).

    Returns the ten ``features.{0,3,6,8,10}.{weight,bias}`` tensors in torchvision's names,
    shapes checked; ``classifier.*`` is dropped.  :class:`clipinvert.losses.LPIPSLoss` maps them
    onto the ``lpips`` package's slices.
    """
    path = Path(path)
    sd = read_checkpoint(path, "LPIPS AlexNet", trust=trust)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = sub_state_dict(sd, "module.")
    trunk = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith("features.")}
    if not trunk:
        raise WeightsError(f"LPIPS AlexNet weights {path} hold no features.* keys "
                           f"(found {describe_layout(sd)}) — expected torchvision's "
                           "alexnet-owt-7be5be79.pth")
    trunk = checked_tensors(trunk, "LPIPS AlexNet", path)
    expected = {k: torch.empty(s, device="meta") for k, s in alexnet_trunk_shapes().items()}
    problem = mismatch_summary(expected, trunk)
    if problem:
        raise WeightsError(f"LPIPS AlexNet weights {path} do not fit torchvision's AlexNet: "
                           f"{problem}")
    return {k: trunk[k] for k in expected}


def resnet_spec(sd: Mapping[str, torch.Tensor]) -> dict:
    """torchvision ``ResNet`` arguments read off a state dict's keys: the block type (Bottleneck
    when ``layer1.0.conv3`` exists, else BasicBlock), the block count of each stage, and for
    Bottleneck nets the groups / width per group.  Raises KeyError/ValueError when the keys are
    not a torchvision ResNet."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if "conv1.weight" not in sd or "layer1.0.conv1.weight" not in sd:
        raise KeyError("not a torchvision ResNet (no conv1.weight / layer1.0.conv1.weight)")
    layers = []
    for stage in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd
               if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        if not idx or idx != set(range(max(idx) + 1)):
            raise ValueError(f"layer{stage} blocks are missing or not numbered 0…n−1")
        layers.append(max(idx) + 1)
    if "layer1.0.conv3.weight" not in sd:
        return {"block": BasicBlock, "layers": layers}
    width = int(sd["layer1.0.conv1.weight"].shape[0])
    per_group_in = int(sd["layer1.0.conv2.weight"].shape[1])
    if per_group_in <= 0 or width % per_group_in:
        raise ValueError(f"layer1.0.conv2 takes {per_group_in} channels per group of {width}")
    groups = width // per_group_in
    return {"block": Bottleneck, "layers": layers, "groups": groups,
            "width_per_group": width // groups}


def load_moco(path: Path | str, *, trust: bool = False) -> nn.Module:
    """MoCo(-v2) ``moco_v2_800ep_pretrain.pth`` (``{'state_dict': {'module.encoder_q.*',
    'module.encoder_k.*', 'module.queue', 'module.queue_ptr'}, 'epoch', 'arch', 'optimizer'}``)
    → the query encoder as a torchvision ``ResNet`` whose ``fc`` is ``nn.Identity``: images
    (B, 3, H, W) → features (B, 2048) for ResNet-50.  Frozen, in eval mode.

    Only ``encoder_q`` is read, without its ``fc`` projection head; the ``module.`` prefix is
    optional.  The ResNet's block type and depth are read off the keys (ResNet-50 for the
    released file; test files use a small BasicBlock net of the same layout).
    """
    from torchvision.models.resnet import ResNet

    path = Path(path)
    ckpt = read_checkpoint(path, "MoCo", trust=trust)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise WeightsError(f"MoCo weights {path} have no 'state_dict' "
                           f"(found {describe_layout(ckpt)}) — expected moco_v2_800ep_pretrain.pth")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    enc = {k: v for k, v in sub_state_dict(sd, "encoder_q.").items() if not k.startswith("fc.")}
    if not enc:
        raise WeightsError(f"MoCo weights {path} hold no encoder_q.* keys "
                           f"(found {describe_layout(sd)}) — expected moco_v2_800ep_pretrain.pth")
    enc = checked_tensors(enc, "MoCo", path, shown_prefix="encoder_q.",
                          fill_batches_tracked=True)
    try:
        spec = resnet_spec(enc)
        with torch.device("meta"):
            model = ResNet(**spec)
            model.fc = nn.Identity()
    except (KeyError, ValueError, NotImplementedError) as exc:
        raise WeightsError(f"MoCo weights {path}: encoder_q {exc.args[0]}") from None
    load_strict(model, enc, "MoCo encoder_q", path, assign=True)
    return model.eval().requires_grad_(False)


def load_inception(path: Path | str, *, trust: bool = False) -> nn.Module:
    """pytorch-fid's FID Inception from ``pt_inception-2015-12-05-6726825d.pth`` (a plain state
    dict of torchvision ``Inception3`` names: ``Conv2d_1a_3x3.*`` … ``Mixed_7c.*``, ``fc.weight``
    (1008, 2048), ``fc.bias``) → :class:`~clipinvert.nets.inception.FIDInceptionV3`, frozen, in
    eval mode: images in [0, 1] → (B, 2048) pool3 features.

    pytorch-fid itself would download the file inside its constructor; here the registry finds
    it and this reads it like every other weight file.  ``num_batches_tracked`` counters that an
    older PyTorch did not write are filled in (PyTorch does the same).
    """
    from .nets.inception import FIDInceptionV3

    path = Path(path)
    sd = read_checkpoint(path, "FID Inception", trust=trust)
    expected_file = "expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
    if "Conv2d_1a_3x3.conv.weight" not in sd or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise WeightsError(f"FID Inception weights {path} hold no Conv2d_1a_3x3.*/Mixed_7c.* "
                           f"keys (found {describe_layout(sd)}) — {expected_file}")
    sd = checked_tensors(sd, "FID Inception", path, fill_batches_tracked=True)
    with torch.device("meta"):
        net = FIDInceptionV3()
    problem = mismatch_summary(net.state_dict(), sd)
    if problem:
        # torchvision's ImageNet Inception has the same names plus AuxLogits.* and 1000 classes,
        # but other weights: FIDs computed with it are not comparable with published ones.
        hint = (" (torchvision's ImageNet Inception is not the FID network)"
                if any(k.startswith("AuxLogits.") for k in sd) else "")
        raise WeightsError(f"FID Inception weights {path} do not fit the released layout: "
                           f"{problem}{hint} — {expected_file}")
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def load_attribute_classifier(path: Path | str, *, trust: bool = False) -> nn.Module:
    """The CelebA attribute classifier of the AMA metric → an
    :class:`~clipinvert.nets.attributes.AttributeNet`, frozen, in eval mode, whose
    ``attributes`` (output names) and ``input_size`` come from the file.

    Reads what ``clipinvert eval train-classifier`` writes (docs/attribute-classifier.md:
    ``{'format': 'clipinvert-celeba-attributes-v1', 'state_dict', 'attributes', 'input_size',
    'normalize', 'accuracy', 'training'}``).  A checkpoint of LACE's own trainer
    (``{'model_state_dict': features.* + fc.*, 'optimizer_state_dict'}``) or a bare state dict
    of the same network is accepted too, as the 40 CelebA attributes at 224 px.
    """
    from .nets.attributes import (
        ATTRIBUTES_FORMAT,
        CELEBA_ATTRIBUTES,
        INPUT_SIZE,
        NORMALIZE,
        AttributeNet,
    )

    path = Path(path)
    what = "attribute classifier"
    expected = "expected a file written by clipinvert eval train-classifier"
    ckpt = read_checkpoint(path, what, trust=trust)
    fmt = ckpt.get("format")
    if fmt is None:  # LACE's run_celeba.py checkpoint, or a bare state dict
        sd = ckpt.get("model_state_dict", ckpt)
        if not isinstance(sd, dict) or "fc.weight" not in sd or "features.0.0.weight" not in sd:
            raise WeightsError(f"{what} weights {path} hold no features.*/fc.* keys "
                               f"(found {describe_layout(ckpt)}) — {expected}")
        names: object = list(CELEBA_ATTRIBUTES)
        size: object = INPUT_SIZE
    elif fmt != ATTRIBUTES_FORMAT:
        raise WeightsError(f"{what} weights {path} have format {fmt!r}, not "
                           f"{ATTRIBUTES_FORMAT!r} — {expected}")
    else:
        sd = ckpt.get("state_dict")
        if not isinstance(sd, dict):
            raise WeightsError(f"{what} weights {path} have no 'state_dict'")
        names, size = ckpt.get("attributes"), ckpt.get("input_size")
        normalize = ckpt.get("normalize")
        if not (isinstance(normalize, (list, tuple)) and list(normalize) == list(NORMALIZE)):
            raise WeightsError(f"{what} weights {path}: normalize {normalize!r} is not "
                               f"{list(NORMALIZE)} (mean, std), the only preprocessing supported")
    sd = checked_tensors(sd, what, path)
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise WeightsError(f"{what} weights {path}: 'attributes' is not a list of distinct names")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise WeightsError(f"{what} weights {path}: 'input_size' {size!r} is not a positive "
                           "integer")
    net = build_module(AttributeNet, sd, what, path)
    if len(names) != net.fc.out_features:
        raise WeightsError(f"{what} weights {path} name {len(names)} attributes for "
                           f"{net.fc.out_features} outputs")
    net.attributes, net.input_size = tuple(names), size
    return net
