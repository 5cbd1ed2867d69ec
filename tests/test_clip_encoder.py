"""ClipEncoder: both checkpoint layouts, raw embeddings, strict loading, broken-file messages.

Everything runs on a tiny random-weight CLIP written by ``clipinvert.testing.clip``; the network
is blocked for the whole module so an accidental download fails loudly instead of hanging.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip is imported: it retries the hub otherwise

import argparse
import json
import socket
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipinvert.clip_encoder import (
    ClipEncoder,
    build_clip_model,
    load_clip_state_dict,
    resolve_arch,
)
from clipinvert.errors import InputError, WeightsError
from clipinvert.testing.clip import (
    TINY_CLIP_CONFIG,
    random_clip_state_dict,
    write_random_clip,
    write_tiny_clip,
)

PROMPTS = ["a photo of a face", "a man with a beard", "she is smiling, with blue eyes"]

# encode_text("a photo of a face")[0, :5] for write_tiny_clip(seed=0): catches any drift in the
# tokenizer, the forward pass, the random-weight factory or the loaders.
GOLDEN_FACE_PROMPT = [0.0752936, 0.1620758, 0.0539500, -0.1118359, 0.1991897]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clip")
    config, oc = write_tiny_clip(d, fmt="open_clip", seed=0)
    _, oa = write_tiny_clip(d, fmt="openai", seed=0)
    return {"dir": d, "config": config, "open_clip": oc, "openai": oa}


@pytest.fixture(scope="module")
def encoder(tiny: dict[str, Path]) -> ClipEncoder:
    return ClipEncoder(str(tiny["config"]), tiny["open_clip"])


def _face(size: tuple[int, int] = (300, 240), mode: str = "RGB") -> Image.Image:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def _assert_one_line(err: pytest.ExceptionInfo[WeightsError], *needles: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


# ---------------------------------------------------------------------------- formats


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_openai_archive_is_a_real_torchscript_file(tiny: dict[str, Path]) -> None:
    names = zipfile.ZipFile(tiny["openai"]).namelist()
    assert any(n.endswith("/constants.pkl") for n in names)
    raw = torch.jit.load(str(tiny["openai"]), map_location="cpu").state_dict()
    assert int(raw["input_resolution"]) == 224
    assert int(raw["context_length"]) == 77 and int(raw["vocab_size"]) == 49408

    sd = load_clip_state_dict(tiny["openai"])
    assert not {"input_resolution", "context_length", "vocab_size"} & sd.keys()
    ref = load_clip_state_dict(tiny["open_clip"])
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_both_formats_give_identical_embeddings(tiny: dict[str, Path], encoder: ClipEncoder):
    other = ClipEncoder(str(tiny["config"]), tiny["openai"])
    assert torch.equal(encoder.encode_text(PROMPTS), other.encode_text(PROMPTS))
    assert torch.equal(encoder.encode_image([_face()]), other.encode_image([_face()]))


def test_half_precision_openai_archive_loads_into_fp32_model(tmp_path: Path) -> None:
    """OpenAI's ViT-B-32.pt stores fp16 tensors; they must load into the fp32 model."""
    config, oa = write_tiny_clip(tmp_path, fmt="openai", dtype=torch.float16)
    _, oc = write_tiny_clip(tmp_path, fmt="open_clip", dtype=torch.float16)
    assert load_clip_state_dict(oa)["text_projection"].dtype == torch.float16
    enc = ClipEncoder(str(config), oa)
    a = enc.encode_text(PROMPTS[:1])
    b = ClipEncoder(str(config), oc).encode_text(PROMPTS[:1])
    assert a.dtype == torch.float32 and torch.equal(a, b)
    # the towers run in float32, not in the file's precision: the image tower takes pixels
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    assert enc.encode_image([_face()]).dtype == torch.float32


def test_wrapped_and_module_prefixed_state_dicts_load(tiny: dict[str, Path], encoder: ClipEncoder):
    sd = load_clip_state_dict(tiny["open_clip"])
    path = tiny["dir"] / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    wrapped = ClipEncoder(str(tiny["config"]), path)
    assert torch.equal(wrapped.encode_text(PROMPTS), encoder.encode_text(PROMPTS))


def test_random_factory_is_deterministic_per_seed() -> None:
    a = random_clip_state_dict(TINY_CLIP_CONFIG, seed=0)
    b = random_clip_state_dict(TINY_CLIP_CONFIG, seed=0)
    c = random_clip_state_dict(TINY_CLIP_CONFIG, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text_projection"], c["text_projection"])


# ---------------------------------------------------------------------------- embeddings


def test_encode_text_is_raw_deterministic_and_frozen(encoder: ClipEncoder) -> None:
    t = encoder.encode_text(PROMPTS)
    assert t.shape == (3, 512) and t.dtype == torch.float32 and encoder.embed_dim == 512
    assert not t.requires_grad
    norms = t.norm(dim=-1)
    assert (norms - 1).abs().min() > 0.1, norms  # not L2-normalised
    assert torch.equal(t, encoder.encode_text(PROMPTS))
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training


def test_encode_text_is_batching_independent(encoder: ClipEncoder) -> None:
    batch = encoder.encode_text(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(encoder.encode_text([prompt])[0], batch[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder.encode_text(PROMPTS, batch_size=2), batch)
    assert encoder.encode_text([]).shape == (0, 512)


def test_golden_values(encoder: ClipEncoder) -> None:
    got = encoder.encode_text(["a photo of a face"])[0, :5]
    torch.testing.assert_close(got, torch.tensor(GOLDEN_FACE_PROMPT), atol=1e-4, rtol=0)


def test_encode_image_matches_tensor_path_and_keeps_grad(encoder: ClipEncoder) -> None:
    images = [_face(), _face((120, 160), "L"), _face((224, 224), "RGBA")]
    emb = encoder.encode_image(images)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32 and not emb.requires_grad
    assert ((emb.norm(dim=-1) - 1).abs() > 0.1).all()

    x = encoder.preprocess_images(images)
    assert x.shape == (3, 3, 224, 224)
    x.requires_grad_(True)
    out = encoder.encode_image_tensor(x)
    torch.testing.assert_close(out, emb, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.model.parameters())


def test_unusable_reference_image_is_an_input_error(encoder: ClipEncoder) -> None:
    with pytest.raises(InputError):
        encoder.encode_image([Image.new("RGB", (0, 0))])


def test_bfloat16_encoder_still_returns_float32(tiny: dict[str, Path], encoder: ClipEncoder):
    low = ClipEncoder(str(tiny["config"]), tiny["open_clip"], dtype=torch.bfloat16)
    t = low.encode_text(PROMPTS[:1])
    assert t.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(t, encoder.encode_text(PROMPTS[:1]))
    assert cos.item() > 0.99
    assert low.encode_image([_face()]).dtype == torch.float32


# ---------------------------------------------------------------------------- architectures


def test_named_arch_resolves_and_builds_offline() -> None:
    assert resolve_arch("ViT-B-32-quickgelu") == ("ViT-B-32-quickgelu", None)
    with torch.device("meta"):  # full-size layout without allocating or initialising 151M params
        model = build_clip_model("ViT-B-32-quickgelu")
    sd = model.state_dict()
    assert len(sd) == 302 and sd["text_projection"].shape == (512, 512)
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert tokenizer(["a photo of a face"]).shape == (1, 77)


def test_json_arch_resolves_relative_to_base_dir(tiny: dict[str, Path]) -> None:
    name, cfg = resolve_arch(tiny["config"].name, base_dir=tiny["dir"])
    assert name == "clip-tiny" and cfg == TINY_CLIP_CONFIG
    wrapped = tiny["dir"] / "open_clip_config.json"
    wrapped.write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    assert resolve_arch(str(wrapped))[1] == TINY_CLIP_CONFIG
    assert "clip-tiny" not in open_clip.list_models()  # nothing registered globally


def test_tiny_encoder_uses_packaged_tokenizer(encoder: ClipEncoder) -> None:
    assert isinstance(encoder.tokenizer, open_clip.SimpleTokenizer)
    assert encoder.tokenizer.context_length == 77


@pytest.mark.parametrize(
    ("arch", "needle"),
    [
        ("ViT-B/32", "ViT-B-32-quickgelu"),
        ("no-such-model", "ViT-B-32-quickgelu"),
        ("hf-hub:openai/clip", "not supported"),
        ("missing.json", "not found"),
    ],
)
def test_bad_arch_names(arch: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        resolve_arch(arch, base_dir=tmp_path)
    _assert_one_line(err, needle)


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "roberta-ViT-B-32"])
def test_towers_that_would_download_are_refused(arch: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        ClipEncoder(arch, tmp_path / "unused.pt")
    _assert_one_line(err, arch, "Hugging Face or timm")


def test_bad_arch_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WeightsError) as err:
        resolve_arch(str(bad))
    _assert_one_line(err, "bad.json", "not valid JSON")
    bad.write_text(json.dumps({"embed_dim": 512}))
    with pytest.raises(WeightsError) as err:
        resolve_arch(str(bad))
    _assert_one_line(err, "vision_cfg")


# ---------------------------------------------------------------------------- broken weights


def test_mismatched_state_dict_names_the_problem(tiny: dict[str, Path]) -> None:
    sd = load_clip_state_dict(tiny["open_clip"])
    for key in ("ln_final.weight", "ln_final.bias", "logit_scale"):
        del sd[key]
    sd["extra.one"] = torch.zeros(1)
    sd["extra.two"] = torch.zeros(1)
    sd["text_projection"] = torch.zeros(64, 256)
    path = tiny["dir"] / "x.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        ClipEncoder(str(tiny["config"]), path)
    _assert_one_line(
        err, "x.pt", "clip-tiny", "3 missing keys", "2 unexpected", "1 wrong shapes", "ln_final"
    )


def test_full_size_weights_do_not_fit_tiny_config(tiny: dict[str, Path]) -> None:
    other = tiny["dir"] / "not_clip.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError) as err:
        ClipEncoder(str(tiny["config"]), other)
    _assert_one_line(err, "not_clip.pt", "does not look like a CLIP checkpoint")


def _valid_bytes(tiny: dict[str, Path], fmt: str) -> bytes:
    return tiny[fmt].read_bytes()


BROKEN_FILES = {
    "empty": (lambda t: b"", "empty"),
    "truncated": (lambda t: _valid_bytes(t, "open_clip")[:100_000], "truncated"),
    "truncated_openai": (lambda t: _valid_bytes(t, "openai")[:-5000], "truncated"),
    "html": (
        lambda t: b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>",
        "HTML page",
    ),
    "html_leading_space": (lambda t: b"\n  <html><head>", "HTML page"),
    "random": (lambda t: np.random.default_rng(1).bytes(5000), "not a PyTorch checkpoint"),
    "random_pickle_marker": (lambda t: b"\x80" + np.random.default_rng(2).bytes(5000), "truncated"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_broken_files_raise_weights_error(kind: str, tiny: dict[str, Path]) -> None:
    make, needle = BROKEN_FILES[kind]
    path = tiny["dir"] / f"broken-{kind}.pt"
    path.write_bytes(make(tiny))
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(path)
    _assert_one_line(err, path.name, needle)
    with pytest.raises(WeightsError):
        ClipEncoder(str(tiny["config"]), path)


def test_corrupted_zip_member_is_detected(tiny: dict[str, Path]) -> None:
    data = bytearray(_valid_bytes(tiny, "open_clip"))
    start = data.find(b"data/0") + 400  # inside the first tensor's bytes
    data[start : start + 64] = bytes(64)
    path = tiny["dir"] / "bitrot.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(path)
    _assert_one_line(err, "bitrot.pt", "corrupt")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([torch.zeros(2)], "not a state dict"),
        ({"epoch": 1, "step": 2}, "not a state dict"),
        ({}, "not a state dict"),
        ({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(1)}, "pickled Python objects"),
    ],
)
def test_non_state_dict_checkpoints(payload: object, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(path)
    _assert_one_line(err, "ckpt.pt", needle)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(tmp_path / "ViT-B-32.pt")
    _assert_one_line(err, "ViT-B-32.pt", "not found")
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(tmp_path)
    _assert_one_line(err, "not a file")


# ---------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_random_vit_b_32_both_formats(tmp_path: Path) -> None:
    oa = write_random_clip(tmp_path, fmt="openai", dtype=torch.float16)
    oc = write_random_clip(tmp_path, fmt="open_clip", dtype=torch.float16)
    a = ClipEncoder("ViT-B-32-quickgelu", oa)
    b = ClipEncoder("ViT-B-32-quickgelu", oc)
    ta, tb = a.encode_text(PROMPTS), b.encode_text(PROMPTS)
    assert ta.shape == (3, 512) and torch.equal(ta, tb)
    assert a.encode_image([_face()]).shape == (1, 512)
