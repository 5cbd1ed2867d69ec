"""Networks: released key names/counts/shapes and the maths of the building blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipinvert.checkpoints import build_module, load_arcface
from clipinvert.errors import WeightsError
from clipinvert.nets import CLIPAdapter, Encoder4Editing, Generator, GeneratorConfig, IRSEBackbone
from clipinvert.nets.irse import IR_SE50_STAGES
from clipinvert.nets.ops import make_kernel, upfirdn2d
from clipinvert.nets.stylegan2 import ModulatedConv2d
from clipinvert.testing.models import (
    TINY_ENCODER,
    make_adapter,
    make_arcface,
    make_encoder,
    seeded,
    tiny_config,
    write_arcface,
)


@pytest.mark.parametrize(("size", "count", "n_latent", "noises"),
                         [(1024, 171, 18, 17), (512, 153, 16, 15), (256, 135, 14, 13)])
def test_generator_released_key_counts(size: int, count: int, n_latent: int, noises: int) -> None:
    g = Generator(GeneratorConfig(size=size))
    sd = g.state_dict()
    assert len(sd) == count
    assert g.n_latent == n_latent and g.num_layers == noises
    assert sd["input.input"].shape == (1, 512, 4, 4)
    assert sd["conv1.conv.weight"].shape == (1, 512, 512, 3, 3)
    assert sd["to_rgb1.bias"].shape == (1, 3, 1, 1)
    assert sd["convs.0.conv.blur.kernel"].shape == (4, 4)
    assert "convs.1.conv.blur.kernel" not in sd
    assert sd["to_rgbs.0.upsample.kernel"].shape == (4, 4)
    assert sd[f"noises.noise_{noises - 1}"].shape == (1, 1, size, size)
    assert sum(1 for k in sd if k.startswith("style.")) == 16


def test_generator_1024_channels_follow_rosinality_table() -> None:
    sd = Generator(GeneratorConfig(size=1024)).state_dict()
    # convs.{2k}: resolution 2^(k+3); 1024 → 16·2 = 32 channels
    assert sd["convs.14.conv.weight"].shape == (1, 32, 64, 3, 3)
    assert sd["convs.8.conv.weight"].shape == (1, 256, 512, 3, 3)
    assert sd["to_rgbs.7.conv.weight"].shape == (1, 3, 32, 1, 1)


def test_remapper_adds_144_tensors_at_1024() -> None:
    plain = Generator(GeneratorConfig(size=1024)).state_dict()
    remap = Generator(GeneratorConfig(size=1024, text_dim=512)).state_dict()
    extra = set(remap) - set(plain)
    assert len(extra) == 144
    assert remap["lambdas.0"].shape == () and float(remap["lambdas.15"]) == pytest.approx(0.05)
    assert remap["affine_mlps.15.5.weight"].shape == (512, 512)
    assert remap["affine_mlps.0.3.weight"].shape == (512,)  # the LayerNorm


def test_config_is_read_back_from_state_dict() -> None:
    for cfg in (GeneratorConfig(size=256), tiny_config(64, 64, 32, text_dim=512)):
        sd = Generator(cfg).state_dict()
        back = GeneratorConfig.from_state_dict(sd)
        assert back.size == cfg.size and back.style_dim == cfg.style_dim
        assert dict(back.channels) == dict(cfg.channels) and back.text_dim == cfg.text_dim


def test_e4e_621_tensors_and_feature_taps() -> None:
    with torch.device("meta"):  # shapes only: no 31 M-parameter initialisation or convolutions
        enc = Encoder4Editing(18)
    sd = enc.state_dict()
    assert len(sd) == 621
    assert "body.3.shortcut_layer.0.weight" in sd and "body.4.shortcut_layer.0.weight" not in sd
    assert sd["body.23.res_layer.5.fc1.weight"].shape == (32, 512, 1, 1)
    assert sd["styles.17.convs.10.weight"].shape == (512, 512, 3, 3)  # fine: 6 convs (64→1)
    assert "styles.0.convs.8.weight" not in sd and "styles.0.convs.6.weight" in sd  # coarse: 4
    assert sd["latlayer1.weight"].shape == (512, 256, 1, 1)
    with torch.device("meta"), torch.no_grad():
        enc = Encoder4Editing(8, 64).eval()
        c1, c2, c3 = enc.forward_features(torch.randn(1, 3, 256, 256))
        w = enc.forward_styles(c1, c2, c3)
    assert c1.shape == (1, 128, 64, 64) and c2.shape == (1, 256, 32, 32)
    assert c3.shape == (1, 512, 16, 16) and w.shape == (1, 8, 64)


def test_adapter_45_tensors_and_shapes() -> None:
    a = CLIPAdapter()
    sd = a.state_dict()
    assert len(sd) == 45
    assert sd["fine_mapping.modulation_module_list.0.conv.weight"].shape == (128, 128, 3, 3)
    assert sd["medium_mapping.modulation_module_list.0.gamma_function.3.weight"].shape == (256, 512)
    c = [torch.randn(2, ch, s, s) for ch, s in ((128, 64), (256, 32), (512, 16))]
    out = a(*c, torch.randn(2, 512))
    assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in c]


def test_released_sizes_are_read_back_from_keys() -> None:
    with torch.device("meta"):  # shapes only: no 31 M-parameter initialisation
        enc = Encoder4Editing.from_state_dict(Encoder4Editing(18).state_dict())
        adapter = CLIPAdapter.from_state_dict(CLIPAdapter().state_dict())
    assert enc.stages == IR_SE50_STAGES and enc.fpn_width == 512
    assert enc.taps == (6, 20, 23) and enc.tap_widths == (128, 256, 512)
    assert enc.n_styles == 18 and enc.style_dim == 512
    assert adapter.widths == (128, 256, 512) and adapter.text_dim == 512


def test_arcface_has_the_published_ir_se50_layout() -> None:
    with torch.device("meta"):
        net = IRSEBackbone()
    sd = net.state_dict()
    # 7 input-layer + 24 units × 15 + 3 projection shortcuts × 6 + 12 output-layer tensors
    assert len(sd) == 397
    assert sum(1 for k in sd if k.endswith("res_layer.1.weight")) == 24
    assert "body.23.res_layer.5.fc2.weight" in sd and not any(k.startswith("body.24.") for k in sd)
    assert sd["input_layer.0.weight"].shape == (64, 3, 3, 3)
    assert sd["input_layer.2.weight"].shape == (64,)  # PReLU
    assert "body.0.shortcut_layer.0.weight" not in sd  # 64 → 64: a strided identity
    assert sd["body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
    assert sd["body.21.shortcut_layer.1.running_var"].shape == (512,)
    assert sd["body.23.res_layer.5.fc1.weight"].shape == (32, 512, 1, 1)
    assert sd["output_layer.0.weight"].shape == (512,)  # BatchNorm2d
    assert sd["output_layer.3.weight"].shape == (512, 512 * 7 * 7)  # Linear
    assert sd["output_layer.4.running_mean"].shape == (512,)  # BatchNorm1d (affine)
    assert sd["output_layer.4.weight"].shape == (512,)
    assert not any(k.startswith(("output_layer.1.", "output_layer.2.")) for k in sd)
    # The body is e4e's, unit for unit.
    with torch.device("meta"):
        e4e = Encoder4Editing(18).state_dict()
    ours = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(("input_layer.", "body."))}
    assert ours == {k: tuple(v.shape) for k, v in e4e.items()
                    if k.startswith(("input_layer.", "body."))}
    with torch.device("meta"):
        back = IRSEBackbone.from_state_dict(sd)
    assert back.stages == IR_SE50_STAGES and back.input_size == 112
    assert back.embedding_size == 512


@pytest.mark.parametrize("prefix", ["", "module."])
def test_arcface_round_trips_through_its_file(tmp_path, prefix: str) -> None:
    path = write_arcface(tmp_path / "model_ir_se50.pth", prefix=prefix)
    net = load_arcface(path)
    ref = make_arcface()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.stages == TINY_ENCODER.stages and net.embedding_size == 128
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        emb = net(x)
        torch.testing.assert_close(emb, ref(x))
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_arcface_files_without_counters_and_bad_files(tmp_path) -> None:
    sd = {k: v for k, v in make_arcface().state_dict().items()
          if not k.endswith("num_batches_tracked")}  # as pre-0.4.1 PyTorch saved them
    torch.save(sd, tmp_path / "old.pth")
    assert load_arcface(tmp_path / "old.pth").embedding_size == 128
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pth")
    with pytest.raises(WeightsError, match="no input_layer") as err:
        load_arcface(tmp_path / "foo.pth")
    assert "\n" not in str(err.value) and "foo.pth" in str(err.value)
    sd["output_layer.3.weight"] = torch.zeros(128, 1000)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="output_layer.3 takes 1000 features"):
        load_arcface(tmp_path / "bad.pth")


def test_tiny_encoder_and_adapter_are_built_from_keys() -> None:
    enc = Encoder4Editing.from_state_dict(make_encoder(8, 64, encoder="tiny").state_dict())
    assert enc.stages == TINY_ENCODER.stages and enc.fpn_width == 128
    assert enc.taps == (1, 2, 3) and enc.tap_widths == (32, 64, 128)
    adapter = CLIPAdapter.from_state_dict(make_adapter(widths=enc.tap_widths).state_dict())
    assert adapter.widths == (32, 64, 128)
    with torch.no_grad():
        c1, c2, c3 = enc.forward_features(torch.randn(2, 3, 256, 256))
        assert (c1.shape, c2.shape, c3.shape) == ((2, 32, 64, 64), (2, 64, 32, 32),
                                                  (2, 128, 16, 16))
        mod = adapter(c1, c2, c3, torch.randn(2, 512))
        assert [m.shape for m in mod] == [c1.shape, c2.shape, c3.shape]
        assert enc.forward_styles(*mod).shape == (2, 8, 64)


def test_bad_widths_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="fine width 48 is not a multiple of 32"):
        CLIPAdapter(widths=(48, 64, 128))
    sd = make_adapter(widths=(32, 64, 128)).state_dict()
    sd["fine_mapping.modulation_module_list.0.gamma_function.3.weight"] = torch.zeros(48, 512)
    with pytest.raises(WeightsError, match="GroupNorm keeps 32 groups") as err:
        build_module(CLIPAdapter, sd, "CLIPInverter adapter", tmp_path / "ci.pt")
    assert "\n" not in str(err.value) and "ci.pt" in str(err.value)
    with pytest.raises(ValueError, match="both 32 wide"):
        Encoder4Editing(8, 64, stages=((16, 16, 1), (16, 32, 1), (32, 32, 1), (32, 64, 1)))
    with pytest.raises(ValueError, match="FPN width 64 must equal the last stage's width 128"):
        Encoder4Editing(8, 64, stages=TINY_ENCODER.stages, fpn_width=64)
    with pytest.raises(ValueError, match="stage 2 takes 16 channels but stage 1 gives 32"):
        Encoder4Editing(8, 64, stages=((16, 16, 1), (16, 32, 1), (16, 64, 1), (64, 128, 1)))
    with pytest.raises(ValueError, match="4 IR-SE stages"):
        Encoder4Editing(8, 64, stages=IR_SE50_STAGES[:3])


def _naive_upfirdn(x: torch.Tensor, k: torch.Tensor, up: int, down: int,
                   pad: tuple[int, int]) -> torch.Tensor:
    """Literal loops over output pixels: the definition, not an optimisation of it."""
    b, c, h, w = x.shape
    z = torch.zeros(b, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    z = F.pad(z, [p0, p1, p0, p1])
    kf = torch.flip(k, [0, 1])
    kh, kw = k.shape
    oh, ow = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    out = torch.zeros(b, c, oh, ow)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = (z[:, :, i:i + kh, j:j + kw] * kf).sum((-1, -2))
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize(("up", "down", "pad"), [(2, 1, (2, 1)), (1, 1, (1, 1)), (1, 2, (1, 1))])
def test_upfirdn2d_matches_definition(up: int, down: int, pad: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    k = make_kernel([1, 3, 3, 1]) * (4 if up > 1 else 1)
    out = upfirdn2d(x, k, up=up, down=down, pad=pad)
    assert out.shape[-1] == (6 * up + pad[0] + pad[1] - 4) // down + 1
    torch.testing.assert_close(out, _naive_upfirdn(x, k, up, down, pad), atol=1e-5, rtol=1e-5)


def test_make_kernel_sums_to_one() -> None:
    k = make_kernel([1, 3, 3, 1])
    assert k.shape == (4, 4) and float(k.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("demodulate", [False, True])
def test_modulated_conv_equals_activation_modulation(upsample: bool, demodulate: bool) -> None:
    """Per-sample weights + grouped conv (ours, as released) must equal the other formulation:
    scale the input activations by the style, convolve once, scale the output by demod."""
    with seeded(0):
        conv = ModulatedConv2d(8, 6, 3, 16, demodulate=demodulate, upsample=upsample)
        x, style = torch.randn(3, 8, 8, 8), torch.randn(3, 16)
    out = conv(x, style)
    s = conv.modulation(style)  # (B, in)
    w = conv.weight[0] * conv.scale  # (out, in, k, k)
    xs = x * s[:, :, None, None]
    if upsample:
        ref = conv.blur(F.conv_transpose2d(xs, w.transpose(0, 1), stride=2))
    else:
        ref = F.conv2d(xs, w, padding=1)
    if demodulate:
        demod = torch.rsqrt((s[:, None, :, None, None] * w[None]).pow(2).sum([2, 3, 4]) + 1e-8)
        ref = ref * demod[:, :, None, None]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # the library's own unfused path is that formulation, in either memory format
    for channels_last in (False, True):
        conv.fused, conv.channels_last = False, channels_last
        torch.testing.assert_close(conv(x, style), ref, atol=1e-5, rtol=1e-4)


def test_styled_conv_is_conv_noise_bias_activation() -> None:
    from clipinvert.nets.stylegan2 import StyledConv

    with seeded(1):
        layer = StyledConv(8, 6, 3, 16)
        layer.noise.weight.data.fill_(0.3)
        layer.activate.bias.data.normal_()
        x, style, noise = torch.randn(2, 8, 8, 8), torch.randn(2, 16), torch.randn(1, 1, 8, 8)
    ref = layer.activate(layer.noise(layer.conv(x, style), noise))
    torch.testing.assert_close(layer(x, style, noise), ref)


def test_equal_linear_and_mapping_scale() -> None:
    g = Generator(tiny_config(32, 64, 32))
    lin = g.style[1]
    assert lin.scale == pytest.approx(0.01 / math.sqrt(64))
    z = torch.randn(4, 64)
    assert g.mapping(z).shape == (4, 64)


def test_half_precision_modulated_conv_is_the_same_maths() -> None:
    """The low-precision path pre-normalises styles and weights; demodulation must undo it."""
    with seeded(0):
        conv = ModulatedConv2d(8, 6, 3, 16, demodulate=True)
        x, style = torch.randn(2, 8, 8, 8), torch.randn(2, 16) * 50
    ref = conv(x, style)
    out = conv.to(torch.bfloat16)(x.bfloat16(), style.bfloat16()).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


def test_decoding_in_micro_batches_gives_the_same_images() -> None:
    """The CPU decodes one sample at a time (Generator.micro_batch): same pixels as the whole
    batch at once, remapped latents included; a recorded graph always takes the whole batch."""
    from clipinvert.testing.models import make_generator

    g = make_generator(tiny_config(size=32, text_dim=16)).eval()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, g.n_latent, g.style_dim, generator=gen)
    text = torch.randn(5, 16, generator=gen)
    with torch.no_grad():
        whole = g(w, text)
        g.micro_batch = 2
        parts = g(w, text)
    assert parts.shape == whole.shape == (5, 3, 32, 32)
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    # at most 1/255 of the [-1, 1] range: the same 8-bit picture up to rounding
    assert (parts - whole).abs().max() * 127.5 < 1
    calls = []
    g._synthesis = lambda w, r: calls.append(len(w)) or torch.zeros(len(w), 3, 32, 32)
    with torch.no_grad():
        g(w)
    assert calls == [2, 2, 1]
    calls.clear()
    g(w)  # autograd on: one pass (training back-propagates through the whole batch)
    assert calls == [5]


@pytest.mark.parametrize("form", ["unfused", "unfused-cl"])
def test_unfused_generator_gives_the_same_images(form: str) -> None:
    """Generator.set_formulation("unfused") is the same picture as the released grouped
    form, the float32 reference: within 1 grey level at B = 1 and over a batch, in float32, and
    under the half-precision pre-normalisation (bfloat16 against bfloat16)."""
    from clipinvert.testing.models import make_generator

    g = make_generator(tiny_config(size=32, text_dim=16)).eval()
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, g.n_latent, g.style_dim, generator=gen)
    text = torch.randn(3, 16, generator=gen)
    with torch.no_grad():
        for batch in (1, 3):
            ref = g.set_formulation("fused")(w[:batch], text[:batch])
            out = g.set_formulation(form)(w[:batch], text[:batch])
            assert (out - ref).abs().max() * 127.5 < 1
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
        g16 = g.to(torch.bfloat16)
        ref16 = g16.set_formulation("fused")(w.bfloat16(), text.bfloat16()).float()
        out16 = g16.set_formulation(form)(w.bfloat16(), text.bfloat16()).float()
    with pytest.raises(ValueError, match="unknown formulation"):
        g.set_formulation("grouped")
    assert torch.isfinite(out16).all()
    torch.testing.assert_close(out16, ref16, rtol=0, atol=0.1)
