"""The editing pipeline as a Python API: :class:`Editor` (what the CLI and notebooks call).

    >>> from clipinvert import Editor
    >>> ed = Editor("faces", device="auto")
    >>> out = ed.edit([Image.open("face.png")], "she has wavy blond hair")
    >>> out.pil()[0].save("edited.png")

The method itself is :class:`~clipinvert.model.CLIPInverter` (docs/forward-pass.md#overview);
an :class:`Editor` loads its parts from the registry, puts them on a device and runs it under
``no_grad`` on PIL images or tensors.  Weights load lazily, the first time a method needs them.
Decoding uses the generator's stored noise buffers: the same input always gives the same output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import imaging
from .checkpoints import (
    CLIPInverterWeights,
    E4EWeights,
    build_generator,
    load_clipinverter,
    load_e4e,
    load_stylegan2,
)
from .errors import UsageError, WeightsError
from .model import RESIDUAL_SCALE, CLIPInverter, EditOutput, Encoded
from .nets import Encoder4Editing, Generator
from .nets.stylegan2 import FORMULATIONS
from .registry import Domain, Registry

__all__ = ["RESIDUAL_SCALE", "DTYPES", "Editor", "Encoded", "Result", "resolve_device",
           "resolve_dtype"]

Condition = str | Image.Image | torch.Tensor  # prompt, reference image, or a raw CLIP embedding
ImagesIn = Sequence[Image.Image] | torch.Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: ``--batch-size auto`` on the CPU.  Measured (benchmarks/bench_edit.py, docs/performance.md):
#: with the generator decoding one sample at a time there (:attr:`Generator.micro_batch`),
#: per-image time no longer grows with the batch, and a batch of 4 lets the encoder and adapter
#: share their weight reads across images without a large memory peak.
CPU_AUTO_BATCH = 4
#: Decoding micro-batch on the CPU (see :attr:`Generator.micro_batch`).
CPU_DECODE_MICRO_BATCH = 1
#: GPU memory one more image needs through the whole edit at 1024 px in float32, for
#: ``--batch-size auto``.  Measured on an H200: the edit's peak grows by 0.51 GiB per image
#: (5.8 GiB at B = 8, 34.2 GiB at B = 64; float16 half that); 0.75 GiB leaves room for
#: another program's memory.  An out-of-memory error halves the batch anyway.
CUDA_BYTES_PER_IMAGE_1024 = 0.75 * 2**30
#: ``--batch-size auto`` on a GPU never goes past 8.  Measured on an H200 at 1024 px
#: (docs/performance.md#batch-size-auto): per image, B = 8 decodes 2.2× (float32) to 3.6×
#: (float16) faster than B = 1, but float32 at B = 32 took 3.6× longer than at B = 8 with
#: PyTorch's default cuDNN choices, and at B = 64 the last layers pass 2³¹ elements and took 9×
#: longer.  cuDNN's autotuner fixes B = 32 but costs seconds per new batch shape, more than it
#: saves in a run that is bound by writing images.
CUDA_AUTO_MAX = 8
#: How the generator runs its modulated convolutions, per device type (one of
#: :data:`~clipinvert.nets.stylegan2.FORMULATIONS`; benchmarks/bench_generator.py measures
#: them, docs/performance.md#the-generators-formulation).  ``CLIPINVERT_DECODE`` overrides.
#: On the GPU too the released fused form is as fast or faster from B = 8 on (an H200, float32
#: and float16), and the channels-last unfused form is 1.6–1.9× slower there.
DECODE_FORMULATION = {"cpu": "fused", "cuda": "fused"}
#: Batches of uint8 input pixels staged at once (:meth:`Editor.preprocess_pixels`): on CUDA a
#: staging buffer is written again only after the copy issued from it this many batches ago,
#: which has long finished, so its event never makes the model's thread wait in practice.
STAGING_RING = 3


def cuda_auto_batch(free_bytes: int, size: int, dtype: torch.dtype) -> int:
    """``--batch-size auto`` on a GPU with ``free_bytes`` free: as many images as 80 % of it
    holds at :data:`CUDA_BYTES_PER_IMAGE_1024` per image (scaled by resolution² and dtype
    width), at most :data:`CUDA_AUTO_MAX`."""
    per_image = CUDA_BYTES_PER_IMAGE_1024 * (size / 1024) ** 2 * (torch.finfo(dtype).bits / 32)
    return int(max(1, min(CUDA_AUTO_MAX, 0.8 * free_bytes // per_image)))


def decode_formulation(device: torch.device) -> str:
    """The generator's formulation on ``device``: ``CLIPINVERT_DECODE`` when set (fused,
    unfused or unfused-cl), else the measured choice in :data:`DECODE_FORMULATION`."""
    form = os.environ.get("CLIPINVERT_DECODE", "").strip().lower()
    if not form:
        return DECODE_FORMULATION.get(device.type, "fused")
    if form not in FORMULATIONS:
        raise UsageError(f"CLIPINVERT_DECODE={form!r}: choose from {', '.join(FORMULATIONS)}")
    return form


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; an unavailable device is a usage error."""
    if isinstance(spec, torch.device):
        return spec
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"unknown device {spec!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps asked for, but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {spec!r}")
    return dev


def resolve_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    try:
        dtype = DTYPES[spec]
    except KeyError:
        raise UsageError(f"unknown dtype {spec!r} (use {', '.join(DTYPES)})") from None
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("float16 is not supported on the CPU; use float32 or bfloat16")
    return dtype


@dataclass
class Result:
    """Decoded images ``(B,3,S,S)`` in ≈[-1,1] and the latents that produced them."""

    images: torch.Tensor
    latents: torch.Tensor  # W+ fed to the generator (before remapping)
    remapped: torch.Tensor | None = None  # conv latents after CLIPRemapper, if it ran
    embedding: torch.Tensor | None = None  # the conditioning vector(s)

    def pil(self) -> list[Image.Image]:
        return imaging.to_pil(self.images)


class Editor:
    """Invert, edit and interpolate images of one domain.  Safe to reuse across batches."""

    def __init__(self, domain: str = "faces", *, registry: Registry | None = None,
                 models: Path | str | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "float32", download: bool | None = None,
                 offline: bool | None = None, trust_checkpoint: bool = False) -> None:
        """``download`` consents to fetching missing weights from the registry's URLs (default:
        no);
        ``offline`` forbids any network use (default: $CLIPINVERT_OFFLINE / $HF_HUB_OFFLINE);
        ``trust_checkpoint`` lets pickles load arbitrary objects — only for files you vouch for.
        A ``registry`` passed in keeps its own ``download``/``offline`` unless these are given:
        a command that shares its registry with the Editor (``eval benchmark`` edits, then
        scores) must not lose the user's ``--download``/``--offline`` half-way.
        """
        self.registry = registry or Registry.load(models)
        if registry is None or download is not None:
            self.registry.download = bool(download)
        if registry is None or offline is not None:
            self.registry.offline = offline
        self.trust = trust_checkpoint
        self.domain: Domain = self.registry.domain(domain)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, tuple[int, int]] = {}  # prompt -> (tokens, CLIP's context)
        self.loaded: dict[str, Path] = {}  # role -> file actually loaded (for run reports)
        # uint8 staging buffers for preprocess_pixels: (buffer, event of its last H2D copy)
        self._ring: list[tuple[torch.Tensor, object | None]] = []
        self._ring_pos = -1

    @classmethod
    def from_files(cls, *, e4e: Path | str, clipinverter: Path | str | None = None,
                   clip: Path | str | None = None, clip_arch: str = "ViT-B-32-quickgelu",
                   stylegan2: Path | str | None = None, device: str | torch.device = "auto",
                   dtype: str | torch.dtype = "float32",
                   trust_checkpoint: bool = False) -> Editor:
        """An editor over explicit files, without any models.toml (handy in notebooks)."""
        table: dict[str, object] = {"resolution": 0, "align": "none", "clip_arch": clip_arch}
        for role, p in (("e4e", e4e), ("clipinverter", clipinverter), ("clip", clip),
                        ("stylegan2", stylegan2)):
            if p is not None:
                table[role] = str(Path(p).expanduser().resolve())
        reg = Registry()
        reg.add_mapping({"domains": {"files": table}}, Path.cwd() / "<from_files>")
        return cls("files", registry=reg, device=device, dtype=dtype,
                   trust_checkpoint=trust_checkpoint)

    # ---- lazily loaded parts -------------------------------------------------------------
    def _locate(self, role: str) -> Path:
        path = self.registry.locate(self.domain, role)
        self.loaded[role] = path
        return path

    def _to(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(device=self.device, dtype=self.dtype)
        if isinstance(module, Generator):
            module.set_formulation(decode_formulation(self.device))
            if self.device.type == "cpu":
                module.micro_batch = CPU_DECODE_MICRO_BATCH
        return module

    def auto_batch_size(self) -> int:
        """``--batch-size auto``: the fastest per image on the CPU (a measured constant), on a
        GPU as many images as the free memory holds by the calibrated estimate (capped at
        :data:`CUDA_AUTO_MAX`; the folder run halves it on out-of-memory)."""
        if self.device.type != "cuda":
            return CPU_AUTO_BATCH
        free, _ = torch.cuda.mem_get_info(self.device)
        return cuda_auto_batch(free, self.domain.resolution or 1024, self.dtype)

    @cached_property
    def e4e(self) -> E4EWeights:
        weights = load_e4e(self._locate("e4e"), trust=self.trust)
        self._to(weights.encoder)
        if self.device.type == "cpu":
            # channels-last convolutions: 4 % faster for the IR-SE50 body on the CPU
            # (docs/performance.md); its input is made channels-last in :meth:`preprocess`
            weights.encoder.to(memory_format=torch.channels_last)
        weights.latent_avg = weights.latent_avg.to(self.device, self.dtype)
        return weights

    @cached_property
    def inverter(self) -> CLIPInverterWeights:
        weights = load_clipinverter(self._locate("clipinverter"), trust=self.trust)
        self._to(weights.adapter)
        self._to(weights.decoder)
        self._check_generator(weights.decoder, "CLIPInverter decoder")
        taps = self.e4e.encoder.tap_widths
        if weights.adapter.widths != taps:
            raise WeightsError(
                f"CLIPInverter adapter ({self.loaded['clipinverter']}) modulates features of "
                f"widths {weights.adapter.widths}, but the e4e encoder of domain "
                f"{self.domain.name!r} gives {taps}: the files belong to different models")
        return weights

    @cached_property
    def generator(self) -> Generator:
        """The decoder for inversions: the CLIPInverter decoder (without text) when the domain has
        one, so ``invert`` and the first interpolation frame match exactly; else e4e's own."""
        if "clipinverter" in self.domain.weights:
            return self.inverter.decoder
        if "stylegan2" in self.domain.weights and not self.e4e.decoder_sd:
            g, _ = load_stylegan2(self._locate("stylegan2"), trust=self.trust)
        else:
            g = build_generator(self.e4e.decoder_sd, "e4e decoder", self.loaded["e4e"])
        self._to(g)
        self._check_generator(g, "e4e decoder")
        return g

    @cached_property
    def model(self) -> CLIPInverter:
        """The method as one module (:class:`~clipinvert.model.CLIPInverter`) over the loaded
        parts: the CLIPInverter decoder and adapter when the domain has them, else an
        inversion-only model on e4e's own decoder."""
        adapter = self.inverter.adapter if "clipinverter" in self.domain.weights else None
        return CLIPInverter(self.e4e.encoder, self.generator, self.e4e.latent_avg,
                            adapter).eval()

    @cached_property
    def clip(self):  # -> ClipEncoder (imported lazily: open_clip is slow to import)
        from .clip_encoder import ClipEncoder

        return ClipEncoder(self.domain.clip_arch, self._locate("clip"), device=self.device,
                           base_dir=self.domain.base_dir, trust=self.trust)

    def _check_generator(self, g: Generator, what: str) -> None:
        enc = self.e4e.encoder
        if (enc.n_styles, enc.style_dim) != (g.n_latent, g.style_dim):
            raise WeightsError(
                f"{what} ({g.size}px, W+ {g.n_latent}×{g.style_dim}) does not match the e4e "
                f"encoder ({enc.n_styles}×{enc.style_dim} styles) of domain {self.domain.name!r}")
        if self.domain.resolution and g.size != self.domain.resolution:
            raise WeightsError(f"domain {self.domain.name!r} says resolution "
                               f"{self.domain.resolution} but its {what} is {g.size}px")

    # ---- building blocks -----------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """The encoder's input side (256 for the released e4e); known without loading it."""
        return Encoder4Editing.input_size

    def preprocess(self, images: ImagesIn) -> torch.Tensor:
        """PIL images or a ``(B,3,H,W)`` tensor in [-1,1] → the encoder's 256×256 input."""
        if isinstance(images, torch.Tensor):
            x = images
            if x.ndim != 4 or x.shape[1] != 3:
                raise UsageError(f"expected images as (B,3,H,W), got {tuple(x.shape)}")
            if x.shape[-2:] != (self.input_size, self.input_size):
                x = torch.nn.functional.interpolate(x.float(), size=(self.input_size,) * 2,
                                                    mode="bilinear", align_corners=False)
        else:
            x = imaging.to_tensor(list(images), self.input_size)
        if self.device.type == "cuda" and x.device.type == "cpu":
            # page-locked memory: the copy runs asynchronously, queued before the encoder
            return x.pin_memory().to(self.device, self.dtype, non_blocking=True)
        x = x.to(self.device, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def _staging(self, n: int, side: int) -> tuple[int, torch.Tensor]:
        """A ``(≥n, side, side, 3)`` uint8 buffer of the ring (page-locked on CUDA, so the
        copy to the GPU is asynchronous), free to overwrite."""
        self._ring_pos = k = (self._ring_pos + 1) % STAGING_RING
        if k < len(self._ring):
            buf, copied = self._ring[k]
            if buf.shape[0] >= n and buf.shape[1] == side:
                if copied is not None:
                    copied.synchronize()  # type: ignore[attr-defined] # long done, see STAGING_RING
                return k, buf
        buf = torch.empty((n, side, side, 3), dtype=torch.uint8,
                          pin_memory=self.device.type == "cuda")
        if k < len(self._ring):
            self._ring[k] = (buf, None)
        else:
            self._ring.append((buf, None))
        return k, buf

    def preprocess_pixels(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``(S, S, 3)`` images already at the encoder's input size (readers make them:
        :func:`~clipinvert.imaging.to_pixels`) → the encoder's input, normalised on the device.

        Only bytes cross to the GPU (a quarter of the float batch), from a pinned buffer of a
        ring, asynchronously; the normalisation is :func:`~clipinvert.imaging.normalize_pixels`,
        so the values equal :meth:`preprocess`'s of the same images.
        """
        n = len(pixels)
        side = self.input_size
        k, buf = self._staging(n, side)
        host = buf.numpy()
        for i, p in enumerate(pixels):
            if p.shape != (side, side, 3):
                raise UsageError(f"pixels of shape {p.shape}, expected {(side, side, 3)}")
            host[i] = p
        if self.device.type == "cuda":
            x = buf[:n].to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            self._ring[k] = (buf, copied)
            return imaging.normalize_pixels(x).to(self.dtype)
        x = imaging.normalize_pixels(buf[:n].to(self.device)).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    @torch.no_grad()
    def encode_pixels(self, pixels: Sequence[np.ndarray]) -> Encoded:
        """:meth:`encode` of images the readers already resized (:meth:`preprocess_pixels`)."""
        return self.model.encode(self.preprocess_pixels(pixels))

    @torch.no_grad()
    def encode(self, images: ImagesIn) -> Encoded:
        """Run the IR-SE50 body once; returns the inversion and the features edits reuse."""
        return self.model.encode(self.preprocess(images))

    @cached_property
    def text_store(self):  # -> TextCache
        """Embeddings of prompts seen before, on disk (:mod:`clipinvert.text_cache`): a run
        whose prompts are all there never imports or loads CLIP."""
        from .text_cache import TextCache

        return TextCache(self._locate("clip"), self.domain.clip_arch, self.device,
                         torch.float32)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Raw CLIP text embeddings ``(N, D)``, computed once per distinct prompt (and kept on
        disk for later runs)."""
        todo = []
        for p in dict.fromkeys(prompts):
            if p in self._text_cache:
                continue
            if (hit := self.text_store.get(p)) is not None:
                self._text_cache[p] = hit.embedding.to(self.device)
                self._tokens[p] = (hit.tokens, hit.context_length)
            else:
                todo.append(p)
        if todo:
            clip = self.clip
            for p, e in zip(todo, clip.encode_text(todo), strict=True):
                self._text_cache[p] = e.float()
                self._tokens[p] = (clip.token_count(p), clip.context_length)
                self.text_store.put(p, e, *self._tokens[p])
        return torch.stack([self._text_cache[p] for p in prompts])

    def prompt_tokens(self, prompt: str) -> tuple[int, int]:
        """``(tokens, context_length)``: how many tokens ``prompt`` takes and how many CLIP
        reads (more than that and the end is ignored)."""
        if prompt not in self._tokens:
            self.embed_text([prompt])
        return self._tokens[prompt]

    @torch.no_grad()
    def embed_images(self, references: Sequence[Image.Image]) -> torch.Tensor:
        """Raw CLIP image embeddings of reference images, used in place of a text embedding."""
        return self.clip.encode_image(list(references)).float()

    def embed(self, condition: Condition) -> torch.Tensor:
        """One conditioning vector ``(D,)`` from a prompt, a reference image or an embedding."""
        if isinstance(condition, str):
            return self.embed_text([condition])[0]
        if isinstance(condition, Image.Image):
            return self.embed_images([condition])[0]
        if isinstance(condition, torch.Tensor):
            return condition.reshape(-1).float()
        raise UsageError(f"cannot condition an edit on a {type(condition).__name__}")

    def _batch_embedding(self, condition: Condition | torch.Tensor, batch: int) -> torch.Tensor:
        t = condition if isinstance(condition, torch.Tensor) and condition.ndim == 2 \
            else self.embed(condition)[None]
        if t.shape[0] not in (1, batch):
            raise UsageError(f"{t.shape[0]} embeddings for a batch of {batch} images")
        return t.to(self.device).expand(batch, -1)

    @torch.no_grad()
    def residual(self, encoded: Encoded, embedding: torch.Tensor) -> torch.Tensor:
        """Δ: the text-modulated features through e4e's frozen FPN + style heads (no latent_avg)."""
        return self.model.residual(encoded.features, embedding)

    @torch.no_grad()
    def decode(self, w: torch.Tensor, embedding: torch.Tensor | None = None,
               mix: float = 1.0) -> torch.Tensor:
        """Generator output ``(B,3,S,S)``; with an embedding, through the CLIPRemapper."""
        if embedding is None:
            return self.generator(w)
        return self.inverter.decoder(w, embedding, mix=mix)

    # ---- the three operations ------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images: ImagesIn | Encoded) -> Result:
        """e4e reconstruction: W+ latents and their decoding."""
        enc = images if isinstance(images, Encoded) else self.encode(images)
        return Result(self.decode(enc.w), enc.w)

    @torch.no_grad()
    def edit(self, images: ImagesIn | Encoded, condition: Condition,
             strength: float = 1.0) -> Result:
        """Text- (or reference-image-) driven edit; ``strength`` scales the residual and the
        remapper blend together (0 = the inversion, 1 = the released behaviour)."""
        enc = images if isinstance(images, Encoded) else self.encode(images)
        t = self._batch_embedding(condition, len(enc))
        return self._edit_at(enc, t, self.residual(enc, t), strength)

    def _edit_at(self, enc: Encoded, t: torch.Tensor, delta: torch.Tensor,
                 alpha: float) -> Result:
        out: EditOutput = self.model.edit_encoded(enc, t, delta, alpha)
        return Result(out.images, out.w_hat, out.remapped, t)

    @torch.no_grad()
    def interpolate(self, images: ImagesIn | Encoded, condition: Condition, steps: int,
                    strength: float = 1.0) -> list[Result]:
        """``steps`` results walking from the inversion (first, exactly ``invert``'s image) to
        the edit (last, exactly ``edit``'s image at the same strength)."""
        if steps < 2:
            raise UsageError("interpolation needs --steps 2 or more")
        return list(self.iter_interpolation(images, condition, steps, strength))

    def iter_interpolation(self, images: ImagesIn | Encoded, condition: Condition, steps: int,
                           strength: float = 1.0) -> Iterator[Result]:
        """Like :meth:`interpolate`, one frame at a time (keeps memory flat for long walks)."""
        with torch.no_grad():
            enc = images if isinstance(images, Encoded) else self.encode(images)
            t = self._batch_embedding(condition, len(enc))
            delta = self.residual(enc, t)
        for k in range(steps):
            alpha = strength if k == steps - 1 else strength * k / (steps - 1)
            with torch.no_grad():
                yield self._edit_at(enc, t, delta, alpha)

    def roles(self, *, edit: bool = True) -> list[str]:
        """The weight roles an operation needs (inversions decode with the CLIPInverter decoder
        when the domain has one, see :attr:`generator`)."""
        roles = ["e4e"]
        if edit or "clipinverter" in self.domain.weights:
            roles.append("clipinverter")
        if edit:
            roles.append("clip")
        return roles

    def locate_all(self, *, edit: bool = True) -> dict[str, Path]:
        """Find every file an operation needs without loading any (all missing ones named in
        one message, see :meth:`Registry.locate_all`)."""
        found = self.registry.locate_all(self.domain, self.roles(edit=edit))
        self.loaded.update(found)
        return found

    def weight_identity(self, *, edit: bool = True) -> dict[str, dict]:
        """``{role: {path, size, mtime_ns, sha256}}`` of the files an operation uses (the
        sha256 is cached, so this costs a hash only the first time a file is seen)."""
        from .weights.cache import file_identity

        return {role: file_identity(p) for role, p in self.locate_all(edit=edit).items()}

    def preload(self, *, edit: bool = True) -> None:
        """Load every file the chosen operation needs now, so missing weights fail before work."""
        self.locate_all(edit=edit)
        _ = self.e4e, self.generator
        if edit:
            # CLIP itself loads on the first prompt not in the text cache (or reference image)
            _ = self.inverter
