"""The Python API: determinism, the edit maths' invariants, interpolation endpoints, options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clipinvert import Editor
from clipinvert.errors import UsageError, WeightsError
from clipinvert.imaging import to_pil
from clipinvert.pipeline import resolve_device, resolve_dtype
from clipinvert.testing.models import tiny_config, write_clipinverter


def test_remapper_without_text_is_the_plain_generator(tiny_editor: Editor, face_crop) -> None:
    enc = tiny_editor.encode([face_crop])
    dec = tiny_editor.inverter.decoder
    plain_sd = {k: v for k, v in dec.state_dict().items()
                if not k.startswith(("affine_mlps", "lambdas"))}
    from clipinvert.nets import Generator, GeneratorConfig

    cfg = GeneratorConfig.from_state_dict(plain_sd)
    plain = Generator(cfg).eval()
    plain.load_state_dict(plain_sd)
    with torch.no_grad():
        torch.testing.assert_close(dec(enc.w), plain(enc.w), atol=0, rtol=0)
        # and λ·mix = 0 is exactly the plain generator as well
        t = tiny_editor.embed_text(["a man"])
        torch.testing.assert_close(dec(enc.w, t, mix=0.0), plain(enc.w), atol=0, rtol=0)


def test_deterministic_and_batch_independent(tiny_editor: Editor, face_crop, cat_photo) -> None:
    a = tiny_editor.edit([face_crop, cat_photo], "a smiling person").images
    b = tiny_editor.edit([face_crop, cat_photo], "a smiling person").images
    assert torch.equal(a, b)
    alone = tiny_editor.edit([cat_photo], "a smiling person").images
    torch.testing.assert_close(alone[0], a[1], atol=1e-4, rtol=1e-4)


def test_strength_zero_is_inversion_and_strength_scales(tiny_editor: Editor, face_crop) -> None:
    inv = tiny_editor.invert([face_crop])
    zero = tiny_editor.edit([face_crop], "blond hair", strength=0.0)
    assert torch.equal(zero.images, inv.images)
    half = tiny_editor.edit([face_crop], "blond hair", strength=0.5)
    full = tiny_editor.edit([face_crop], "blond hair", strength=1.0)
    torch.testing.assert_close(half.latents - inv.latents, 0.5 * (full.latents - inv.latents),
                               atol=1e-5, rtol=1e-4)
    assert full.remapped is not None and full.remapped.shape == (1, 6, 64)


def test_interpolation_endpoints_are_invert_and_edit_pixel_for_pixel(tiny_editor: Editor,
                                                                     face_crop) -> None:
    frames = tiny_editor.interpolate([face_crop], "he has a beard", steps=5, strength=0.7)
    assert len(frames) == 5
    first = to_pil(frames[0].images)[0]
    last = to_pil(frames[-1].images)[0]
    assert first.tobytes() == tiny_editor.invert([face_crop]).pil()[0].tobytes()
    assert last.tobytes() == tiny_editor.edit([face_crop], "he has a beard", 0.7).pil()[0].tobytes()
    # monotone walk: the distance to the inversion grows frame by frame
    d = [float((f.latents - frames[0].latents).norm()) for f in frames]
    assert d == sorted(d) and d[0] == 0
    with pytest.raises(UsageError):
        tiny_editor.interpolate([face_crop], "x", steps=1)


def test_text_embeddings_are_cached_once_per_prompt(tiny_editor: Editor, monkeypatch) -> None:
    calls: list[list[str]] = []
    real = tiny_editor.clip.encode_text
    monkeypatch.setattr(tiny_editor.clip, "encode_text", lambda p: calls.append(list(p)) or real(p))
    tiny_editor._text_cache.clear()
    e1 = tiny_editor.embed_text(["p1", "p2", "p1"])
    e2 = tiny_editor.embed_text(["p2"])
    assert calls == [["p1", "p2"]]
    assert e1.shape == (3, 512) and torch.equal(e1[1], e2[0])
    assert float(e1[0].norm()) != pytest.approx(1.0, abs=1e-3)  # raw, not L2-normalised


def test_reference_image_and_raw_embedding_conditions(tiny_editor: Editor, face_crop,
                                                      cat_photo) -> None:
    by_image = tiny_editor.edit([face_crop], cat_photo)
    emb = tiny_editor.embed_images([cat_photo])[0]
    by_vector = tiny_editor.edit([face_crop], emb)
    assert torch.equal(by_image.images, by_vector.images)
    by_text = tiny_editor.edit([face_crop], "a cat")
    assert not torch.equal(by_text.images, by_image.images)
    with pytest.raises(UsageError):
        tiny_editor.edit([face_crop], 42)  # type: ignore[arg-type]


def test_tensor_input_matches_pil_input(tiny_editor: Editor, face_crop) -> None:
    from clipinvert.imaging import to_tensor

    x = to_tensor([face_crop], 256)
    torch.testing.assert_close(tiny_editor.encode(x).w, tiny_editor.encode([face_crop]).w)
    with pytest.raises(UsageError):
        tiny_editor.preprocess(torch.zeros(3, 256, 256))


def test_encoded_features_are_reused_for_many_prompts(tiny_editor: Editor, face_crop) -> None:
    enc = tiny_editor.encode([face_crop])
    a = tiny_editor.edit(enc, "blond hair")
    b = tiny_editor.edit([face_crop], "blond hair")
    assert torch.equal(a.images, b.images)


def test_from_files_and_lazy_loading(tiny_files: dict, face_crop) -> None:
    ed = Editor.from_files(**tiny_files, device="cpu")
    assert ed.loaded == {}
    ed.invert([face_crop])
    assert set(ed.loaded) == {"e4e", "clipinverter"}  # no CLIP needed for an inversion
    ed.edit([face_crop], "x")
    assert "clip" in ed.loaded


def test_mismatched_decoder_is_a_weights_error(tiny_models: Path, tmp_path: Path,
                                               face_crop) -> None:
    other = write_clipinverter(tmp_path / "ci64.pt", tiny_config(64, 64, 32), encoder="tiny")
    root = tiny_models.parent
    ed = Editor.from_files(e4e=root / "tiny-e4e.pt", clipinverter=other, device="cpu")
    with pytest.raises(WeightsError, match="does not match the e4e"):
        ed.invert([face_crop])


def test_missing_weights_fail_lazily_with_exit_3(tmp_path: Path, face_crop) -> None:
    ed = Editor.from_files(e4e=tmp_path / "nope.pt", device="cpu")
    with pytest.raises(WeightsError) as err:
        ed.invert([face_crop])
    assert err.value.exit_code == 3


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            resolve_device("cuda:0")
        with pytest.raises(UsageError):
            resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_bfloat16_runs_on_cpu(tiny_models: Path, face_crop) -> None:
    """bfloat16 end to end stays within PSNR 40 dB of float32 on the test photo (8-bit
    outputs, as saved) — the bound a GPU run in half precision must meet too."""
    import numpy as np

    ed = Editor("tiny", models=tiny_models, device="cpu", dtype="bfloat16")
    out = ed.edit([face_crop], "blond hair")
    assert out.images.dtype == torch.bfloat16 and torch.isfinite(out.images.float()).all()
    ref = Editor("tiny", models=tiny_models, device="cpu").edit([face_crop], "blond hair")
    low = np.asarray(out.pil()[0], dtype=np.float64)
    full = np.asarray(ref.pil()[0], dtype=np.float64)
    psnr = 10 * np.log10(255**2 / max(np.mean((low - full) ** 2), 1e-12))
    assert psnr >= 40, f"bfloat16 vs float32: PSNR {psnr:.1f} dB"


def test_cuda_auto_batch_fits_memory_and_measured_cap() -> None:
    """Measured per-image memory (0.75 GiB at 1024 px float32, half in float16, a quarter at
    512 px), never past the measured cap of 8, never 0."""
    from clipinvert.pipeline import CUDA_AUTO_MAX, cuda_auto_batch

    gib = 2**30
    assert CUDA_AUTO_MAX == 8
    assert cuda_auto_batch(3 * gib, 1024, torch.float32) == 3  # 0.8 · 3 / 0.75 = 3.2
    assert cuda_auto_batch(3 * gib, 1024, torch.float16) == 6
    assert cuda_auto_batch(gib, 512, torch.float32) == 4
    assert cuda_auto_batch(130 * gib, 1024, torch.float32) == 8  # the cap, not the memory
    assert cuda_auto_batch(gib // 4, 1024, torch.float32) == 1


def test_decode_formulation_override(tiny_models: Path, face_crop, monkeypatch) -> None:
    """CLIPINVERT_DECODE picks the generator's formulation (the measured per-device default
    otherwise); the edit is the same picture within a grey level, and a wrong name is a usage
    error naming the choices."""
    from clipinvert.nets.stylegan2 import ModulatedConv2d

    def edit() -> tuple[Editor, torch.Tensor]:
        ed = Editor("tiny", models=tiny_models, device="cpu")
        return ed, ed.edit([face_crop], "blond hair").images

    monkeypatch.delenv("CLIPINVERT_DECODE", raising=False)
    default, ref = edit()
    assert all(m.fused for m in default.generator.modules() if isinstance(m, ModulatedConv2d))
    monkeypatch.setenv("CLIPINVERT_DECODE", "unfused-cl")
    ed, out = edit()
    convs = [m for m in ed.inverter.decoder.modules() if isinstance(m, ModulatedConv2d)]
    assert convs and all(not m.fused and m.channels_last for m in convs)
    assert (out - ref).abs().max() * 127.5 < 1
    monkeypatch.setenv("CLIPINVERT_DECODE", "grouped")
    with pytest.raises(UsageError, match="fused, unfused, unfused-cl"):
        edit()


GOLDEN = Path(__file__).parent / "golden" / "tiny_edit.pt"


def _golden_now(editor: Editor, face_crop: Image.Image) -> dict[str, torch.Tensor]:
    enc = editor.encode([face_crop])
    res = editor.edit(enc, "she has wavy blond hair")
    return {"w": enc.w[0, :, :8].clone(), "w_edit": res.latents[0, :, :8].clone(),
            "remapped": res.remapped[0, :, :8].clone(),
            "image": res.images[0, :, ::4, ::4].clone(),
            "inversion": editor.invert(enc).images[0, :, ::4, ::4].clone()}


def test_golden_tensors(editor: Editor, face_crop) -> None:
    """Numerics of the whole pipeline on fixed seeded weights; a refactor must not move them.

    Regenerate deliberately with CLIPINVERT_REGEN_GOLDEN=1 (and say why in the commit).
    """
    import os

    now = _golden_now(editor, face_crop)
    if os.environ.get("CLIPINVERT_REGEN_GOLDEN"):
        torch.save(now, GOLDEN)
    golden = torch.load(GOLDEN, weights_only=True)
    assert golden.keys() == now.keys()
    for k in golden:
        torch.testing.assert_close(now[k], golden[k], atol=1e-4, rtol=1e-4, msg=k)


def test_adapter_of_another_encoder_is_a_weights_error(tiny_models: Path, face_crop) -> None:
    root = tiny_models.parent  # a tiny e4e with the released-width adapter beside it
    ed = Editor.from_files(e4e=root / "tiny-e4e.pt", clipinverter=root / "clipinverter.pt",
                           device="cpu")
    with pytest.raises(WeightsError, match="belong to different models"):
        ed.invert([face_crop])


def test_text_embeddings_are_kept_on_disk_and_skip_clip(tiny_models: Path, monkeypatch) -> None:
    """A prompt seen before is read back bit for bit, without building CLIP; the token count
    comes with it.  CLIPINVERT_NO_TEXT_CACHE=1 turns the store off."""
    from clipinvert import Editor

    prompt = "a person with a text-cache test moustache"
    first = Editor("tiny", models=tiny_models, device="cpu")
    made = first.embed_text([prompt])
    assert "clip" in first.__dict__  # computed: CLIP was built
    again = Editor("tiny", models=tiny_models, device="cpu")
    assert torch.equal(again.embed_text([prompt]), made)
    assert again.prompt_tokens(prompt) == first.prompt_tokens(prompt)
    assert "clip" not in again.__dict__  # read back: CLIP never built
    monkeypatch.setenv("CLIPINVERT_NO_TEXT_CACHE", "1")
    off = Editor("tiny", models=tiny_models, device="cpu")
    assert torch.equal(off.embed_text([prompt]), made) and "clip" in off.__dict__
