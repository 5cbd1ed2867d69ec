"""Reading the released checkpoint files into the networks of :mod:`clipinvert.nets`.

Layouts accepted unchanged (formats.md §1–3):

* e4e ``{'state_dict': {'encoder.*', 'decoder.*'}, 'opts', 'latent_avg': (n,512) | (512)}``
* CLIPInverter ``{'state_dict': {'adapter.*' | 'mapper.*', 'decoder.*' [+ remapper]}, 'opts'}``
* rosinality StyleGAN2 ``{'g_ema': …, 'latent_avg'?}`` (training checkpoints add ``g``, ``d``,
  optimisers and an ``argparse.Namespace``).

Every problem — missing, empty, truncated, an HTML page saved as ``.pt``, a pickle that wants to
run code, wrong keys or shapes — becomes one :class:`~clipinvert.errors.WeightsError` line that
names the file.  Nothing here ever falls back to random weights.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .nets import CLIPAdapter, Encoder4Editing, Generator, GeneratorConfig

# Harmless types the released files need beyond tensors and builtins.  rosinality training
# checkpoints pickle their argparse options.
SAFE_GLOBALS: list[type] = [argparse.Namespace]

StateDict = dict[str, torch.Tensor]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def check_file(path: Path, what: str) -> None:
    """Fail early, with one line, on the commonest broken downloads."""
    if not path.exists():
        raise WeightsError(f"{what} weights not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{what} weights path is a folder, not a file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"{what} weights file is empty (0 bytes): {path} — download it again")
    with path.open("rb") as fh:
        head = fh.read(512).lstrip()
    if head[:1] == b"<" or head[:9].lower() == b"<!doctype":
        raise WeightsError(
            f"{what} weights file {path} is an HTML page, not a checkpoint — the download hit a "
            "quota or permission page; download it again")


def read_checkpoint(path: Path | str, what: str = "model") -> dict:
    """``torch.load(weights_only=True)`` with the allow-list, mapping every failure to one line."""
    path = Path(path)
    check_file(path, what)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = _first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise WeightsError(
                f"{what} weights file {path} wants to load objects other than tensors; refused "
                f"for safety ({msg})") from None
        raise WeightsError(f"{what} weights file {path} is corrupt: {msg}") from None
    except Exception as exc:  # torch raises many types for a bad file; all mean the same
        raise WeightsError(
            f"{what} weights file {path} is truncated or not a PyTorch checkpoint "
            f"({_first_line(exc)}) — download it again") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{what} weights file {path} holds a {type(obj).__name__}, not a dict")
    return obj


def sub_state_dict(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def describe_layout(sd: Mapping[str, object]) -> str:
    """Name what a checkpoint looks like, so a swapped file gets a helpful message."""
    prefixes = sorted({k.split(".", 1)[0] for k in sd})
    shown = ", ".join(f"{p}.*" for p in prefixes[:6])
    return shown + (", …" if len(prefixes) > 6 else "")


def _abbrev(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", …" if len(keys) > n else "")


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, path: Path) -> None:
    """Strict load with a readable one-line diagnosis instead of PyTorch's multi-line dump.

    Constant FIR-kernel buffers (``*.blur.kernel``, ``*.upsample.kernel``) that some circulating
    copies lack are recomputed, i.e. taken from the freshly built module.
    """
    own = module.state_dict()
    sd = dict(sd)
    for k, v in own.items():
        if k not in sd and k.endswith((".blur.kernel", ".upsample.kernel")):
            sd[k] = v
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)}≠{tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_abbrev(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_abbrev(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} wrong shapes ({_abbrev(wrong, 2)})")
        raise WeightsError(f"{what} weights {path} do not fit the released layout: "
                           + "; ".join(parts))
    module.load_state_dict(sd, strict=True)


def build_generator(sd: Mapping[str, torch.Tensor], what: str, path: Path) -> Generator:
    try:
        cfg = GeneratorConfig.from_state_dict(sd)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{what} weights {path}: {exc}") from None
    g = Generator(cfg)
    load_strict(g, sd, what, path)
    return g.eval().requires_grad_(False)


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


def load_e4e(path: Path | str) -> E4EWeights:
    path = Path(path)
    ckpt = read_checkpoint(path, "e4e")
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise WeightsError(
            f"e4e weights {path} have no 'state_dict' (found {describe_layout(ckpt)})")
    enc_sd = sub_state_dict(sd, "encoder.")
    if not enc_sd:
        raise WeightsError(
            f"e4e weights {path} hold no encoder.* keys (found {describe_layout(sd)})"
            " — is this a CLIPInverter or StyleGAN2 file?")
    try:
        encoder = Encoder4Editing.from_state_dict(enc_sd)
    except KeyError as exc:
        raise WeightsError(f"e4e weights {path}: {exc.args[0]}") from None
    load_strict(encoder, enc_sd, "e4e", path)
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    latent_avg = _latent_avg(ckpt.get("latent_avg"), encoder.n_styles, encoder.style_dim, path)
    return E4EWeights(encoder.eval().requires_grad_(False), latent_avg,
                      sub_state_dict(sd, "decoder."), opts or {})


@dataclass
class CLIPInverterWeights:
    adapter: CLIPAdapter
    decoder: Generator  # carries the CLIPRemapper unless the file is a stage-1 checkpoint
    opts: dict = field(default_factory=dict, repr=False)


ADAPTER_PREFIXES = ("adapter.", "mapper.")  # the older release called the adapter "mapper"


def load_clipinverter(path: Path | str) -> CLIPInverterWeights:
    path = Path(path)
    ckpt = read_checkpoint(path, "CLIPInverter")
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise WeightsError(
            f"CLIPInverter weights {path} have no 'state_dict' (found {describe_layout(ckpt)})")
    adapter_sd = next((s for p in ADAPTER_PREFIXES if (s := sub_state_dict(sd, p))), None)
    if not adapter_sd:
        hint = " — this looks like an e4e file" if any(k.startswith("encoder.") for k in sd) else ""
        raise WeightsError(f"CLIPInverter weights {path} hold no adapter.* (or mapper.*) keys "
                           f"(found {describe_layout(sd)}){hint}")
    try:
        adapter = CLIPAdapter.from_state_dict(adapter_sd)
    except KeyError as exc:
        raise WeightsError(f"CLIPInverter weights {path}: {exc.args[0]}") from None
    load_strict(adapter, adapter_sd, "CLIPInverter adapter", path)
    dec_sd = sub_state_dict(sd, "decoder.")
    if not dec_sd:
        raise WeightsError(f"CLIPInverter weights {path} hold no decoder.* keys")
    decoder = build_generator(dec_sd, "CLIPInverter decoder", path)
    opts = ckpt.get("opts") if isinstance(ckpt.get("opts"), dict) else {}
    return CLIPInverterWeights(adapter.eval().requires_grad_(False), decoder, opts or {})


def load_stylegan2(path: Path | str) -> tuple[Generator, torch.Tensor]:
    """A rosinality file: ``g_ema`` and ``latent_avg`` (mean of 10,000 mapped z if absent)."""
    path = Path(path)
    ckpt = read_checkpoint(path, "StyleGAN2")
    sd = ckpt.get("g_ema")
    if not isinstance(sd, dict):
        raise WeightsError(
            f"StyleGAN2 weights {path} have no 'g_ema' (found {describe_layout(ckpt)})")
    g = build_generator(sd, "StyleGAN2", path)
    avg = ckpt.get("latent_avg")
    if isinstance(avg, torch.Tensor) and avg.numel() == g.style_dim:
        return g, avg.reshape(g.style_dim).float()
    return g, g.mean_latent()
