"""Issue 20's image path: the fast encoders (fpng, JPEG XL), the device-side uint8 conversion,
readers that resize ahead of the model, the bounded writer queue and CLIPINVERT_TIMING.

The rule throughout: the pixels of every output are the same as the old path's (PIL decode of
PIL-written PNGs, numpy's ``astype(uint8)``), only the bytes and the time differ.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipinvert import imaging, timing
from clipinvert.batch import (
    OutputWriter,
    PrepareOptions,
    prepare,
    prepared_stream,
    reader_kind,
)
from clipinvert.cli import main
from clipinvert.errors import UsageError


# ---- the old path, as it was (the references) ------------------------------------------------
def old_to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32)
    for i, image in enumerate(images):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
        arr = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True))
        out[i] = arr.permute(2, 0, 1).to(torch.float32).div(255.0)
    return out.sub_(0.5).div_(0.5)


def old_to_uint8(batch: torch.Tensor) -> np.ndarray:
    x = batch.detach().to(device="cpu", dtype=torch.float32)
    x = torch.nan_to_num(x, nan=-1.0)
    x = ((x + 1) / 2).clamp(0, 1) * 255
    return x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)


def pil_png(image: Image.Image, level: int = 1) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def decoded(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert(im.mode))


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---- [-1, 1] → uint8 -------------------------------------------------------------------------
def _boundary_values() -> torch.Tensor:
    """Values whose uint8 is decided by the last bit: every k/255 boundary in [-1, 1], a float32
    step either side, the ends, beyond the ends, NaN and the infinities."""
    k = torch.arange(256, dtype=torch.float64)
    edges = (k / 255 * 2 - 1).to(torch.float32)
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)),
                      torch.nextafter(edges, torch.tensor(-2.0))])
    special = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1.5, -1.5, 1e30, -1e30, float("nan"),
                            float("inf"), float("-inf")])
    rand = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    return torch.cat([near, special, rand])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_to_uint8_equals_the_old_numpy_conversion(dtype: torch.dtype) -> None:
    values = _boundary_values()
    n = values.numel() // 3 * 3
    side = 1
    while side * side * 3 < n:
        side += 1
    flat = torch.full((3 * side * side,), -1.0)
    flat[:n] = values[:n]
    batch = flat.reshape(1, 3, side, side).to(dtype)
    got = imaging.to_uint8(batch)
    assert got.dtype == torch.uint8 and got.shape == (1, side, side, 3)
    assert np.array_equal(got.numpy(), old_to_uint8(batch))
    assert [im.tobytes() for im in imaging.to_pil(batch)] == \
        [Image.fromarray(a).tobytes() for a in old_to_uint8(batch)]


def test_to_uint8_edges_and_nan_policy() -> None:
    x = torch.tensor([-1.0, 1.0, float("nan"), float("inf"), float("-inf"), 0.0])
    x = x.reshape(1, 3, 1, 2)
    got = imaging.to_uint8(x)[0].reshape(-1).tolist()
    # channel-major input → HWC: pixel 0 = (x[0], x[2], x[4]), pixel 1 = (x[1], x[3], x[5])
    assert got == [0, 0, 0, 255, 255, 127]


def test_to_host_pixels_on_the_cpu_are_ready_views() -> None:
    batch = torch.rand(2, 3, 5, 4) * 2 - 1
    pending = imaging.to_host_pixels(batch)
    assert [p.ready for p in pending] == [None, None]
    assert np.array_equal(np.stack([p.wait() for p in pending]), old_to_uint8(batch))


# ---- input pixels ----------------------------------------------------------------------------
def test_to_pixels_and_to_tensor_equal_the_released_transform(face_crop: Image.Image) -> None:
    images = [face_crop, face_crop.resize((300, 180)), face_crop.convert("L"),
              Image.fromarray(_noise((97, 131, 3)))]
    want = old_to_tensor(images, 64)
    assert torch.equal(imaging.to_tensor(images, 64), want)
    pixels = torch.from_numpy(np.stack([imaging.to_pixels(im, 64) for im in images]))
    assert torch.equal(imaging.normalize_pixels(pixels), want)


def test_editor_preprocess_pixels_equals_preprocess(tiny_editor, face_crop: Image.Image) -> None:
    size = tiny_editor.input_size
    images = [face_crop, Image.fromarray(_noise((200, 200, 3), 1))]
    want = tiny_editor.preprocess(images)
    for _ in range(4):  # around the staging ring and back
        got = tiny_editor.preprocess_pixels([imaging.to_pixels(im, size) for im in images])
        assert torch.equal(got, want) and got.stride() == want.stride()
    with pytest.raises(UsageError):
        tiny_editor.preprocess_pixels([np.zeros((8, 8, 3), np.uint8)])


def test_readers_resize_ahead_in_threads_with_the_same_pixels(tmp_path: Path,
                                                              face_crop: Image.Image) -> None:
    sources = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        face_crop.rotate(i * 10).save(p)
        sources.append((p, Path(str(i))))
    sources.append((tmp_path / "missing.png", Path("missing")))
    opts = PrepareOptions(model_size=32)
    assert reader_kind(opts) == "thread" and reader_kind(PrepareOptions(align=True)) == "process"
    got = list(prepared_stream(sources, opts, workers=2, window=3))
    assert [p.rel for p in got] == [rel for _, rel in sources]  # in order, failures included
    assert got[-1].error == "file not found" and not got[-1].crops
    for item, (src, _) in zip(got[:-1], sources, strict=False):
        (crop,) = item.crops
        assert np.array_equal(crop.pixels, imaging.to_pixels(imaging.load_image(src), 32))
        assert item.cpu_s > 0
    assert prepare(sources[0][0], Path("0"), PrepareOptions()).crops[0].pixels is None


def test_reader_kind_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPINVERT_READER", "process")
    assert reader_kind(PrepareOptions()) == "process"
    monkeypatch.setenv("CLIPINVERT_READER", "fibres")
    with pytest.raises(UsageError, match="CLIPINVERT_READER"):
        reader_kind(PrepareOptions())


# ---- encoders --------------------------------------------------------------------------------
def _outputs(face_crop: Image.Image) -> dict[str, Image.Image]:
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    return {"astronaut": photo, "astronaut-1024": photo.resize((1024, 1024)),
            "face": face_crop, "noise": Image.fromarray(_noise((67, 45, 3))),
            "flat": Image.new("RGB", (40, 30), (12, 200, 7)),
            "rgba": Image.fromarray(_noise((33, 50, 4), 2)),
            "grey": Image.fromarray(_noise((20, 21), 3)),
            "palette": face_crop.convert("P")}


def test_png_pixels_are_pils_whatever_the_encoder(tmp_path: Path, face_crop: Image.Image) -> None:
    import fpng  # noqa: F401 - the encoder under test must be there

    for name, image in _outputs(face_crop).items():
        path = tmp_path / f"{name}.png"
        imaging.save_image(image, path)
        with Image.open(path) as im:
            assert im.mode == image.mode, name
        assert np.array_equal(decoded(path), decoded(pil_png(image))), name
        if image.mode in ("RGB", "RGBA"):  # fpng wrote it (its bytes are not zlib's)
            assert path.read_bytes() != pil_png(image), name
        else:  # other modes keep PIL's own encoding of them
            assert path.read_bytes() == pil_png(image), name


def test_png_falls_back_to_pil_zlib(tmp_path: Path, face_crop: Image.Image,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fpng", None)  # not installed
    imaging.save_image(face_crop, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == pil_png(face_crop, 1)
    monkeypatch.delitem(sys.modules, "fpng")
    import fpng

    def broken(arr: np.ndarray) -> bytes:
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(fpng, "from_ndarray", broken)
    imaging.save_image(np.asarray(face_crop), tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == pil_png(face_crop, 1)


def test_png_levels_other_than_1_are_pils_zlib(tmp_path: Path, face_crop: Image.Image) -> None:
    for level in (0, 6, 9):
        imaging.save_image(face_crop, tmp_path / f"{level}.png", png_level=level)
        assert (tmp_path / f"{level}.png").read_bytes() == pil_png(face_crop, level)


def test_jxl_is_lossless_and_jpeg_webp_unchanged(tmp_path: Path, face_crop: Image.Image) -> None:
    import imagecodecs

    assert "jxl" in imaging.OUTPUT_EXTENSIONS
    for name, image in _outputs(face_crop).items():
        if name == "astronaut-1024":
            continue
        imaging.save_image(image, tmp_path / f"{name}.jxl")
        got = imagecodecs.jpegxl_decode((tmp_path / f"{name}.jxl").read_bytes())
        want = np.asarray(image if image.mode in ("RGB", "RGBA") else imaging._to_rgb(image))
        assert np.array_equal(got, want), name
    # JPEG goes through imagecodecs' libjpeg-turbo: byte for byte PIL's file; WebP is PIL's
    for name, image in _outputs(face_crop).items():
        for ext, fmt in (("jpg", "JPEG"), ("webp", "WEBP")):
            if ext == "webp" and name.startswith("astronaut"):
                continue  # slow, and the same PIL call as the others
            for given in (image, np.asarray(image)):
                if isinstance(given, np.ndarray) and image.mode not in ("RGB", "RGBA"):
                    continue
                imaging.save_image(given, tmp_path / f"{name}.{ext}")
                buf = io.BytesIO()  # the old save_image, PIL all the way
                pil = Image.fromarray(given) if isinstance(given, np.ndarray) else given
                if ext == "jpg" and pil.mode not in ("RGB", "L", "CMYK"):
                    pil = imaging._to_rgb(pil)
                pil.save(buf, format=fmt, quality=95)
                assert (tmp_path / f"{name}.{ext}").read_bytes() == buf.getvalue(), (name, ext)


def test_save_image_waits_for_pending_pixels(tmp_path: Path) -> None:
    class Event:
        waited = False

        def synchronize(self) -> None:
            Event.waited = True

    arr = _noise((9, 7, 3))
    imaging.save_image(imaging.PendingPixels(arr, Event()), tmp_path / "p.png")
    assert Event.waited and np.array_equal(decoded(tmp_path / "p.png"), arr)


# ---- the writer pool -------------------------------------------------------------------------
def test_writer_queue_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def save(image: object, path: Path, *, png_level: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1
        path.write_bytes(b"x")

    monkeypatch.setattr(imaging, "save_image", save)
    writer = OutputWriter(threads=2, queue=3)
    submitted = []

    def produce() -> None:
        for i in range(8):
            writer.save(np.zeros((1, 1, 3), np.uint8), tmp_path / f"{i}.png", 1)
            submitted.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(1.0)
    assert producer.is_alive() and len(submitted) == 3  # the fourth waits for room
    gate.set()
    producer.join(10)
    writes = writer.take()
    for _, future in writes:
        future.result()
    writer.close()
    assert len(submitted) == 8 and len(writes) == 8 and most[0] <= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.png" for i in range(8))


# ---- the command: same pixels as the old path, timing lines ----------------------------------
def _reference_edit(tiny_models: Path, inputs: list[Path], prompt: str,
                    batch: int) -> list[np.ndarray]:
    """The old path: PIL images → to_tensor → edit → numpy's uint8, batch by batch."""
    from clipinvert import Editor

    editor = Editor("tiny", models=tiny_models, device="cpu")
    emb = editor.embed(prompt)
    out: list[np.ndarray] = []
    for k in range(0, len(inputs), batch):
        images = [imaging.load_image(p) for p in inputs[k:k + batch]]
        res = editor.edit(old_to_tensor(images, editor.input_size), emb)
        out.extend(old_to_uint8(res.images))
    return out


@pytest.mark.parametrize("workers", ["0", "2"])
def test_edit_pngs_have_the_old_paths_pixels(tiny_models: Path, tmp_path: Path,
                                             face_crop: Image.Image, workers: str,
                                             capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    face_crop.save(photos / "a.png")
    face_crop.rotate(30).save(photos / "b.jpg", quality=90)
    Image.fromarray(_noise((70, 70, 3))).save(photos / "c.png")
    out = tmp_path / "out"
    prompt = "she has wavy blond hair"
    rc = main(["edit", str(photos), prompt, "-o", str(out), "-b", "2", "--models",
               str(tiny_models), "--domain", "tiny", "--device", "cpu", "--workers", workers,
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    inputs = sorted(photos.iterdir())
    want = _reference_edit(tiny_models, inputs, prompt, batch=2)
    for src, ref in zip(inputs, want, strict=True):
        got = out / f"{src.stem}.png"
        assert np.array_equal(decoded(got), decoded(pil_png(Image.fromarray(ref)))), src.name


def test_timing_lines_only_when_asked(tiny_models: Path, tmp_path: Path, face_crop: Image.Image,
                                      capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        face_crop.rotate(i).save(photos / f"{i}.png")
    args = ["edit", str(photos), "a smile", "--models", str(tiny_models), "--domain", "tiny",
            "--device", "cpu", "--workers", "0", "-b", "2", "--quiet"]
    was = timing.ENABLED
    try:
        timing.set_enabled(False)
        assert main([*args, "-o", str(tmp_path / "off")]) == 0
        assert timing.PREFIX not in capsys.readouterr().err
        timing.set_enabled(True)
        assert main([*args, "-o", str(tmp_path / "on")]) == 0
        captured = capsys.readouterr()
    finally:
        timing.set_enabled(was)
    lines = [ln for ln in captured.err.splitlines() if ln.startswith(timing.PREFIX)]
    text = "\n".join(lines)
    for phase in ("since process start", "weight loads", "text embedding", "first batch",
                  "totals: 3 images", "readers", "writers", "model"):
        assert phase in text, text
    assert timing.PREFIX not in captured.out  # stdout stays the result only


def test_timing_reads_the_environment() -> None:
    code = "import clipinvert.timing as t; print(t.ENABLED)"
    for value, want in (("1", "True"), ("0", "False"), (None, "False")):
        env = {k: v for k, v in os.environ.items() if k != "CLIPINVERT_TIMING"}
        if value is not None:
            env["CLIPINVERT_TIMING"] = value
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert got == want, value


def test_gpu_idle_from_event_pairs() -> None:
    class Ev:
        def __init__(self, t: float) -> None:
            self.t = t

        def elapsed_time(self, other: Ev) -> float:
            return other.t - self.t

    spans = [(Ev(0), Ev(8)), (Ev(10), Ev(18)), (Ev(18), Ev(20))]
    got = timing.gpu_idle(spans)  # type: ignore[arg-type]
    assert got == {"gpu": pytest.approx(0.018), "gpu_idle": pytest.approx(0.1)}
