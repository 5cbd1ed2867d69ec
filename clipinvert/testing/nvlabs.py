"""Hand-built NVlabs network pickles, for testing ``clipinvert models import`` without NVlabs.

NVlabs' code cannot be a dependency (its licence is non-commercial) and its real files are
hundreds of megabytes, so tests write small generators in the *structure* of NVlabs' files:

* :func:`write_snapshot` — a StyleGAN2-ADA-PyTorch ``network-snapshot-*.pkl``: a plain pickle
  of ``{'G', 'G_ema', 'D', 'augment_pipe', 'training_set_kwargs'}`` whose networks are
  ``torch_utils.persistence`` objects — each a call of ``_reconstruct_persistent_obj(meta)``
  with ``meta = {type, version, module_src, class_name, state}``, ``state`` being the
  ``nn.Module.__dict__`` (``_parameters``, ``_buffers``, ``_modules``, attributes,
  ``_init_kwargs``) — and tensors pickled the way ``pickle`` pickles them
  (``_rebuild_parameter``/``_rebuild_tensor_v2`` over ``torch.storage._load_from_bytes``);
* :func:`write_tf_pickle` — a TensorFlow StyleGAN2 pickle: ``(G, D, Gs)``, each a
  ``dnnlib.tflib.network.Network`` pickled as its state dict (``version``, ``static_kwargs``,
  ``components``, ``variables``: ``[(name, ndarray)]``), variables named as NVlabs'
  ``legacy.py`` reads them.

The globals these files name (``torch_utils.persistence._reconstruct_persistent_obj``,
``dnnlib.tflib.network.Network``, ``dnnlib.util.EasyDict``) are stand-ins registered in
``sys.modules`` only while pickling; nothing of NVlabs' is imported.  The weights are seeded, so
reference outputs computed once with NVlabs' own networks (tests/test_import.py says how) stay
valid.
"""

from __future__ import annotations

import math
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import seeded

SQRT2 = np.sqrt(2)  # NVlabs' lrelu def_gain, a numpy float64 in their pickles


@dataclass(frozen=True)
class NVSpec:
    """A small NVlabs StyleGAN2 generator: ``Generator(z_dim=w_dim, c_dim=0, img_resolution,
    mapping_kwargs={num_layers}, synthesis_kwargs={channel_base, channel_max, conv_clamp})``.

    ``stylegan3``: keep synthesis settings at the top level of ``init_kwargs``, as the
    StyleGAN3 repository's ``networks_stylegan2.Generator`` does.
    """

    size: int = 32
    w_dim: int = 64
    mapping_layers: int = 2
    channel_base: int = 512
    channel_max: int = 32
    conv_clamp: float | None = 256
    lr_multiplier: float = 0.01
    stylegan3: bool = False

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def resolutions(self) -> list[int]:
        return [2**i for i in range(2, int(math.log2(self.size)) + 1)]

    def init_kwargs(self) -> dict:
        synthesis = {"channel_base": self.channel_base, "channel_max": self.channel_max,
                     "num_fp16_res": 0, "conv_clamp": self.conv_clamp}
        mapping = {"num_layers": self.mapping_layers, "lr_multiplier": self.lr_multiplier}
        base = {"z_dim": self.w_dim, "c_dim": 0, "w_dim": self.w_dim,
                "img_resolution": self.size, "img_channels": 3, "mapping_kwargs": mapping}
        if self.stylegan3:
            return {**base, **synthesis}
        return {**base, "synthesis_kwargs": synthesis}


def resample_filter() -> torch.Tensor:
    """NVlabs' ``setup_filter([1,3,3,1])``: the outer product, normalised to sum 1."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()


def nvlabs_state_dict(spec: NVSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights under NVlabs' ``G.state_dict()`` names and shapes.

    Biases, noise strengths and ``w_avg`` are non-zero (trained files' are) so that a wrong
    index, a dropped ``+1`` or a lost noise would change the image.
    """
    sd: dict[str, torch.Tensor] = {}
    w = spec.w_dim
    with seeded(seed):
        for i in range(spec.mapping_layers):
            sd[f"mapping.fc{i}.weight"] = torch.randn(w, w) / spec.lr_multiplier
            sd[f"mapping.fc{i}.bias"] = torch.randn(w)
        sd["mapping.w_avg"] = torch.randn(w) * 0.5
        for res in spec.resolutions:
            out_ch = spec.channels(res)
            block = f"synthesis.b{res}"
            if res == 4:
                sd[f"{block}.const"] = torch.randn(out_ch, 4, 4)
            sd[f"{block}.resample_filter"] = resample_filter()
            layers = ["conv1"] if res == 4 else ["conv0", "conv1"]
            for name in layers:
                in_ch = spec.channels(res // 2) if name == "conv0" else out_ch
                p = f"{block}.{name}"
                sd[f"{p}.weight"] = torch.randn(out_ch, in_ch, 3, 3)
                sd[f"{p}.noise_strength"] = torch.randn([]) * 0.3
                sd[f"{p}.bias"] = torch.randn(out_ch) * 0.2
                sd[f"{p}.resample_filter"] = resample_filter()
                sd[f"{p}.noise_const"] = torch.randn(res, res)
                sd[f"{p}.affine.weight"] = torch.randn(in_ch, w)
                sd[f"{p}.affine.bias"] = 1 + 0.2 * torch.randn(in_ch)
            sd[f"{block}.torgb.weight"] = torch.randn(3, out_ch, 1, 1)
            sd[f"{block}.torgb.bias"] = torch.randn(3) * 0.2
            sd[f"{block}.torgb.affine.weight"] = torch.randn(out_ch, w)
            sd[f"{block}.torgb.affine.bias"] = 1 + 0.2 * torch.randn(out_ch)
    return sd


# ---- persistent-object records ------------------------------------------------------------------

#: What a hand-built record's ``module_src`` says by default: a reader must never run it.
DEFAULT_MODULE_SRC = "# NVlabs' networks module would be here; a reader must never run it\n"


def _reconstruct_persistent_obj(meta: dict) -> object:  # pragma: no cover - never called
    raise RuntimeError("stand-in for pickling only")


class _EasyDict(dict):
    """Stand-in pickled as ``dnnlib.util.EasyDict`` (NVlabs' init kwargs are EasyDicts)."""


def _easy(value: object) -> object:
    if isinstance(value, dict):
        return _EasyDict({k: _easy(v) for k, v in value.items()})
    return value


class _Persistent:
    """Pickles as NVlabs' ``persistent_class.__reduce__`` does."""

    def __init__(self, class_name: str, state: dict, module_src: str) -> None:
        self.meta = {"type": "class", "version": 6, "module_src": module_src,
                     "class_name": class_name, "state": state}

    def __reduce__(self) -> tuple:
        return (_reconstruct_persistent_obj, (self.meta,))


def _module_state(params: dict, buffers: dict, modules: dict, attrs: dict,
                  init_kwargs: dict) -> dict:
    """An ``nn.Module.__dict__`` as NVlabs' pickles hold it (hook tables left out)."""
    return {"training": False,
            "_parameters": OrderedDict((k, torch.nn.Parameter(v.clone(), requires_grad=False))
                                       for k, v in params.items()),
            "_buffers": OrderedDict((k, v.clone()) for k, v in buffers.items()),
            "_non_persistent_buffers_set": set(), "_modules": OrderedDict(modules), **attrs,
            "_init_args": (), "_init_kwargs": _easy(init_kwargs)}


def generator_record(spec: NVSpec, sd: dict[str, torch.Tensor], *,
                     module_src: str = DEFAULT_MODULE_SRC) -> _Persistent:
    """``G``/``G_ema`` as NVlabs pickles it, holding the tensors of ``sd`` (NVlabs names)."""

    def rec(cls: str, prefix: str, params: list[str], buffers: list[str], modules: dict,
            attrs: dict, kwargs: dict) -> _Persistent:
        pick = {n: sd[prefix + n] for n in params if prefix + n in sd}
        bufs = {n: sd[prefix + n] for n in buffers if prefix + n in sd}
        return _Persistent(cls, _module_state(pick, bufs, modules, attrs, kwargs), module_src)

    def fc(prefix: str, in_f: int, out_f: int, act: str, lr: float, bias_init: float = 0):
        attrs = {"activation": act, "weight_gain": np.float64(lr / np.sqrt(in_f)),
                 "bias_gain": lr}
        return rec("FullyConnectedLayer", prefix, ["weight", "bias"], [], {}, attrs,
                   {"in_features": in_f, "out_features": out_f, "activation": act,
                    "lr_multiplier": lr, "bias_init": bias_init})

    w = spec.w_dim
    clamp = spec.conv_clamp
    blocks = {}
    for res in spec.resolutions:
        out_ch, b = spec.channels(res), f"synthesis.b{res}."
        mods: dict = {}
        for name in (["conv1"] if res == 4 else ["conv0", "conv1"]):
            in_ch = spec.channels(res // 2) if name == "conv0" else out_ch
            up = 2 if name == "conv0" else 1
            p = f"{b}{name}."
            mods[name] = rec(
                "SynthesisLayer", p, ["weight", "noise_strength", "bias"],
                ["resample_filter", "noise_const"],
                {"affine": fc(p + "affine.", w, in_ch, "linear", 1, 1)},
                {"resolution": res, "up": up, "use_noise": True, "activation": "lrelu",
                 "conv_clamp": clamp, "padding": 1, "act_gain": SQRT2},
                {"w_dim": w, "resolution": res, "up": up, "conv_clamp": clamp})
        mods["torgb"] = rec("ToRGBLayer", b + "torgb.", ["weight", "bias"], [],
                            {"affine": fc(b + "torgb.affine.", w, out_ch, "linear", 1, 1)},
                            {"conv_clamp": clamp, "weight_gain": np.float64(1 / np.sqrt(out_ch))},
                            {"w_dim": w, "conv_clamp": clamp})
        blocks[f"b{res}"] = rec(
            "SynthesisBlock", b, ["const"], ["resample_filter"], mods,
            {"in_channels": 0 if res == 4 else spec.channels(res // 2), "w_dim": w,
             "resolution": res, "img_channels": 3, "is_last": res == spec.size,
             "architecture": "skip", "use_fp16": False, "channels_last": False,
             "num_conv": len(mods) - 1, "num_torgb": 1},
            {"resolution": res, "architecture": "skip", "conv_clamp": clamp})
    synthesis = rec("SynthesisNetwork", "synthesis.", [], [], blocks,
                    {"w_dim": w, "img_resolution": spec.size, "img_channels": 3,
                     "block_resolutions": spec.resolutions}, {"w_dim": w})
    fcs = {f"fc{i}": fc(f"mapping.fc{i}.", w, w, "lrelu", spec.lr_multiplier)
           for i in range(spec.mapping_layers)}
    mapping = rec("MappingNetwork", "mapping.", [], ["w_avg"], fcs,
                  {"z_dim": w, "c_dim": 0, "w_dim": w, "num_ws": 2 * len(spec.resolutions),
                   "num_layers": spec.mapping_layers, "w_avg_beta": 0.995},
                  {"num_layers": spec.mapping_layers})
    return rec("Generator", "", [], [], {"synthesis": synthesis, "mapping": mapping},
               {"z_dim": w, "c_dim": 0, "w_dim": w, "img_resolution": spec.size,
                "img_channels": 3}, spec.init_kwargs())


@contextmanager
def _pickled_as(modules: dict[str, dict[str, object]]) -> Iterator[None]:
    """Make ``pickle`` name our stand-ins by NVlabs' module paths, only while dumping."""
    saved = {}
    for name, attrs in modules.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod_name = ".".join(parts[:i])
            if mod_name in saved or (i < len(parts) and mod_name in sys.modules):
                continue
            saved[mod_name] = sys.modules.get(mod_name)
            sys.modules[mod_name] = types.ModuleType(mod_name)
        sys.modules[name].__dict__.update(attrs)
        for obj_name, obj in attrs.items():
            obj.__module__ = name  # type: ignore[attr-defined]
            obj.__qualname__ = obj_name  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for mod_name, old in saved.items():
            if old is None:
                sys.modules.pop(mod_name, None)
            else:
                sys.modules[mod_name] = old


_NVLABS_GLOBALS = {"torch_utils.persistence": {"_reconstruct_persistent_obj":
                                               _reconstruct_persistent_obj},
                   "dnnlib.util": {"EasyDict": _EasyDict}}


def dump_nvlabs(obj: object, path: Path) -> Path:
    """Pickle ``obj`` (records, tensors, plain data) as NVlabs' training loop does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _pickled_as(_NVLABS_GLOBALS), path.open("wb") as fh:
        pickle.dump(obj, fh)
    return path


def write_snapshot(path: Path, spec: NVSpec = NVSpec(), *, seed: int = 0,
                   module_src: str = DEFAULT_MODULE_SRC, g_ema: object = None) -> Path:
    """A ``network-snapshot-*.pkl`` of a generator of ``spec``: ``G_ema`` holds
    :func:`nvlabs_state_dict` ``(spec, seed)``; ``G`` other weights (a reader must not take
    it); ``D`` and ``augment_pipe`` small records.  ``g_ema`` replaces the ``G_ema`` record."""
    sd = nvlabs_state_dict(spec, seed)
    raw = {k: v + 0.5 if v.is_floating_point() and "filter" not in k else v
           for k, v in sd.items()}
    d = _Persistent("Discriminator", _module_state(
        {"b4.out.weight": torch.ones(1, 4)}, {}, {}, {}, {"c_dim": 0}), module_src)
    data = {"G": generator_record(spec, raw, module_src=module_src),
            "D": d,
            "G_ema": g_ema if g_ema is not None else generator_record(spec, sd,
                                                                      module_src=module_src),
            "augment_pipe": None,
            "training_set_kwargs": _easy({"class_name": "training.dataset.ImageFolderDataset",
                                          "path": "afhqcat.zip", "resolution": spec.size,
                                          "use_labels": False, "xflip": True})}
    return dump_nvlabs(data, path)


# ---- TensorFlow pickles ---------------------------------------------------------------------

class _TFNetwork:
    """Pickles as ``dnnlib.tflib.network.Network`` does (NEWOBJ of the class, then BUILD with
    its ``__getstate__`` dict); named so only while dumping (:func:`_pickled_as`)."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def __getstate__(self) -> dict:
        return self._state


def tf_variables(spec: NVSpec, sd: dict[str, torch.Tensor]) -> dict[str, dict[str, np.ndarray]]:
    """NVlabs PyTorch names → the TensorFlow variables NVlabs' ``legacy.py`` maps them from
    (its transposes, flip and ``mod_bias + 1`` undone), per component (``""``, mapping,
    synthesis)."""

    def a(t: torch.Tensor) -> np.ndarray:
        return t.numpy().astype(np.float32)

    top = {"dlatent_avg": a(sd["mapping.w_avg"])}
    mapping = {}
    for i in range(spec.mapping_layers):
        mapping[f"Dense{i}/weight"] = a(sd[f"mapping.fc{i}.weight"]).T.copy()
        mapping[f"Dense{i}/bias"] = a(sd[f"mapping.fc{i}.bias"])
    syn: dict[str, np.ndarray] = {"4x4/Const/const": a(sd["synthesis.b4.const"])[None]}
    noise = 0
    for res in spec.resolutions:
        names = {"conv1": "Conv"} if res == 4 else {"conv0": "Conv0_up", "conv1": "Conv1"}
        for layer, tf in names.items():
            p, q = f"synthesis.b{res}.{layer}", f"{res}x{res}/{tf}"
            w = a(sd[f"{p}.weight"]).transpose(2, 3, 1, 0)
            syn[f"{q}/weight"] = np.ascontiguousarray(w[::-1, ::-1] if layer == "conv0" else w)
            syn[f"{q}/bias"] = a(sd[f"{p}.bias"])
            syn[f"{q}/noise_strength"] = a(sd[f"{p}.noise_strength"])
            syn[f"{q}/mod_weight"] = a(sd[f"{p}.affine.weight"]).T.copy()
            syn[f"{q}/mod_bias"] = a(sd[f"{p}.affine.bias"]) - 1
            syn[f"noise{noise}"] = a(sd[f"{p}.noise_const"])[None, None]
            noise += 1
        p, q = f"synthesis.b{res}.torgb", f"{res}x{res}/ToRGB"
        syn[f"{q}/weight"] = np.ascontiguousarray(a(sd[f"{p}.weight"]).transpose(2, 3, 1, 0))
        syn[f"{q}/bias"] = a(sd[f"{p}.bias"])
        syn[f"{q}/mod_weight"] = a(sd[f"{p}.affine.weight"]).T.copy()
        syn[f"{q}/mod_bias"] = a(sd[f"{p}.affine.bias"]) - 1
    return {"": top, "mapping": mapping, "synthesis": syn}


def tf_static_kwargs(spec: NVSpec) -> dict:
    """The ``static_kwargs`` of NVlabs' TF ``G_main`` for ``spec`` (``fmap_base`` is half the
    PyTorch ``channel_base``, as ``legacy.py`` doubles it)."""
    kw = {"latent_size": spec.w_dim, "dlatent_size": spec.w_dim, "label_size": 0,
          "resolution": spec.size, "num_channels": 3, "mapping_layers": spec.mapping_layers,
          "mapping_lrmul": spec.lr_multiplier, "fmap_base": spec.channel_base // 2,
          "fmap_max": spec.channel_max, "architecture": "skip"}
    if spec.conv_clamp is not None:
        kw.update(conv_clamp=spec.conv_clamp, num_fp16_res=0)
    return kw


def _tf_network(name: str, variables: dict[str, np.ndarray], components: dict,
                static_kwargs: dict, version: int) -> _TFNetwork:
    return _TFNetwork({"version": version, "name": name, "static_kwargs": static_kwargs,
                       "components": components, "build_module_src": DEFAULT_MODULE_SRC,
                       "build_func_name": name, "variables": list(variables.items())})


def write_tf_pickle(path: Path, spec: NVSpec = NVSpec(), *, seed: int = 0,
                    extra_synthesis: dict[str, np.ndarray] | None = None,
                    static_kwargs: dict | None = None) -> Path:
    """A TensorFlow ``(G, D, Gs)`` pickle whose ``Gs`` holds :func:`nvlabs_state_dict`
    ``(spec, seed)``; ``G`` holds other weights.  ``extra_synthesis`` adds variables (e.g. a
    ``Skip/weight``); ``static_kwargs`` overrides those of :func:`tf_static_kwargs`.
    Version 5 (StyleGAN2-ADA's TF networks) when ``spec`` has a ``conv_clamp``, else 4."""
    version = 5 if spec.conv_clamp is not None else 4
    kw = {**tf_static_kwargs(spec), **(static_kwargs or {})}

    def net(sd: dict[str, torch.Tensor]) -> _TFNetwork:
        v = tf_variables(spec, sd)
        syn = {**v["synthesis"], **(extra_synthesis or {})}
        comps = {"mapping": _tf_network("G_mapping", v["mapping"], {}, {}, version),
                 "synthesis": _tf_network("G_synthesis", syn, {}, {}, version)}
        return _tf_network("G", v[""], comps, kw, version)

    sd = nvlabs_state_dict(spec, seed)
    d = _tf_network("D", {"Output/weight": np.ones((4, 1), np.float32)}, {}, {}, version)
    g = net({k: v + 0.5 for k, v in sd.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with _pickled_as({"dnnlib.tflib.network": {"Network": _TFNetwork}}), \
            path.open("wb") as fh:
        pickle.dump((g, d, net(sd)), fh, protocol=3)
    return path
