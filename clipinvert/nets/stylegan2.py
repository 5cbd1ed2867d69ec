"""StyleGAN2 generator in rosinality's state-dict layout, with CLIPInverter's CLIPRemapper.

Module and buffer names are exactly those of the released files (``style.*``, ``conv1.*``,
``convs.*``, ``to_rgbs.*``, ``noises.noise_*`` and, in CLIPInverter decoders, ``affine_mlps.*`` and
``lambdas.*``) so checkpoints load with ``strict=True`` and no renaming table.  The layer sizes are
described by :class:`GeneratorConfig`, which :meth:`GeneratorConfig.from_state_dict` reads off a
checkpoint's shapes: a user can never pick a resolution that does not fit their file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .ops import SQRT2, EqualLinear, FusedLeakyReLU, PixelNorm, make_kernel, upfirdn2d

BLUR_KERNEL = (1, 3, 3, 1)


def fir_buffer() -> torch.Tensor:
    """The value of every FIR-kernel buffer of the generator (``*.blur.kernel`` of upsampling
    convs and ``to_rgbs.*.upsample.kernel``): [1,3,3,1] ⊗ [1,3,3,1] normalised, ×4 (factor²).
    Some circulating checkpoints lack these constants; loaders fill them in from here."""
    return make_kernel(BLUR_KERNEL, gain=4)


def default_channels(size: int, channel_multiplier: int = 2) -> dict[int, int]:
    """rosinality's channel table: 512 up to 32×32, then halving with the multiplier."""
    cm = channel_multiplier
    table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm,
             512: 32 * cm, 1024: 16 * cm, 2048: 8 * cm}
    return {r: c for r, c in table.items() if r <= size}


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild a generator; derived from a checkpoint, not from user flags."""

    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channels: Mapping[int, int] = field(default_factory=dict)
    lr_mlp: float = 0.01
    text_dim: int | None = None  # CLIPRemapper input size (CLIP embed dim); None = plain generator
    remap_hidden: int = 512
    # NVlabs' generators clamp every conv and ToRGB output to ±conv_clamp (256 in their
    # configs) even in float32; rosinality's have no clamp (None).  Not a weight: an imported
    # file records it beside g_ema (docs/new-domain.md#import-a-generator).
    conv_clamp: float | None = None

    def __post_init__(self) -> None:
        log = math.log2(self.size)
        if self.size < 8 or log != int(log):
            raise ValueError(f"generator size must be a power of two ≥ 8, got {self.size}")
        if not self.channels:
            object.__setattr__(self, "channels", default_channels(self.size))
        missing = [2**i for i in range(2, self.log_size + 1) if 2**i not in self.channels]
        if missing:
            raise ValueError(f"no channel count for resolutions {missing}")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        """W+ length: 18 at 1024, 16 at 512, 14 at 256."""
        return 2 * self.log_size - 2

    @property
    def num_noise(self) -> int:
        return 2 * (self.log_size - 2) + 1

    @property
    def num_remap(self) -> int:
        """Latents of ``convs[0..]``, the ones the remapper blends (16 at 1024)."""
        return 2 * (self.log_size - 2)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> GeneratorConfig:
        """Read size, widths and remapper presence off a generator state dict's shapes."""
        n_rgb = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
        if n_rgb == 0 or "conv1.conv.weight" not in sd or "style.1.weight" not in sd:
            raise KeyError("not a StyleGAN2 generator state dict (no to_rgbs/conv1/style keys)")
        size = 2 ** (n_rgb + 2)
        channels = {4: int(sd["conv1.conv.weight"].shape[1])}
        for k in range(n_rgb):
            channels[2 ** (k + 3)] = int(sd[f"convs.{2 * k}.conv.weight"].shape[1])
        n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
        style_dim = int(sd["style.1.weight"].shape[0])
        text_dim = None
        hidden = 512
        if "affine_mlps.0.0.weight" in sd:
            hidden, text_dim = (int(s) for s in sd["affine_mlps.0.0.weight"].shape)
        return cls(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels,
                   text_dim=text_dim, remap_hidden=hidden)


class Blur(nn.Module):
    def __init__(self, kernel: Sequence[int], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel, gain=upsample_factor**2)
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """×2 FIR upsampling of the RGB skip branch: upfirdn2d(up=2, pad=(2,1)), kernel×4."""

    def __init__(self, kernel: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel, gain=factor**2))
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


#: The ways to run a modulated convolution (:class:`ModulatedConv2d`):
#: name → (fused, channels_last).
FORMULATIONS: dict[str, tuple[bool, bool]] = {
    "fused": (True, False), "unfused": (False, False), "unfused-cl": (False, True)}


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution ``conv(x, w·s)``, demodulated per output channel.

    Two formulations of the same maths (docs/performance.md#the-generators-formulation):

    * ``fused`` (the default, as released): per-sample weights ``w·s`` and one grouped
      convolution over the batch.  On the CPU at 1024 px it is 1.1–1.7× faster than the other,
      since it makes one pass less over the largest tensors.
    * not ``fused``: scale the activations by ``s``, one ordinary convolution with the shared
      weight over the whole batch, then scale the output by the demodulation coefficients.
      Ordinary convolutions are what GPU libraries tune best (batched, tensor cores,
      ``channels_last``), so the editor measures and picks per device.

    ``channels_last`` (unfused only) runs the convolution on channels-last activations (the
    blur and the rest stay as they are: measured slower on an H200).
    """

    #: Which formulation runs; set through :meth:`Generator.set_formulation`.
    fused: bool = True
    channels_last: bool = False

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False,
                 blur_kernel: Sequence[int] = BLUR_KERNEL) -> None:
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_ch, out_ch, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1),
                             upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c, h, w_ = x.shape
        assert c == self.in_channel, f"expected {self.in_channel} channels, got {c}"
        k, out_c = self.kernel_size, self.out_channel
        s = self.modulation(style)  # (B, in)
        w = self.weight * self.scale  # (1, out, in, k, k)
        if self.demodulate and x.dtype in (torch.float16, torch.bfloat16):
            # Demodulation makes the result invariant to the scale of s and w, so bring both
            # to max-abs 1 first: the squared sums then cannot overflow in half precision.
            # (Exact maths; only done where rounding needs it.)
            s = s / s.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
            w = w / w.abs().amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-8)
        if not self.fused:
            return self._modulate_activations(x, s, w[0])
        w = w * s.view(b, 1, c, 1, 1)  # (B, out, in, k, k)
        if self.demodulate:
            w = w * torch.rsqrt(w.square().sum([2, 3, 4]) + 1e-8).view(b, out_c, 1, 1, 1)
        x = x.reshape(1, b * c, h, w_)
        if self.upsample:
            w = w.transpose(1, 2).reshape(b * c, out_c, k, k)
            out = F.conv_transpose2d(x, w, stride=2, groups=b)
            return self.blur(out.reshape(b, out_c, *out.shape[-2:]))
        out = F.conv2d(x, w.reshape(b * out_c, c, k, k), padding=self.padding, groups=b)
        return out.reshape(b, out_c, h, w_)

    def _modulate_activations(self, x: torch.Tensor, s: torch.Tensor,
                              w: torch.Tensor) -> torch.Tensor:
        """``conv(x·s, w)·d``: the unfused formulation; ``w`` is the shared (out, in, k, k)."""
        b, c = s.shape
        if self.demodulate and x.dtype in (torch.float16, torch.bfloat16):
            # Here the raw convolution is made before demodulating: unit-L2 rows of w (with
            # |s| <= 1 from forward) keep it no larger than its input, as float16 needs.
            w = w * torch.rsqrt(w.float().square().sum([1, 2, 3], keepdim=True) + 1e-8).to(w.dtype)
        x = x * s.view(b, c, 1, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, w.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, w, padding=self.padding)
        if self.demodulate:
            # Σ_{i,k} (w[o,i,k]·s[i])² = Σ_i s[i]² · Σ_k w[o,i,k]²: a (B, in) × (in, out) product
            d = torch.rsqrt(s.square() @ w.square().sum([2, 3]).t() + 1e-8)  # (B, out)
            out = out * d.view(b, -1, 1, 1)
        return out


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[int] = BLUR_KERNEL) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)
        self.conv_clamp: float | None = None  # set by Generator.set_conv_clamp

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # = activate(noise(conv(x))).  Without autograd the noise, bias, leaky ReLU and √2 are
        # applied in place on the conv output: the fewest passes over the full-resolution
        # tensor.  When a graph is being recorded (training back-propagates through the frozen
        # generator) the same maths runs out of place, since autograd needs the intermediates.
        out = self.conv(x, style)
        shift = self.noise.weight * noise + self.activate.bias.view(1, -1, 1, 1)
        c = self.conv_clamp
        if out.requires_grad or shift.requires_grad:
            out = F.leaky_relu(out + shift, 0.2) * SQRT2
            return out if c is None else out.clamp(-c, c)
        out = F.leaky_relu_(out.add_(shift), 0.2).mul_(SQRT2)
        return out if c is None else out.clamp_(-c, c)


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[int] = BLUR_KERNEL) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.conv_clamp: float | None = None  # set by Generator.set_conv_clamp

    def forward(self, x: torch.Tensor, style: torch.Tensor,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if self.conv_clamp is not None:  # NVlabs clamps this layer's output, before the skip
            out = out.clamp(-self.conv_clamp, self.conv_clamp)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


def _remap_block(text_dim: int, hidden: int, style_dim: int) -> nn.Sequential:
    """One CLIPRemapper MLP: text embedding → a latent for one generator layer."""
    return nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, style_dim))


class Generator(nn.Module):
    """StyleGAN2 generator (rosinality layout), optionally carrying CLIPInverter's CLIPRemapper.

    ``forward(w, text)`` decodes W+ latents ``(B, n_latent, style_dim)``; noise comes from the
    stored ``noises.*`` buffers so decoding is deterministic.  With ``text`` (a raw CLIP
    embedding, ``(B, text_dim)``) and a remapper, the latents of ``convs[j-1]`` are blended
    ``(1−λ)·w + λ·mlp_j(text)`` with ``λ = 0.9·lambdas[j-1]·mix``
    (docs/forward-pass.md#remapper; the released weights use this convex blend).  ``mix`` scales
    the blend so interpolation can walk it from 0.
    """

    #: Decode at most this many samples at a time when no graph is recorded (None: the whole
    #: batch).  On the CPU a 1024 px decode is bound by memory traffic, not arithmetic: eight
    #: samples at once took 1.5–1.8× longer per image than one at a time (docs/performance.md),
    #: so the editor sets 1 there.  The result is the same either way (per-sample maths).
    micro_batch: int | None = None

    def __init__(self, config: GeneratorConfig | None = None, **kwargs: object) -> None:
        super().__init__()
        cfg = config or GeneratorConfig(**kwargs)  # type: ignore[arg-type]
        self.config = cfg
        ch, sd = cfg.channels, cfg.style_dim
        self.size, self.style_dim, self.log_size = cfg.size, sd, cfg.log_size
        self.n_latent, self.num_layers = cfg.n_latent, cfg.num_noise

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(sd, sd, lr_mul=cfg.lr_mlp, activation=True) for _ in range(cfg.n_mlp)],
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, sd)
        self.to_rgb1 = ToRGB(ch[4], sd, upsample=False)

        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for j in range(self.num_layers):
            res = 2 ** ((j + 5) // 2)
            self.noises.register_buffer(f"noise_{j}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for i in range(3, self.log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, sd, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, sd))
            self.to_rgbs.append(ToRGB(out_ch, sd))
            in_ch = out_ch

        if cfg.text_dim is not None:
            self.affine_mlps = nn.ModuleList(
                [_remap_block(cfg.text_dim, cfg.remap_hidden, sd) for _ in range(cfg.num_remap)])
            self.lambdas = nn.ParameterList(
                [nn.Parameter(torch.tensor(0.05)) for _ in range(cfg.num_remap)])
        self.set_conv_clamp(cfg.conv_clamp)

    def set_conv_clamp(self, clamp: float | None) -> Generator:
        """Clamp every conv and ToRGB output to ±``clamp`` as NVlabs' generators do (None: no
        clamp, rosinality's maths).  A setting, not a weight, so it is applied after a strict
        load of the state dict (:func:`clipinvert.checkpoints.load_stylegan2`)."""
        clamp = None if clamp is None else float(clamp)
        if clamp is not None and not clamp > 0:
            raise ValueError(f"conv_clamp must be positive or None, got {clamp}")
        for m in self.modules():
            if isinstance(m, StyledConv | ToRGB):
                m.conv_clamp = clamp
        if self.config.conv_clamp != clamp:
            self.config = replace(self.config, conv_clamp=clamp)
        return self

    def set_formulation(self, form: str = "fused") -> Generator:
        """Choose how every modulated convolution runs, one of :data:`FORMULATIONS` (see
        :class:`ModulatedConv2d`); the images are the same either way, within rounding."""
        if form not in FORMULATIONS:
            raise ValueError(f"unknown formulation {form!r}; choose from {list(FORMULATIONS)}")
        fused, channels_last = FORMULATIONS[form]
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.fused, m.channels_last = fused, channels_last
        return self

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Generator:
        """A generator shaped like the one that saved ``sd`` (weights not loaded)."""
        return cls(GeneratorConfig.from_state_dict(sd))

    @property
    def has_remapper(self) -> bool:
        return self.config.text_dim is not None

    def noise_buffers(self) -> list[torch.Tensor]:
        return [getattr(self.noises, f"noise_{j}") for j in range(self.num_layers)]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Z → W through the 8-layer MLP."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 10_000, seed: int = 0) -> torch.Tensor:
        """Mean W of ``n`` mapped z (for training checkpoints that store no ``latent_avg``)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        p = next(self.parameters())
        z = torch.randn(n, self.style_dim, generator=g).to(p)
        return self.mapping(z).mean(0)

    def remap(self, w: torch.Tensor, text: torch.Tensor, mix: float = 1.0) -> torch.Tensor:
        """Remapped latents for ``convs[0..num_remap-1]``: ``(B, num_remap, style_dim)``."""
        if not self.has_remapper:
            raise RuntimeError("this generator has no CLIPRemapper (stage-1 checkpoint)")
        text = text.to(w.dtype)
        out = []
        for j, (mlp, lam) in enumerate(zip(self.affine_mlps, self.lambdas, strict=True)):
            lam_j = 0.9 * lam * mix
            out.append((1 - lam_j) * w[:, j + 1] + lam_j * mlp(text))
        return torch.stack(out, dim=1)

    def forward(self, w: torch.Tensor, text: torch.Tensor | None = None,
                mix: float = 1.0, *, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decode W+ ``(B, n_latent, style_dim)`` or W ``(B, style_dim)`` to RGB ``(B,3,S,S)``.

        ``noise``: per-layer noise maps instead of the stored buffers (e4e trains with fresh
        noise every step, :func:`noise_maps`)."""
        if w.ndim == 2:
            w = w[:, None].expand(-1, self.n_latent, -1)
        remapped = None
        if text is not None and self.has_remapper:
            remapped = self.remap(w, text, mix)
        return self.synthesis(w, remapped, noise=noise)

    def noise_maps(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Fresh per-sample noise for every layer, ``(batch, 1, res, res)`` each, drawn in layer
        order from ``generator`` (on the CPU, so every device and rank draws the same)."""
        return [torch.randn((batch, 1, *b.shape[2:]), generator=generator)
                for b in self.noise_buffers()]

    def synthesis(self, w: torch.Tensor, remapped: torch.Tensor | None = None, *,
                  noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Decode W+ with, optionally, already-remapped conv latents (``remap``'s output).

        Split from :meth:`forward` so a caller that keeps the remapped latents computes them
        once.
        """
        if noise is not None:
            return self._synthesis(w, remapped, noise)
        assert w.shape[1:] == (self.n_latent, self.style_dim), (
            f"expected latents (B, {self.n_latent}, {self.style_dim}), got {tuple(w.shape)}")
        n = self.micro_batch
        if n is not None and w.shape[0] > n and not torch.is_grad_enabled():
            return torch.cat([
                self._synthesis(w[i : i + n], None if remapped is None else remapped[i : i + n])
                for i in range(0, w.shape[0], n)])
        return self._synthesis(w, remapped)

    def _synthesis(self, w: torch.Tensor, remapped: torch.Tensor | None,
                   noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        conv_w = w[:, 1 : 1 + len(self.convs)] if remapped is None else remapped
        if noise is None:
            noise = self.noise_buffers()

        out = self.conv1(self.input(w.shape[0]), w[:, 0], noise[0])
        skip = self.to_rgb1(out, w[:, 1])
        for k, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * k](out, conv_w[:, 2 * k], noise[2 * k + 1])
            out = self.convs[2 * k + 1](out, conv_w[:, 2 * k + 1], noise[2 * k + 2])
            skip = to_rgb(out, w[:, 2 * k + 3], skip)
        return skip
