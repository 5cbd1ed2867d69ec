"""Training losses (clipinvert.losses): each checked against a hand computation from its
definition, on random-weight networks written in the released file layouts and read back
through the real loaders.  Nothing here may touch the network.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip is imported

import socket
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipinvert.checkpoints import load_alexnet_trunk, load_arcface, load_moco
from clipinvert.clip_encoder import ClipEncoder
from clipinvert.errors import WeightsError
from clipinvert.losses import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipImageInput,
    DirectionalCLIPLoss,
    IdentityLoss,
    IdentityNet,
    LPIPSLoss,
)
from clipinvert.registry import EDIT_ROLES, WEIGHT_ROLES, Registry
from clipinvert.testing.clip import write_tiny_clip
from clipinvert.testing.models import write_alexnet_trunk, write_arcface, write_moco


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def images(seed: int, n: int = 2, size: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def u(v: torch.Tensor) -> torch.Tensor:
    """The release's normalisation, written out: v / (‖v‖ + 1e-6)."""
    return v / (v.norm(dim=-1, keepdim=True) + 1e-6)


# ------------------------------------------------------------------------------------------
# ClipImageInput
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,k", [(256, 8), (64, 2), (1024 // 4, 8)])
def test_release_input_is_upsample_x7_then_avgpool(size: int, k: int) -> None:
    x = images(0, size=size)
    by_hand = nn.AvgPool2d(kernel_size=k)(nn.Upsample(scale_factor=7)(x))  # the release
    out = ClipImageInput("release")(x)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=0)


def test_release_input_other_sizes_use_adaptive_pooling() -> None:
    x = images(1, size=100)[..., :90]  # not a multiple of 32, not square
    by_hand = F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=7, mode="nearest"), 224)
    torch.testing.assert_close(ClipImageInput("release")(x), by_hand, atol=1e-5, rtol=0)


def test_release_input_is_not_clamped_nor_normalised_and_keeps_grad() -> None:
    x = torch.full((1, 3, 256, 256), 1.5, requires_grad=True)
    out = ClipImageInput("release")(x)
    torch.testing.assert_close(out, torch.full_like(out, 1.5))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_input_is_clip_normalisation() -> None:
    assert OPENAI_MEAN == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert OPENAI_STD == tuple(open_clip.OPENAI_DATASET_STD)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x = images(2)
    x01 = ((x + 1) / 2).clamp(0, 1)
    resized = F.interpolate(x01, size=(224, 224), mode="bicubic", align_corners=False,
                            antialias=True).clamp(0, 1)
    torch.testing.assert_close(ClipImageInput("clip")(x), (resized - mean) / std)
    # already 224: only the [0, 1] mapping, the clamp and the normalisation
    y = images(3, size=224) * 1.2
    torch.testing.assert_close(ClipImageInput("clip")(y),
                               (((y + 1) / 2).clamp(0, 1) - mean) / std)


def test_clip_input_matches_clip_preprocessing_of_the_picture(clip: ClipEncoder) -> None:
    # A smooth 8-bit picture, non-square: shorter side to 224, centre crop.
    yy, xx = np.mgrid[0:256, 0:320]
    rgb = np.stack([128 + 100 * np.sin(xx / 23.0), 128 + 100 * np.cos(yy / 31.0),
                    128 + 60 * np.sin((xx + yy) / 41.0)], -1).round().astype(np.uint8)
    expected = clip.preprocess_images([Image.fromarray(rgb)])
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = ClipImageInput("clip")(x)
    assert out.shape == expected.shape == (1, 3, 224, 224)
    # PIL's bicubic on 8-bit data vs torch's on floats: a few 8-bit steps at most.
    assert (out - expected).abs().max() < 0.05


def test_clip_input_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="release, clip"):
        ClipImageInput("openai")


# ------------------------------------------------------------------------------------------
# Directional CLIP loss
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> ClipEncoder:
    config, weights = write_tiny_clip(tmp_path_factory.mktemp("clip"), fmt="open_clip", seed=0)
    return ClipEncoder(str(config), weights)


@pytest.fixture(scope="module")
def texts(clip: ClipEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    emb = clip.encode_text(["a photo of a face", "a face with blond hair and a beard"])
    return emb[1], emb[0]  # target, source (raw, as the caller computes them)


def test_directional_clip_loss_equals_hand_computation(clip: ClipEncoder, texts) -> None:
    target, source_text = texts
    edited, source = images(10), images(11)
    loss = DirectionalCLIPLoss(clip)
    got = loss(edited, source, target, source_text)
    per_sample = loss(edited, source, target, source_text, reduction="none")

    def embed(x: torch.Tensor) -> torch.Tensor:
        pre = nn.AvgPool2d(kernel_size=8)(nn.Upsample(scale_factor=7)(x))  # 256 → 224
        return clip.model.encode_image(pre, normalize=False)

    d_img = u(u(embed(edited)) - u(embed(source)))
    d_txt = u(u(target[None]) - u(source_text[None]))
    by_hand = 1 - (d_img * d_txt).sum(-1)
    assert got.shape == () and per_sample.shape == (2,)
    torch.testing.assert_close(per_sample, by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, by_hand.mean(), atol=1e-5, rtol=1e-5)
    # (B, D) text embeddings give the same as broadcast (D,) ones
    both = loss(edited, source, target.expand(2, -1), source_text.expand(2, -1))
    torch.testing.assert_close(both, got)


def test_directional_clip_loss_is_zero_for_parallel_directions(clip: ClipEncoder) -> None:
    edited, source = images(12), images(13)
    loss = DirectionalCLIPLoss(clip)
    with torch.no_grad():
        i_edit, i_src = loss.image_embeddings(edited), loss.image_embeddings(source)
    # Texts whose normalised difference is the image direction: each text embedding a scaled
    # copy of the matching image embedding (the scale is normalised away).
    zero = loss(edited, source, 5.0 * i_edit, 3.0 * i_src, reduction="none")
    # Only the +1e-6 of the normalisations keeps it from exactly 0: O(1e-6 / ‖direction‖).
    gap = (u(i_edit) - u(i_src)).norm(dim=-1)
    assert (zero.abs() < 1e-5 / gap).all(), (zero, gap)
    # and the opposite direction is the maximum, 2
    two = loss(edited, source, i_src, i_edit, reduction="none")
    assert ((two - 2).abs() < 1e-5 / gap).all(), (two, gap)


def test_directional_clip_loss_gradients_reach_the_image(clip: ClipEncoder, texts) -> None:
    edited = images(14).requires_grad_(True)
    loss = DirectionalCLIPLoss(clip)(edited, images(15), *texts)
    loss.backward()
    assert edited.grad is not None and edited.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())


def test_directional_clip_loss_clip_preprocessing(clip: ClipEncoder, texts) -> None:
    target, source_text = texts
    edited, source = images(16), images(17)
    got = DirectionalCLIPLoss(clip, preprocess="clip")(edited, source, target, source_text)
    pre = ClipImageInput("clip")
    d_img = u(u(clip.model.encode_image(pre(edited))) - u(clip.model.encode_image(pre(source))))
    d_txt = u(u(target) - u(source_text))
    torch.testing.assert_close(got, (1 - (d_img * d_txt).sum(-1)).mean(), atol=1e-5,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Identity: ArcFace and MoCo
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_arcface(tmp_path_factory.mktemp("arcface") / "model_ir_se50.pth", tiny=True)


@pytest.fixture(scope="module")
def moco_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_moco(tmp_path_factory.mktemp("moco") / "moco_v2_800ep_pretrain.pth")


def test_arcface_identity_loss_equals_hand_computation(arcface_file: Path) -> None:
    backbone = load_arcface(arcface_file)
    loss = IdentityLoss(IdentityNet("arcface", backbone))
    y_hat, x = images(20), images(21)

    def emb(img: torch.Tensor) -> torch.Tensor:
        return backbone(F.adaptive_avg_pool2d(img[:, :, 35:223, 32:220], 112))

    by_hand = 1 - (emb(y_hat) * emb(x)).sum(1)
    torch.testing.assert_close(loss(y_hat, x, reduction="none"), by_hand)
    torch.testing.assert_close(loss(y_hat, x), by_hand.mean())
    torch.testing.assert_close(loss(x, x), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_arcface_sees_exactly_the_crop(arcface_file: Path) -> None:
    net = IdentityNet.from_file("arcface", arcface_file)
    x = images(22)
    outside = x.clone()
    outside[:, :, :35] = 0.7  # rows above, below, columns left and right of the window
    outside[:, :, 223:] = -0.3
    outside[:, :, :, :32] = 0.1
    outside[:, :, :, 220:] = 0.9
    torch.testing.assert_close(net.embed(outside), net.embed(x))
    inside = x.clone()
    inside[:, :, 35, 32] += 0.5  # the corner pixel of the window does count
    assert (net.embed(inside) - net.embed(x)).abs().max() > 0
    e = net.embed(x)
    assert e.shape == (2, 128)  # the tiny test backbone's embedding size
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))


def test_identity_loss_gradients_reach_the_output_only(arcface_file: Path) -> None:
    loss = IdentityLoss.from_file("arcface", arcface_file)
    y_hat, x = images(23).requires_grad_(True), images(24).requires_grad_(True)
    loss(y_hat, x).backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0
    assert x.grad is None
    assert not any(p.requires_grad for p in loss.parameters())


def test_identity_net_stays_in_eval_mode(arcface_file: Path) -> None:
    loss = IdentityLoss.from_file("arcface", arcface_file)
    before = loss.identity.embed(images(25))
    loss.train()
    assert not any(m.training for m in loss.identity.modules())
    torch.testing.assert_close(loss.identity.embed(images(25)), before)


def test_moco_identity_equals_hand_computation(moco_file: Path) -> None:
    # What pSp's MocoLoss does, written out: encoder_q without fc into a plain torchvision
    # ResNet, nearest resize to 224, no ImageNet normalisation, L2-normalised features.
    from torchvision.models.resnet import BasicBlock, ResNet

    sd = torch.load(moco_file, weights_only=True)["state_dict"]
    q = {k[len("module.encoder_q."):]: v for k, v in sd.items()
         if k.startswith("module.encoder_q.") and not k.startswith("module.encoder_q.fc")}
    ref = ResNet(BasicBlock, [1, 1, 1, 1])
    ref.fc = nn.Identity()
    ref.load_state_dict(q, strict=True)
    ref.eval()

    net = IdentityNet("moco", load_moco(moco_file))
    y_hat, x = images(30), images(31)

    def emb(img: torch.Tensor) -> torch.Tensor:
        return F.normalize(ref(F.interpolate(img, size=224)), dim=1)

    e = net.embed(y_hat)
    assert e.shape == (2, 512)
    torch.testing.assert_close(e, emb(y_hat))
    loss = IdentityLoss(net)
    torch.testing.assert_close(loss(y_hat, x), (1 - (emb(y_hat) * emb(x)).sum(1)).mean())
    torch.testing.assert_close(loss(x, x), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_load_moco_reads_encoder_q_and_refuses_other_files(tmp_path: Path,
                                                           arcface_file: Path) -> None:
    plain = write_moco(tmp_path / "noprefix.pth", prefix="", seed=6)
    a, b = load_moco(plain), load_moco(write_moco(tmp_path / "prefixed.pth", seed=6))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert isinstance(a.fc, nn.Identity) and not a.training
    with pytest.raises(WeightsError, match=r"^MoCo weights .*have no 'state_dict'"):
        load_moco(arcface_file)
    torch.save({"state_dict": {"module.queue": torch.zeros(4, 4)}}, tmp_path / "q.pth")
    with pytest.raises(WeightsError, match=r"^MoCo weights .*hold no encoder_q\.\* keys"):
        load_moco(tmp_path / "q.pth")
    sd = torch.load(plain, weights_only=True)
    del sd["state_dict"]["encoder_q.layer2.0.conv1.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as err:
        load_moco(tmp_path / "broken.pth")
    assert "\n" not in str(err.value) and "1 missing keys" in str(err.value)


@pytest.mark.slow
def test_moco_full_resnet50(tmp_path: Path) -> None:
    net = IdentityNet.from_file("moco", write_moco(tmp_path / "moco.pth", tiny=False))
    assert net.embed(images(32, n=1)).shape == (1, 2048)


# ------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_alexnet_trunk(tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth")


def reference_lpips(path: Path) -> nn.Module:
    """lpips.LPIPS whose AlexNet slices are filled by hand from torchvision's features.N."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True,
                            verbose=False)
    tv = torch.load(path, weights_only=True)
    by_hand = {f"slice{s}.{i}.{p}": tv[f"features.{i}.{p}"]
               for s, i in [(1, 0), (2, 3), (3, 6), (4, 8), (5, 10)] for p in ("weight", "bias")}
    model.net.load_state_dict(by_hand, strict=True)
    return model.eval()


def test_lpips_equals_the_lpips_package(alexnet_file: Path) -> None:
    ref = reference_lpips(alexnet_file)
    loss = LPIPSLoss(load_alexnet_trunk(alexnet_file))
    a, b = images(40, n=3, size=64), images(41, n=3, size=64)
    expected = ref(a, b).reshape(3)
    torch.testing.assert_close(loss(a, b, reduction="none"), expected)
    torch.testing.assert_close(loss(a, b), expected.mean())
    assert loss(a, b).shape == ()
    torch.testing.assert_close(loss(a, a), torch.tensor(0.0), atol=1e-7, rtol=0)


def test_lpips_uses_the_packaged_linear_heads(alexnet_file: Path) -> None:
    import lpips

    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth",
                       map_location="cpu", weights_only=True)
    model = LPIPSLoss.from_file(alexnet_file).lpips
    for i in range(5):
        torch.testing.assert_close(model.lins[i].model[1].weight, heads[f"lin{i}.model.1.weight"])


def test_lpips_never_touches_the_network(alexnet_file: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # _no_network already refuses sockets, urlopen and torch.hub downloads; also no hub cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    import torchvision.models._api as tv_api

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchvision tried to fetch weights")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse, raising=False)
    loss = LPIPSLoss.from_file(alexnet_file)
    loss(images(42, n=1, size=64), images(43, n=1, size=64))
    assert not (tmp_path / "torch-home").exists()


def test_lpips_gradients_and_frozen(alexnet_file: Path) -> None:
    loss = LPIPSLoss.from_file(alexnet_file)
    loss.train()
    assert not any(m.training for m in loss.modules())
    assert not any(p.requires_grad for p in loss.parameters())
    y_hat = images(44, n=2, size=64).requires_grad_(True)
    loss(y_hat, images(45, n=2, size=64)).backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0


def test_alexnet_trunk_shapes_are_torchvisions() -> None:
    from torchvision.models import alexnet

    from clipinvert.checkpoints import alexnet_trunk_shapes

    with torch.device("meta"):
        tv = alexnet().state_dict()
    assert alexnet_trunk_shapes() == {k: tuple(v.shape) for k, v in tv.items()
                                      if k.startswith("features.")}


def test_load_alexnet_trunk_layout(tmp_path: Path, alexnet_file: Path) -> None:
    trunk = load_alexnet_trunk(alexnet_file)
    assert sorted(trunk) == sorted(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10)
                                   for p in ("weight", "bias"))
    assert trunk["features.0.weight"].shape == (64, 3, 11, 11)
    # the real file also holds the classifier: ignored
    sd = torch.load(alexnet_file, weights_only=True)
    torch.save({**sd, "classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "full.pth")
    assert sorted(load_alexnet_trunk(tmp_path / "full.pth")) == sorted(trunk)
    sd["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(sd, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"^LPIPS AlexNet weights .*1 wrong shapes"):
        load_alexnet_trunk(tmp_path / "wrong.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"hold no features\.\* keys"):
        load_alexnet_trunk(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_names_the_training_weights() -> None:
    assert "lpips" in WEIGHT_ROLES and "lpips" not in EDIT_ROLES
    reg = Registry.load(user=False)
    entry = reg.weights["lpips-alexnet"]
    assert entry.file == "alexnet-owt-7be5be79.pth"
    assert entry.urls == ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",)
    assert entry.sha256 is None  # torchvision publishes only an 8-digit prefix
    for name in ("faces", "cats", "birds"):
        assert reg.domain(name).weights["lpips"] == "lpips-alexnet"
    assert reg.domain("faces").weights["arcface"] == "arcface-ir-se50"
    assert reg.domain("cats").weights["moco"] == reg.domain("birds").weights["moco"] == \
        "moco-v2-800ep"
