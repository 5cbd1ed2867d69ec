"""NVlabs StyleGAN2 generators → the rosinality layout clipinvert (and e4e) read.

What is read (docs/new-domain.md#import-a-generator):

* StyleGAN2-ADA-PyTorch snapshots and published ``.pkl`` files (``G_ema``), and the StyleGAN3
  repository's ``stylegan2`` networks (the same module and parameter names), through the
  restricted unpickler of :mod:`.nvlabs_pickle` — their embedded code is never run;
* NVlabs' TensorFlow StyleGAN2 / StyleGAN2-ADA pickles (``(G, D, Gs)`` networks, ``Gs`` taken),
  whose variables are renamed to the PyTorch names the way NVlabs' ``legacy.py`` does, so one
  conversion serves both;
* a rosinality ``.pt`` (``g_ema``, optional ``latent_avg``), kept as it is.

The conversion is renaming and reshaping, plus one rescale where the two equalised-learning-rate
conventions differ: NVlabs computes ``W·weight_gain`` and ``b·bias_gain`` (``lr/√in`` and ``lr``),
rosinality ``W·lr_r/√in`` and ``b·lr_r`` with ``lr_r`` fixed (0.01 for the mapping, 1 for the
affines), so stored weights are multiplied by ``weight_gain·√in / lr_r`` and biases by
``bias_gain / lr_r`` — the identity for NVlabs' own settings.  ``conv_clamp`` and the
activations' gains are settings, not weights: the clamp is recorded beside ``g_ema``.
Anything the rosinality layout cannot express (conditional generators, the ``resnet`` and
``orig`` architectures, StyleGAN3-T/R, other filters or activations) is refused in one line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from ..nets.stylegan2 import default_channels, fir_buffer
from .download import sha256_file
from .nvlabs_pickle import PersistentRecord, TFNetworkRecord, is_plain_pickle, read_network_pickle
from .safety import check_file

StateDict = dict[str, torch.Tensor]
WHAT = "generator"
#: rosinality's fixed learning-rate multipliers (``Generator(lr_mlp=0.01)``; affines 1).
ROSINALITY_LR_MAPPING = 0.01
#: Bumped when the conversion's output changes; recorded in every imported file.
CONVERSION = "clipinvert-nvlabs-to-rosinality-1"


@dataclass
class NVlabsGenerator:
    """An NVlabs generator as data: its state dict under NVlabs' PyTorch names and the settings
    that are not weights."""

    sd: StateDict
    source_format: str
    conv_clamp: float | None = None
    mapping_lr: float = 0.01  # lr_multiplier of the mapping layers (their bias_gain)
    gains: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer → (w, b) gains


@dataclass
class Imported:
    """A generator in the rosinality layout, ready to save: ``{'g_ema', 'latent_avg',
    'conv_clamp', 'clipinvert_import'}``."""

    g_ema: StateDict
    latent_avg: torch.Tensor | None
    conv_clamp: float | None
    info: dict

    @property
    def size(self) -> int:
        return int(self.info["resolution"])

    def checkpoint(self) -> dict:
        ckpt: dict = {"g_ema": self.g_ema, "clipinvert_import": self.info}
        if self.latent_avg is not None:
            ckpt["latent_avg"] = self.latent_avg
        if self.conv_clamp is not None:
            ckpt["conv_clamp"] = self.conv_clamp
        return ckpt


def _refuse(path: Path, why: str) -> WeightsError:
    return WeightsError(f"{WHAT} {path} cannot be imported: {why}")


# ---- PyTorch pickles (StyleGAN2-ADA-PyTorch, StyleGAN3's stylegan2) -------------------------

def _state_number(rec: PersistentRecord | None, name: str) -> float | None:
    value = rec.state.get(name) if rec is not None else None
    if value is None or isinstance(value, bool) or not np.isscalar(value):
        return None
    return float(value)  # type: ignore[arg-type]


def _from_record(g: PersistentRecord, path: Path) -> NVlabsGenerator:
    synthesis, mapping = g.child("synthesis"), g.child("mapping")
    if synthesis is None or mapping is None:
        raise _refuse(path, f"its G_ema ({g.class_name}) has no synthesis/mapping networks")
    names = set(synthesis.state.get("_modules") or {})
    if any(re.fullmatch(r"L\d+_.*", n) for n in names) or "input" in names:
        raise _refuse(path, "it is a StyleGAN3-T/R generator (synthesis.L* layers); only "
                            "StyleGAN2 generators have a rosinality layout")
    kwargs = g.init_kwargs
    if int(kwargs.get("c_dim") or 0) > 0 or mapping.child("embed") is not None:
        raise _refuse(path, "it is a conditional generator (c_dim > 0, mapping.embed); "
                            "clipinvert's generators take no class label")
    clamps, gains = set(), {}
    for name, rec in g.modules():
        if rec.class_name in ("SynthesisLayer", "ToRGBLayer"):
            clamps.add(_state_number(rec, "conv_clamp"))
        act = rec.state.get("activation")
        if rec.class_name in ("SynthesisLayer",) and act != "lrelu":
            raise _refuse(path, f"{name} uses the {act!r} activation, not lrelu")
        if rec.class_name == "FullyConnectedLayer":
            if name.startswith("mapping.") and act != "lrelu":
                raise _refuse(path, f"{name} uses the {act!r} activation, not lrelu")
            wg, bg = _state_number(rec, "weight_gain"), _state_number(rec, "bias_gain")
            if wg is not None and bg is not None:
                gains[name] = (wg, bg)
    if len(clamps) > 1:
        raise _refuse(path, "its layers use different conv_clamp values "
                            f"{sorted(map(str, clamps))}")
    clamp = clamps.pop() if clamps else None
    mapping_lr = next((bg for n, (_, bg) in gains.items() if n.startswith("mapping.fc")), 0.01)
    fmt = ("StyleGAN3 repository (stylegan2 networks)" if "synthesis_kwargs" not in kwargs
           and "channel_base" in kwargs else "StyleGAN2-ADA-PyTorch")
    return NVlabsGenerator(g.state_dict(), fmt, clamp, mapping_lr, gains)


# ---- TensorFlow pickles ---------------------------------------------------------------------

def _tf_to_nvlabs_names(params: Mapping[str, np.ndarray], path: Path) -> StateDict:
    """NVlabs' ``legacy.convert_tf_generator`` renaming, as data: TF variable → PyTorch name."""

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    sd: StateDict = {}
    for name, value in params.items():
        if m := re.fullmatch(r"mapping/Dense(\d+)/(weight|bias)", name):
            sd[f"mapping.fc{m[1]}.{m[2]}"] = t(value.T if m[2] == "weight" else value)
        elif name == "dlatent_avg":
            sd["mapping.w_avg"] = t(value)
        elif name == "synthesis/4x4/Const/const":
            sd["synthesis.b4.const"] = t(value[0])
        elif m := re.fullmatch(r"synthesis/noise(\d+)", name):
            idx = int(m[1])  # noise k: b4.conv1 (k=0), then conv0/conv1 of each block
            res = 2 ** ((idx + 5) // 2)
            layer = "conv1" if idx == 0 or idx % 2 == 0 else "conv0"
            sd[f"synthesis.b{res}.{layer}.noise_const"] = t(value[0, 0])
        elif m := re.fullmatch(r"synthesis/(\d+)x\1/(Conv|Conv0_up|Conv1|ToRGB)/(\w+)", name):
            res, tf_layer, var = m[1], m[2], m[3]
            layer = {"Conv": "conv1", "Conv0_up": "conv0", "Conv1": "conv1",
                     "ToRGB": "torgb"}[tf_layer]
            key = f"synthesis.b{res}.{layer}"
            if var == "weight":
                w = value[::-1, ::-1] if tf_layer == "Conv0_up" else value
                sd[f"{key}.weight"] = t(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
            elif var == "bias":
                sd[f"{key}.bias"] = t(value)
            elif var == "noise_strength":
                sd[f"{key}.noise_strength"] = t(value)
            elif var == "mod_weight":
                sd[f"{key}.affine.weight"] = t(value.T)
            elif var == "mod_bias":
                sd[f"{key}.affine.bias"] = t(value + 1)
            else:
                raise _refuse(path, f"unknown TensorFlow variable {name}")
        elif re.fullmatch(r"synthesis/\d+x\d+/Skip/weight", name):
            raise _refuse(path, "it uses the 'resnet' architecture (Skip weights); only the "
                                "'skip' architecture has a rosinality layout")
        elif re.fullmatch(r"(synthesis/)?ToRGB_lod\d+/.*", name):
            raise _refuse(path, "it uses the 'orig' architecture (ToRGB_lod*); only the 'skip' "
                                "architecture has a rosinality layout")
        elif name.startswith("mapping/LabelEmbed/") or name.startswith("mapping/LabelConcat"):
            raise _refuse(path, "it is a conditional generator (mapping/LabelEmbed); "
                                "clipinvert's generators take no class label")
        elif name in ("synthesis/lod",):
            continue  # progressive-growing state, unused by StyleGAN2
        else:
            raise _refuse(path, f"unknown TensorFlow variable {name}")
    return sd


def _from_tf(gs: TFNetworkRecord, path: Path) -> NVlabsGenerator:
    version = gs.state.get("version")
    if not isinstance(version, int) or version < 4:
        raise _refuse(path, f"TensorFlow network pickle version {version!r} is too old "
                            "(StyleGAN2's are 4 or later)")
    kw = dict(gs.state.get("static_kwargs") or {})
    if int(kw.get("label_size") or 0) > 0:
        raise _refuse(path, "it is a conditional generator (label_size > 0); clipinvert's "
                            "generators take no class label")
    arch = kw.get("architecture", "skip")
    if arch != "skip":
        raise _refuse(path, f"it uses the {arch!r} architecture; only the 'skip' architecture "
                            "has a rosinality layout")
    for key, default in (("nonlinearity", "lrelu"), ("mapping_nonlinearity", "lrelu")):
        if kw.get(key, default) != "lrelu":
            raise _refuse(path, f"it uses {key} = {kw[key]!r}, not lrelu")
    if list(kw.get("resample_kernel") or [1, 3, 3, 1]) != [1, 3, 3, 1]:
        raise _refuse(path, f"its resample_kernel {kw['resample_kernel']} is not [1, 3, 3, 1]")
    sd = _tf_to_nvlabs_names(gs.params(), path)
    lr = float(kw.get("mapping_lrmul") if kw.get("mapping_lrmul") is not None else 0.01)
    clamp = kw.get("conv_clamp")
    fmt = "NVlabs TensorFlow StyleGAN2" + ("-ADA" if version >= 5 or "conv_clamp" in kw else "")
    return NVlabsGenerator(sd, fmt, None if clamp is None else float(clamp), lr)


# ---- NVlabs names → rosinality names ----------------------------------------------------------

def _linear(nv: NVlabsGenerator, sd: StateDict, layer: str, lr: float, used: set[str]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """An NVlabs FullyConnectedLayer's weight and bias, rescaled for rosinality's gains."""
    w, b = sd[f"{layer}.weight"], sd[f"{layer}.bias"]
    used.update((f"{layer}.weight", f"{layer}.bias"))
    lr_nv = nv.mapping_lr if layer.startswith("mapping.") else 1.0
    wg, bg = nv.gains.get(layer, (lr_nv / math.sqrt(w.shape[1]), lr_nv))
    w_scale, b_scale = wg * math.sqrt(w.shape[1]) / lr, bg / lr
    # Exactly 1 for NVlabs' own settings: then the stored values are copied bit for bit.
    w = w if math.isclose(w_scale, 1, rel_tol=1e-6) else w * w_scale
    b = b if math.isclose(b_scale, 1, rel_tol=1e-6) else b * b_scale
    return w.float().contiguous(), b.float().contiguous()


def channel_multiplier(size: int, channels: Mapping[int, int]) -> int | None:
    """rosinality's ``channel_multiplier`` whose table is ``channels``, or None (no such)."""
    return next((cm for cm in (1, 2, 4, 8) if default_channels(size, cm) == dict(channels)), None)


def to_rosinality(nv: NVlabsGenerator, path: Path) -> Imported:
    """Rename and reshape an NVlabs generator into ``g_ema`` + ``latent_avg`` (see module)."""
    sd, out, used = nv.sd, {}, set()
    res_keys = {int(m[1]) for k in sd if (m := re.match(r"synthesis\.b(\d+)\.", k))}
    if 4 not in res_keys or "synthesis.b4.const" not in sd:
        raise _refuse(path, "its synthesis network has no b4.const (not a StyleGAN2 generator)")
    size = max(res_keys)
    resolutions = [2**i for i in range(2, int(math.log2(size)) + 1)]
    if sorted(res_keys) != resolutions:
        raise _refuse(path, f"its synthesis blocks {sorted(res_keys)} are not 4…{size}")
    if any(".skip." in k for k in sd):
        raise _refuse(path, "it uses the 'resnet' architecture (synthesis.b*.skip weights); "
                            "only the 'skip' architecture has a rosinality layout")
    if any(f"synthesis.b{r}.torgb.weight" not in sd for r in resolutions):
        raise _refuse(path, "it uses the 'orig' architecture (no torgb below the last block); "
                            "only the 'skip' architecture has a rosinality layout")
    for key in [k for k in sd if k.endswith("resample_filter")]:
        used.add(key)
        if not torch.allclose(sd[key].float() * 4, fir_buffer(), atol=1e-7):
            raise _refuse(path, f"{key} is not the [1,3,3,1] filter rosinality uses")

    fcs = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", k)))
    if not fcs or fcs != list(range(len(fcs))):
        raise _refuse(path, "its mapping network has no fc0…fcN layers")
    w_dim = int(sd["synthesis.b4.conv1.affine.weight"].shape[1])
    for i in fcs:
        w, b = _linear(nv, sd, f"mapping.fc{i}", ROSINALITY_LR_MAPPING, used)
        if tuple(w.shape) != (w_dim, w_dim):
            raise _refuse(path, f"mapping.fc{i} is {tuple(w.shape)}; rosinality's mapping layers "
                                f"are all {w_dim}×{w_dim} (z_dim = w_dim)")
        out[f"style.{i + 1}.weight"], out[f"style.{i + 1}.bias"] = w, b

    noises: list[torch.Tensor] = []

    def layer(src: str, dst: str, upsample: bool) -> None:
        w = sd[f"{src}.weight"]
        out[f"{dst}.conv.weight"] = w.float()[None].contiguous()
        out[f"{dst}.conv.modulation.weight"], out[f"{dst}.conv.modulation.bias"] = _linear(
            nv, sd, f"{src}.affine", 1.0, used)
        if upsample:
            out[f"{dst}.conv.blur.kernel"] = fir_buffer()
        strength = sd.get(f"{src}.noise_strength", torch.zeros([]))
        out[f"{dst}.noise.weight"] = strength.float().reshape(1).clone()
        out[f"{dst}.activate.bias"] = sd[f"{src}.bias"].float().contiguous()
        res = int(src.split(".")[1][1:])  # synthesis.b{res}.conv*
        noises.append(sd.get(f"{src}.noise_const", torch.zeros(res, res)).float()[None, None])
        used.update(f"{src}.{k}" for k in ("weight", "bias", "noise_strength", "noise_const"))

    def torgb(src: str, dst: str, upsample: bool) -> None:
        out[f"{dst}.conv.weight"] = sd[f"{src}.weight"].float()[None].contiguous()
        out[f"{dst}.conv.modulation.weight"], out[f"{dst}.conv.modulation.bias"] = _linear(
            nv, sd, f"{src}.affine", 1.0, used)
        out[f"{dst}.bias"] = sd[f"{src}.bias"].float().reshape(1, -1, 1, 1).clone()
        if upsample:
            out[f"{dst}.upsample.kernel"] = fir_buffer()
        used.update((f"{src}.weight", f"{src}.bias"))

    out["input.input"] = sd["synthesis.b4.const"].float()[None].contiguous()
    used.add("synthesis.b4.const")
    layer("synthesis.b4.conv1", "conv1", False)
    torgb("synthesis.b4.torgb", "to_rgb1", False)
    for k, res in enumerate(resolutions[1:]):
        layer(f"synthesis.b{res}.conv0", f"convs.{2 * k}", True)
        layer(f"synthesis.b{res}.conv1", f"convs.{2 * k + 1}", False)
        torgb(f"synthesis.b{res}.torgb", f"to_rgbs.{k}", True)
    for j, noise in enumerate(noises):
        out[f"noises.noise_{j}"] = noise.contiguous()

    avg = sd.get("mapping.w_avg")
    used.add("mapping.w_avg")
    left = sorted(k for k in sd if k not in used)
    if left:
        raise _refuse(path, f"{len(left)} weights have no place in the rosinality layout "
                            f"({', '.join(left[:3])})")
    channels = {4: int(out["conv1.conv.weight"].shape[1])}
    for k, res in enumerate(resolutions[1:]):
        channels[res] = int(out[f"convs.{2 * k}.conv.weight"].shape[1])
    info = {"format": nv.source_format, "conversion": CONVERSION, "resolution": size,
            "style_dim": w_dim, "n_mlp": len(fcs), "channels": {str(r): c for r, c in
                                                               channels.items()},
            "channel_multiplier": channel_multiplier(size, channels),
            "conv_clamp": nv.conv_clamp, "mapping_lr_multiplier": nv.mapping_lr}
    return Imported(out, None if avg is None else avg.float().clone(), nv.conv_clamp, info)


# ---- reading a source file --------------------------------------------------------------------

def _rosinality(path: Path) -> Imported:
    from ..checkpoints import build_generator, describe_layout
    from .reader import read_weights

    ckpt = read_weights(path, what=WHAT, cache=False)
    sd = ckpt.get("g_ema")
    if not isinstance(sd, dict):
        raise _refuse(path, "it is neither an NVlabs network pickle nor a rosinality file "
                            f"(no 'g_ema'; found {describe_layout(ckpt)})")
    g = build_generator(sd, WHAT, path)  # checks the layout strictly
    avg = ckpt.get("latent_avg")
    avg = avg.reshape(-1)[: g.style_dim].float() if isinstance(avg, torch.Tensor) else None
    clamp = ckpt.get("conv_clamp")
    clamp = float(clamp) if isinstance(clamp, int | float) else None
    channels = dict(g.config.channels)
    info = {"format": "rosinality", "conversion": "none", "resolution": g.size,
            "style_dim": g.style_dim, "n_mlp": g.config.n_mlp,
            "channels": {str(r): c for r, c in channels.items()},
            "channel_multiplier": channel_multiplier(g.size, channels), "conv_clamp": clamp,
            "mapping_lr_multiplier": ROSINALITY_LR_MAPPING}
    return Imported({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                    avg, clamp, info)


def _from_pickle(path: Path) -> Imported:
    data = read_network_pickle(path, WHAT)
    if isinstance(data, tuple) and len(data) == 3 and all(
            isinstance(n, TFNetworkRecord) for n in data):
        return to_rosinality(_from_tf(data[2], path), path)  # (G, D, Gs): Gs is the EMA copy
    if isinstance(data, dict) and isinstance(data.get("G_ema"), PersistentRecord):
        return to_rosinality(_from_record(data["G_ema"], path), path)
    if isinstance(data, dict) and "G" in data:
        raise _refuse(path, "it holds no G_ema (only G, the raw training weights, which are not "
                            "what NVlabs publishes or samples from)")
    raise _refuse(path, "it is a pickle but not an NVlabs network snapshot (no G_ema, not a "
                        "TensorFlow (G, D, Gs))")


def import_generator(path: Path | str) -> Imported:
    """Read any supported generator file (see module) into the rosinality layout.

    Every failure is one :class:`WeightsError` line naming the file and the reason.
    """
    path = Path(path)
    head = check_file(path, WHAT)
    imported = _from_pickle(path) if is_plain_pickle(head) else _rosinality(path)
    imported.info.update(source=path.name, source_sha256=sha256_file(path))
    _check_loads(imported, path)
    return imported


def _check_loads(imported: Imported, path: Path) -> None:
    """The converted weights must load strictly in clipinvert's generator (a bug guard)."""
    from ..checkpoints import build_generator

    build_generator(imported.g_ema, WHAT, path).set_conv_clamp(imported.conv_clamp)


def save_imported(imported: Imported, out: Path | str) -> Path:
    """Write ``{'g_ema', 'latent_avg', 'conv_clamp', 'clipinvert_import'}`` atomically."""
    from ..fileio import atomic_write

    out = Path(out)
    atomic_write(out, lambda tmp: torch.save(imported.checkpoint(), tmp))
    return out
