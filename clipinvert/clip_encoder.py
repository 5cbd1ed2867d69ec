"""The CLIP text/image encoder that conditions CLIPInverter (docs/forward-pass.md#clip-embedding).

CLIPInverter's adapter and remapper were trained on the *raw* ``encode_text`` output of OpenAI's
CLIP ViT-B/32: 512-d, not L2-normalised, computed without gradient.  Normalising, or using any
other checkpoint of the "same" architecture, silently produces wrong edits, so this module is
deliberately strict about what it loads:

* the architecture is an open_clip model name (``ViT-B-32-quickgelu`` for the released models —
  OpenAI's weights need QuickGELU; plain ``ViT-B-32`` loads the same keys but computes something
  else) or a path to an open_clip model-config JSON (tiny test models, custom towers);
* the model is always built with random init and filled with ``load_state_dict(strict=True)``
  from a file the user already has — open_clip is never asked to fetch a ``pretrained`` tag, so
  nothing here touches the network;
* the weights file may be an open_clip state dict or OpenAI's original TorchScript archive
  (``ViT-B-32.pt``); both carry the same key names for ViT models.  Either is read by
  :func:`~clipinvert.weights.reader.read_weights`, like every weight file: safe by default
  (the archive's code never runs), ``trust`` (``--trust-checkpoint``) lifts the allow-list.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from PIL import Image

from clipinvert.checkpoints import mismatch_summary
from clipinvert.errors import InputError, WeightsError, first_line
from clipinvert.weights.reader import CHECKPOINT, TORCHSCRIPT, read_weights

DEFAULT_ARCH = "ViT-B-32-quickgelu"

# Entries of OpenAI's TorchScript state dict that are model hyper-parameters, not weights; OpenAI's
# own loader deletes them before ``load_state_dict``.
OPENAI_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size")

# How many prompts / images go through the towers at once: bounds peak memory for long prompt
# lists without changing results (rows are independent).
DEFAULT_BATCH_SIZE = 128

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def resolve_arch(arch: str, base_dir: Path | None = None) -> tuple[str, dict | None]:
    """Turn ``arch`` into ``(name, cfg)``: a built-in open_clip name gives ``cfg=None``.

    A value ending in ``.json`` is read as an open_clip model config (the layout of open_clip's
    ``model_configs/*.json``, or an ``open_clip_config.json`` with a ``model_cfg`` key); relative
    paths are taken from ``base_dir`` so a model registry can ship configs next to itself.  The
    config is returned rather than registered with ``open_clip.add_model_config``: that call
    appends to a process-wide search path and lets a file's stem shadow a built-in name, whereas
    :func:`build_clip_model` can instantiate the config directly.
    """
    arch = arch.strip()
    if arch.startswith(("hf-hub:", "local-dir:")):
        raise WeightsError(
            f"CLIP architecture {arch!r}: open_clip 'hf-hub:'/'local-dir:' names are not supported "
            "(they fetch or bundle their own weights); give a model name such as "
            f"{DEFAULT_ARCH} or a path to a model-config .json"
        )
    if arch.lower().endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return path.stem, _read_model_config(path)

    known = open_clip.list_models()
    if arch not in known:
        # The released models need DEFAULT_ARCH, so it always leads the list (OpenAI's own name
        # "ViT-B/32" is closest to plain ViT-B-32, which lacks QuickGELU).
        close = [DEFAULT_ARCH] + [
            n for n in difflib.get_close_matches(arch, known, n=5, cutoff=0.5) if n != DEFAULT_ARCH
        ]
        close = close[:5]
        raise WeightsError(
            f"unknown CLIP architecture {arch!r}; known open_clip names include "
            f"{', '.join(close)} (or give a path to a model-config .json)"
        )
    return arch, None


def _read_model_config(path: Path) -> dict:
    """Load and sanity-check a config JSON so errors name the file, not open_clip internals."""
    if not path.is_file():
        raise WeightsError(f"CLIP model config {path} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(
            f"CLIP model config {path} is not valid JSON: {first_line(err)}"
        ) from err
    cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(cfg, dict):
        raise WeightsError(f"CLIP model config {path} is not a JSON object")
    missing = [
        k
        for k in ("embed_dim", "vision_cfg", "text_cfg")
        if k not in cfg or (k != "embed_dim" and not isinstance(cfg[k], dict))
    ]
    if missing:
        raise WeightsError(
            f"CLIP model config {path} lacks {', '.join(missing)} (not an open_clip model config)"
        )
    return cfg


def build_clip_model(
    name: str, cfg: dict | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Instantiate the open_clip model for ``name``/``cfg`` with random weights, on CPU.

    This mirrors what ``open_clip.create_model(name, pretrained=None)`` builds (same classes,
    same config handling) but also accepts an unregistered config and never downloads: towers
    backed by Hugging Face or timm are refused because constructing them fetches their configs.
    Called under ``torch.device("meta")`` it gives the key/shape layout for free.
    """
    if cfg is None:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise WeightsError(f"unknown CLIP architecture {name!r}")
    _check_native(name, cfg)
    cfg = json.loads(json.dumps(cfg))  # deep copy; open_clip pops keys from what it is given
    custom_text = bool(cfg.pop("custom_text", False))
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    cast_dtype = dtype if dtype in _LOW_PRECISION else None
    try:
        return cls(**cfg, cast_dtype=cast_dtype)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise WeightsError(
            f"CLIP architecture {name} cannot be built from its config: {first_line(err)}"
        ) from err


def _rebuild_meta_buffers(model: torch.nn.Module, arch: str) -> None:
    """Re-make what a checkpoint does not hold after a meta-device build: open_clip's causal
    ``attn_mask`` buffers (non-persistent): −inf above the diagonal, 0 elsewhere, as its
    ``build_causal_mask``/``build_attention_mask`` make them."""
    for module in model.modules():
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.is_meta and mask.ndim == 2 and mask.shape[0] == mask.shape[1]:
            causal = torch.full(tuple(mask.shape), float("-inf"), dtype=mask.dtype).triu_(1)
            module.register_buffer("attn_mask", causal, persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise WeightsError(f"CLIP architecture {arch}: {', '.join(left[:3])} not in the "
                           "checkpoint and not re-made after loading")


def _check_native(name: str, cfg: dict) -> None:
    """Refuse towers (and their tokenizers) that open_clip would fetch from Hugging Face/timm."""
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if (
        "hf_model_name" in text_cfg
        or "hf_tokenizer_name" in text_cfg
        or "timm_model_name" in (vision_cfg)
    ):
        raise WeightsError(
            f"CLIP architecture {name} uses a Hugging Face or timm tower; clipinvert supports "
            "open_clip's native towers only (the others would need downloads)"
        )


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def load_clip_state_dict(path: Path | str, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """CLIP weights as ``{key: tensor}``, from an open_clip state dict or OpenAI's TorchScript
    archive (read for its tensors; none of its code runs).

    The file goes through :func:`~clipinvert.weights.reader.read_weights` like every other
    weight file: the same checks and one-line errors, the same allow-list (``trust`` lifts it),
    and the safetensors cache after the first load (OpenAI's archive is slow to read otherwise).
    """
    obj = read_weights(path, what="CLIP", trust=trust, formats=(CHECKPOINT, TORCHSCRIPT))
    return _as_state_dict(obj, Path(path))


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": …}`` and DataParallel's ``module.`` prefix; drop OpenAI extras."""
    for _ in range(2):  # training checkpoints nest at most once or twice
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"CLIP weights {path} is not a state dict (found {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(f"CLIP weights {path} is not a state dict (non-string key {key!r})")
        if key in OPENAI_NON_WEIGHT_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            plain = value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))
            raise WeightsError(
                f"CLIP weights {path} is not a state dict (entry {key!r} is a "
                f"{type(value).__name__}, not a tensor)"
                + ("" if plain else " — it holds pickled Python objects besides tensors; "
                   "save just the model's state_dict")
            )
        out[key.removeprefix("module.")] = value
    if not out:
        raise WeightsError(f"CLIP weights {path} is not a state dict (no tensors)")
    return out


def check_state_dict_fits(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Raise one readable line when ``state_dict`` would not load strictly into ``model``.

    ``load_state_dict`` reports mismatches as a multi-line dump of every key; users need the
    counts, a few names, and a hint when the file is not CLIP at all (e.g. an e4e checkpoint).
    """
    expected = model.state_dict()
    problem = mismatch_summary(expected, state_dict)
    if problem is None:
        return
    hint = ""
    if not any(k in state_dict for k in expected):
        hint = " — this does not look like a CLIP checkpoint"
    raise WeightsError(f"CLIP weights {path} do not fit {arch}: {problem}{hint}")


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class ClipEncoder:
    """Frozen CLIP producing the raw (unnormalised) embeddings CLIPInverter conditions on.

    Parameters never require grad; :meth:`encode_text` and :meth:`encode_image` run under
    ``torch.no_grad`` (not ``inference_mode``: their outputs feed the trainable adapter, and
    inference tensors cannot be saved for backward).  :meth:`encode_image_tensor` keeps the graph
    so losses can back-propagate through the image tower into generated images.

    ``trust`` is the user's ``--trust-checkpoint`` for the weights file (see
    :func:`load_clip_state_dict`); leave it off unless they asked for it.
    """

    embed_dim: int

    def __init__(
        self,
        arch: str,
        weights: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        base_dir: Path | None = None,
        trust: bool = False,
    ) -> None:
        self.arch, cfg = resolve_arch(arch, base_dir)
        registered = cfg is None
        if cfg is None:
            cfg = open_clip.get_model_config(self.arch)
        _check_native(self.arch, cfg)
        self.weights = Path(weights)
        self.device = torch.device(device)
        self.dtype = dtype
        self.embed_dim = int(cfg["embed_dim"])
        text_cfg = cfg.get("text_cfg", {})
        self.context_length = int(text_cfg.get("context_length", 77))

        # Tokenizer first: it is cheap and a config it cannot serve should fail before the
        # weights are read.
        if registered:
            self.tokenizer = open_clip.get_tokenizer(self.arch)
        else:
            # An unregistered config has no name open_clip could look up; its default text tower
            # uses the packaged BPE vocabulary, exactly what get_tokenizer returns for built-ins.
            self.tokenizer = open_clip.SimpleTokenizer(
                context_length=self.context_length, **text_cfg.get("tokenizer_kwargs", {})
            )
        vocab_size = int(text_cfg.get("vocab_size", 49408))
        n_tokens = len(getattr(self.tokenizer, "encoder", ()))
        if n_tokens > vocab_size:
            raise WeightsError(
                f"CLIP architecture {self.arch} has vocab_size {vocab_size} but its tokenizer "
                f"produces {n_tokens} token ids"
            )

        state_dict = load_clip_state_dict(self.weights, trust=trust)
        # Built on the meta device and given the file's tensors: no random initialisation that
        # the weights overwrite (1.1 s for ViT-B/32 on the CPU, a third of an edit's start-up).
        with torch.device("meta"):
            model = build_clip_model(self.arch, cfg, dtype)
        check_state_dict_fits(model, state_dict, self.weights, self.arch)
        try:
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as err:  # anything the key/shape check above did not foresee
            raise WeightsError(
                f"CLIP weights {self.weights} do not fit {self.arch}: {first_line(err)}"
            ) from err
        del state_dict
        _rebuild_meta_buffers(model, self.arch)
        # assign=True keeps the file's tensors as they are, and OpenAI's archive stores them in
        # float16: without this the towers would run in the file's precision (the image tower
        # then refused float32 pixels). The released code, too, runs CLIP in float32 on the CPU.
        model.float()
        model.to(self.device)
        if dtype in _LOW_PRECISION:
            # open_clip's "fp16"/"bf16" precision: matmul weights in low precision, LayerNorms
            # computed in fp32, as OpenAI ran the model.
            open_clip.convert_weights_to_lp(model, dtype=dtype)
        elif dtype != torch.float32:
            model.to(dtype=dtype)
        model.eval()
        model.requires_grad_(False)
        self.model = model

        # open_clip attaches non-OpenAI mean/std only for pretrained tags, which are never used
        # here; every native CLIP config is preprocessed with OpenAI's statistics.
        size = model.visual.image_size
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_MEAN)
        self.std: tuple[float, ...] = tuple(open_clip.OPENAI_DATASET_STD)
        self.preprocess = open_clip.image_transform(
            self.image_size, is_train=False, mean=self.mean, std=self.std
        )

    def token_count(self, prompt: str) -> int:
        """Tokens ``prompt`` takes, start and end markers included: more than
        :attr:`context_length` means CLIP reads only the beginning of it."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # a tokenizer without a raw BPE encoder: count what fits
            return int((self.tokenizer([prompt])[0] != 0).sum())
        return len(encode(prompt)) + 2

    def encode_text(
        self, prompts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> torch.Tensor:
        """Raw ``encode_text`` of each prompt: ``(N, embed_dim)`` float32 on the model device.

        Prompts longer than the context (77 tokens) are truncated, as open_clip's tokenizer does.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return torch.empty(0, self.embed_dim, device=self.device)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                tokens = self.tokenizer(list(prompts[i : i + batch_size])).to(self.device)
                chunks.append(self.model.encode_text(tokens, normalize=False).float())
        return torch.cat(chunks)

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP eval preprocessing (resize shortest side, centre crop, normalise) → ``(B,3,S,S)``.

        A picture that cannot be converted raises :class:`InputError` naming it, so a batch of
        edits can skip that reference and go on.
        """
        out = []
        for i, image in enumerate(images):
            try:
                out.append(self.preprocess(image))
            except Exception as err:
                name = getattr(image, "filename", "") or f"#{i}"
                raise InputError(
                    f"reference image {name} cannot be used: {first_line(err)}"
                ) from err
        if not out:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack(out)

    def encode_image(
        self, images: Sequence[Image.Image], batch_size: int = DEFAULT_BATCH_SIZE
    ) -> torch.Tensor:
        """Raw ``encode_image`` of PIL images after CLIP preprocessing: ``(B, embed_dim)``."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            return torch.empty(0, self.embed_dim, device=self.device)
        chunks = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                x = self.preprocess_images(images[i : i + batch_size])
                chunks.append(self.encode_image_tensor(x))
        return torch.cat(chunks)

    def encode_image_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``encode_image`` of an already preprocessed ``(B,3,S,S)`` batch, keeping grad.

        The weights are frozen, but gradients flow back to ``x`` (training losses need that).
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected a (B,3,{self.image_size},{self.image_size}) batch, got {tuple(x.shape)}"
            )
        x = x.to(device=self.device, dtype=self.dtype)
        return self.model.encode_image(x, normalize=False).float()
