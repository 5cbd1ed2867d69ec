"""Tests for clipinvert.imaging: every image builds itself in tmp_path, no network, CPU only."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipinvert import imaging
from clipinvert.errors import InputError, UsageError
from clipinvert.imaging import (
    IMAGE_EXTENSIONS,
    UNREADABLE_IMAGE_EXTENSIONS,
    atomic_write,
    list_inputs,
    load_image,
    save_animation,
    save_image,
    save_tensor,
    side_by_side,
    to_pil,
    to_tensor,
)


def _noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """Incompressible content, so cutting a file in half really removes pixel data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _write(path: Path, image: Image.Image, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    return path


def _frames(n: int = 4, size: tuple[int, int] = (33, 21)) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    return [Image.new("RGB", size, colours[i % len(colours)]) for i in range(n)]


# --------------------------------------------------------------------------------------------
# list_inputs
# --------------------------------------------------------------------------------------------


def test_extensions_are_lowercase_with_dot() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".tiff", ".pgm"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


def test_list_inputs_recursive_sorted_filtered(tmp_path: Path) -> None:
    img = Image.new("RGB", (4, 4))
    for rel in [
        "b.png",
        "a/z.JPG",
        "a/deeper/c.webp",
        "a/m.TIFF",
        ".hidden.png",
        ".git/inside.png",
        "a/.cache/x.jpg",
    ]:
        _write(tmp_path / rel, img, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / "data.json").write_text("{}")
    (tmp_path / "x.png").mkdir()  # a folder with an image suffix is not an input

    got = list_inputs(tmp_path)
    rels = [rel.as_posix() for _, rel in got]
    assert rels == ["a/deeper/c.webp", "a/m.TIFF", "a/z.JPG", "b.png"]
    for full, rel in got:
        assert full.is_absolute()
        assert full == tmp_path / rel


def test_list_inputs_single_file_is_taken_as_is(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "face.unusual"
    f.parent.mkdir()
    f.write_bytes(b"whatever")
    assert list_inputs(f) == [(f, Path("face.unusual"))]


def test_list_inputs_empty_folder(tmp_path: Path) -> None:
    assert list_inputs(tmp_path) == []


def test_list_inputs_missing_root_is_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope") as info:
        list_inputs(missing)
    assert "\n" not in str(info.value)


def _tree(root: Path, *rels: str) -> Path:
    for rel in rels:
        _write(root / rel, Image.new("RGB", (2, 2)), format="PNG")
    return root


def _rels(pairs: list[tuple[Path, Path]]) -> list[str]:
    return [rel.as_posix() for _, rel in pairs]


@pytest.mark.parametrize("how", ["absolute", "relative", "dot-relative", "symlink"])
def test_list_inputs_excludes_output_folder_inside_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    photos = _tree(tmp_path / "photos", "a.png", "sub/b.png", "out/a.png", "out/sub/b.png")
    monkeypatch.chdir(photos)
    if how == "symlink":
        (tmp_path / "out-link").symlink_to(photos / "out", target_is_directory=True)
    given = {
        "absolute": photos / "out",
        "relative": Path("out"),
        "dot-relative": Path("./sub/../out"),
        "symlink": tmp_path / "out-link",
    }[how]
    notes: list[str] = []
    got = list_inputs(Path("."), exclude=[given], notes=notes)
    assert _rels(got) == ["a.png", "sub/b.png"]
    assert notes == ["skipped out: excluded folder"]
    for full, rel in got:
        assert full.is_absolute() and full == photos / rel


def test_list_inputs_exclude_reached_through_symlink_and_missing(tmp_path: Path) -> None:
    photos = _tree(tmp_path / "photos", "a.png", "out/x.png")
    (photos / "results").symlink_to(photos / "out", target_is_directory=True)
    notes: list[str] = []
    got = list_inputs(photos, exclude=[photos / "out", tmp_path / "does-not-exist"], notes=notes)
    assert _rels(got) == ["a.png"]
    assert notes == [f"skipped {photos / 'out'}: excluded folder",
                     f"skipped {photos / 'results'}: excluded folder"]
    # the root itself is never excluded: the caller decides what input == output means
    assert _rels(list_inputs(photos / "out", exclude=[photos / "out"])) == ["x.png"]


def test_list_inputs_symlink_loop_terminates_with_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tree(tmp_path / "photos", "a.png", "trip/b.png")
    (tmp_path / "photos" / "trip" / "loop").symlink_to("..", target_is_directory=True)
    (tmp_path / "photos" / "self").symlink_to(".", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    notes: list[str] = []
    got = list_inputs(Path("photos"), notes=notes)
    assert _rels(got) == ["a.png", "trip/b.png"]
    assert notes == [
        "skipped photos/self: symlink to a folder already walked (photos)",
        "skipped photos/trip/loop: symlink to a folder already walked (photos)",
    ]
    assert list_inputs(Path("photos")) == got  # notes are optional


def test_list_inputs_follows_symlinked_folder_elsewhere(tmp_path: Path) -> None:
    elsewhere = _tree(tmp_path / "elsewhere", "x.png", "deep/y.jpg", ".hidden/z.png")
    photos = _tree(tmp_path / "photos", "a.png")
    (photos / "linked").symlink_to(elsewhere, target_is_directory=True)
    (photos / "zz-second-link").symlink_to(elsewhere, target_is_directory=True)
    (photos / "x-deep").symlink_to(elsewhere / "deep", target_is_directory=True)
    (photos / "face.png").symlink_to(elsewhere / "x.png")  # a linked file is an input too
    notes: list[str] = []
    got = list_inputs(photos, notes=notes)
    assert _rels(got) == ["a.png", "face.png", "linked/deep/y.jpg", "linked/x.png"]
    for full, rel in got:
        assert full == photos / rel  # through the link name, not resolved
        assert full.is_file()
    # links are claimed in order of their path: "linked" walks elsewhere/ and its deep/
    assert notes == [
        f"skipped {photos / 'x-deep'}: symlink to a folder already walked "
        f"({photos / 'linked' / 'deep'})",
        f"skipped {photos / 'zz-second-link'}: symlink to a folder already walked "
        f"({photos / 'linked'})",
    ]


def test_list_inputs_real_folder_wins_over_link_to_it(tmp_path: Path) -> None:
    photos = _tree(tmp_path / "photos", "z/real/b.png")
    (photos / "a-link").symlink_to(photos / "z" / "real", target_is_directory=True)
    notes: list[str] = []
    assert _rels(list_inputs(photos, notes=notes)) == ["z/real/b.png"]
    assert notes == [f"skipped {photos / 'a-link'}: symlink to a folder already walked "
                     f"({photos / 'z' / 'real'})"]


def test_list_inputs_broken_symlinks_noted(tmp_path: Path) -> None:
    photos = _tree(tmp_path / "photos", "a.png")
    (photos / "gone.png").symlink_to(tmp_path / "missing.png")
    (photos / "gone-dir").symlink_to(tmp_path / "missing", target_is_directory=True)
    (photos / "ping").symlink_to(photos / "pong")
    (photos / "pong").symlink_to(photos / "ping")
    (photos / ".hidden-gone.png").symlink_to(tmp_path / "missing.png")
    notes: list[str] = []
    assert _rels(list_inputs(photos, notes=notes)) == ["a.png"]
    assert notes[:2] == [f"skipped {photos / 'gone-dir'}: broken symlink (target missing)",
                         f"skipped {photos / 'gone.png'}: broken symlink (target missing)"]
    assert [n.split(":")[0] for n in notes[2:]] == [f"skipped {photos / 'ping'}",
                                                    f"skipped {photos / 'pong'}"]
    assert all("broken symlink (" in n and "\n" not in n for n in notes)


def test_list_inputs_sorting_is_deterministic(tmp_path: Path) -> None:
    elsewhere = _tree(tmp_path / "elsewhere", "m.png")
    photos = _tree(tmp_path / "photos", "b.png", "a-b/c.png", "a/z.png", "a.b.png", "B.png")
    (photos / "a" / "link").symlink_to(elsewhere, target_is_directory=True)
    (photos / "raw.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    expected = ["B.png", "a-b/c.png", "a.b.png", "a/link/m.png", "a/z.png", "b.png", "raw.heic"]
    assert _rels(list_inputs(photos)) == expected  # plain code-point order of POSIX paths
    assert _rels(list_inputs(photos)) == expected


def test_unreadable_extensions() -> None:
    for ext in (".heic", ".heif", ".jxl", ".jp2", ".psd", ".svg", ".raw", ".cr2", ".cr3",
                ".nef", ".arw", ".dng", ".orf", ".rw2"):
        assert ext in UNREADABLE_IMAGE_EXTENSIONS
    assert not IMAGE_EXTENSIONS & UNREADABLE_IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in UNREADABLE_IMAGE_EXTENSIONS)
    Image.init()
    avif = Image.EXTENSION.get(".avif") == "AVIF"  # registered only with libavif present
    assert (".avif" in IMAGE_EXTENSIONS) is avif
    assert (".avif" in UNREADABLE_IMAGE_EXTENSIONS) is not avif


def test_unreadable_formats_listed_and_refused_clearly(tmp_path: Path) -> None:
    photos = _tree(tmp_path / "photos", "a.png")
    heic = photos / "IMG_0001.HEIC"
    # An ISO-BMFF header as written by iPhones: PIL has no decoder for it.
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    (photos / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (photos / "DSC_1.NEF").write_bytes(b"II*\x00" + bytes(64))
    (photos / "notes.txt").write_text("still not an input")
    rels = _rels(list_inputs(photos))
    assert rels == ["DSC_1.NEF", "IMG_0001.HEIC", "a.png", "logo.svg"]
    assert _reason(heic) == "HEIC images cannot be read here — convert to PNG or JPEG"
    assert _reason(photos / "logo.svg") == "SVG images cannot be read here — convert to PNG or JPEG"
    assert _reason(photos / "DSC_1.NEF") == (
        "NEF camera raw files cannot be read here — convert to PNG or JPEG")


def test_raw_refused_even_when_pil_could_open_its_preview(tmp_path: Path) -> None:
    dng = _write(tmp_path / "shot.dng", Image.new("RGB", (16, 12)), format="TIFF")
    assert "DNG camera raw files cannot be read here" in _reason(dng)


def test_mislabelled_heic_that_is_a_jpeg_still_loads(tmp_path: Path) -> None:
    f = _write(tmp_path / "really-a.heic", Image.new("RGB", (6, 4), (0, 200, 0)), format="JPEG")
    assert load_image(f).size == (6, 4)


def test_avif_loads_when_supported(tmp_path: Path) -> None:
    if ".avif" not in IMAGE_EXTENSIONS:
        f = tmp_path / "a.avif"
        f.write_bytes(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64))
        assert _reason(f) == "AVIF images cannot be read here — convert to PNG or JPEG"
        return
    f = _write(tmp_path / "a.avif", Image.new("RGB", (8, 8), (0, 0, 255)), format="AVIF")
    assert list_inputs(tmp_path) == [(f, Path("a.avif"))]
    r, g, b = load_image(f).getpixel((4, 4))
    assert b > 200 and r < 40 and g < 40


# --------------------------------------------------------------------------------------------
# load_image: bad inputs
# --------------------------------------------------------------------------------------------


def _reason(path: Path, **kw: int) -> str:
    with pytest.raises(InputError) as info:
        load_image(path, **kw)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _reason(tmp_path / "ghost.png")


def test_zero_byte_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.png"
    f.write_bytes(b"")
    assert _reason(f) == "empty file (0 bytes)"


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path: Path, fmt: str, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    _write(whole, _noise(), format=fmt)
    data = whole.read_bytes()
    load_image(whole)  # sanity: the intact file loads

    half = tmp_path / f"half{suffix}"
    half.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt image" in _reason(half)

    for cut in (20, 4):  # cut inside the header, and inside the signature itself
        stub = tmp_path / f"stub{cut}{suffix}"
        stub.write_bytes(data[:cut])
        assert "truncated or corrupt image" in _reason(stub)


def test_text_starting_like_a_weak_signature(tmp_path: Path) -> None:
    f = tmp_path / "car.bmp"
    f.write_text("BMW service notes\n")
    assert _reason(f) == "not an image file (contents are text)"


def test_text_renamed_to_png(tmp_path: Path) -> None:
    f = tmp_path / "notes.png"
    f.write_text("hello, this is certainly not a picture\n" * 5)
    msg = _reason(f)
    assert msg.startswith("not an image file (")
    assert "text" in msg


def test_binary_garbage_is_not_an_image(tmp_path: Path) -> None:
    f = tmp_path / "blob.jpg"
    f.write_bytes(bytes(range(256)) * 4)
    assert _reason(f).startswith("not an image file (")


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    d = tmp_path / "x.png"
    d.mkdir()
    assert "folder" in _reason(d)


def test_too_large_over_max_pixels(tmp_path: Path) -> None:
    f = _write(tmp_path / "big.png", Image.new("RGB", (120, 80)))
    assert _reason(f, max_pixels=5000).startswith("image too large: 120x80")
    assert load_image(f, max_pixels=120 * 80).size == (120, 80)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    """A tiny PNG whose header claims 100000x100000 pixels must fail before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    f = tmp_path / "bomb.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    assert _reason(f).startswith("image too large")


def test_permission_denied_real(tmp_path: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    f = _write(tmp_path / "locked.png", Image.new("RGB", (4, 4)))
    f.chmod(0)
    try:
        assert "permission denied" in _reason(f)
    finally:
        f.chmod(0o644)


def test_permission_denied_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write(tmp_path / "locked.png", Image.new("RGB", (4, 4)))

    def deny(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imaging.Image, "open", deny)
    assert "permission denied" in _reason(f)


def test_load_truncated_images_flag_untouched(tmp_path: Path) -> None:
    from PIL import ImageFile

    f = tmp_path / "half.png"
    buf = io.BytesIO()
    _noise().save(buf, format="PNG")
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(InputError):
        load_image(f)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


# --------------------------------------------------------------------------------------------
# load_image: modes
# --------------------------------------------------------------------------------------------


def _px(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert image.mode == "RGB"
    return image.getpixel(xy)  # type: ignore[return-value]


def test_rgb_round_trip_is_exact(tmp_path: Path) -> None:
    src = _noise()
    got = load_image(_write(tmp_path / "n.png", src))
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), np.asarray(src))


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 0, 128))
    got = load_image(_write(tmp_path / "rgba.png", im))
    assert _px(got, (0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert _px(got, (1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in _px(got, (2, 0)))


def test_la_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("LA", (2, 1), (0, 0))
    im.putpixel((1, 0), (50, 255))
    got = load_image(_write(tmp_path / "la.png", im))
    assert _px(got, (0, 0)) == (255, 255, 255)
    assert _px(got, (1, 0)) == (50, 50, 50)


def test_greyscale(tmp_path: Path) -> None:
    got = load_image(_write(tmp_path / "l.png", Image.new("L", (3, 3), 77)))
    assert got.size == (3, 3)
    assert _px(got) == (77, 77, 77)


def test_one_bit(tmp_path: Path) -> None:
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    got = load_image(_write(tmp_path / "bw.png", im))
    assert _px(got, (0, 0)) == (0, 0, 0)
    assert _px(got, (1, 0)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    got = load_image(_write(tmp_path / "p.png", im, transparency=0))
    assert _px(got, (0, 0)) == (255, 255, 255)
    assert _px(got, (1, 0)) == (255, 0, 0)


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (1, 1), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    assert _px(load_image(_write(tmp_path / "p.bmp", im))) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    got = load_image(_write(tmp_path / "cmyk.jpg", red, quality=95))
    r, g, b = _px(got, (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_greyscale_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 257 * 100, 32768]], dtype=np.uint16)
    src = Image.fromarray(values)
    assert src.mode.startswith("I;16")
    f = _write(tmp_path / "g16.png", src)
    with Image.open(f) as raw:  # make sure the file really is 16-bit
        assert raw.mode in ("I;16", "I")
    got = np.asarray(load_image(f))[0, :, 0]
    assert got.tolist() == [0, 255, 100, 128]


def test_16bit_pgm(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 257 * 200]], dtype=np.uint16)
    f = _write(tmp_path / "g16.pgm", Image.fromarray(values))
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 255, 200]


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    im = Image.frombytes("I;16B", (3, 1), bytes([0, 0, 255, 255, 0x80, 0x00]))
    f = _write(tmp_path / "g16.tif", im)
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 255, 128]


def test_float_tiff(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    f = _write(tmp_path / "f.tif", im)
    assert np.asarray(load_image(f))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    f = _write(tmp_path / "phone.jpg", im, exif=exif.tobytes())
    with Image.open(f) as raw:
        assert raw.size == (40, 20)
    assert load_image(f).size == (20, 40)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = _frames(3, (8, 8))
    f = tmp_path / "anim.gif"
    frames[0].save(f, save_all=True, append_images=frames[1:], duration=50, loop=0)
    got = load_image(f)
    assert got.size == (8, 8)
    assert _px(got, (4, 4)) == (255, 0, 0)


def test_webp_loads(tmp_path: Path) -> None:
    f = _write(tmp_path / "w.webp", Image.new("RGB", (10, 6), (0, 0, 255)), lossless=True)
    assert _px(load_image(f)) == (0, 0, 255)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def test_to_tensor_shape_range() -> None:
    batch = to_tensor([_noise(50, 30), Image.new("L", (10, 10), 255)], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert torch.allclose(batch[1], torch.ones(3, 32, 32))


def test_to_tensor_matches_torchvision() -> None:
    tv = pytest.importorskip("torchvision.transforms")
    t = tv.Compose([tv.Resize((32, 32)), tv.ToTensor(), tv.Normalize([0.5] * 3, [0.5] * 3)])
    img = _noise(70, 50, seed=3)
    assert torch.equal(to_tensor([img], 32)[0], t(img))


def test_to_pil_truncates_and_clamps() -> None:
    x = torch.full((1, 3, 2, 2), 127.99 / 127.5 - 1.0)
    x[0, :, 0, 1] = 5.0  # above range -> 255
    x[0, :, 1, 0] = -7.0  # below range -> 0
    x[0, :, 1, 1] = 1.0
    (img,) = to_pil(x)
    assert img.mode == "RGB" and img.size == (2, 2)
    assert _px(img, (0, 0)) == (127, 127, 127)  # 127.99 truncated, not rounded to 128
    assert _px(img, (1, 0)) == (255, 255, 255)
    assert _px(img, (0, 1)) == (0, 0, 0)
    assert _px(img, (1, 1)) == (255, 255, 255)


def test_to_pil_accepts_other_dtypes_and_grad() -> None:
    x = torch.zeros(2, 3, 4, 5, dtype=torch.float16, requires_grad=False)
    y = torch.zeros(1, 3, 4, 5, requires_grad=True)
    assert [im.size for im in to_pil(x)] == [(5, 4), (5, 4)]
    assert _px(to_pil(y * 1)[0]) == (127, 127, 127)


def test_tensor_round_trip() -> None:
    img = _noise(16, 16)
    back = to_pil(to_tensor([img], 16))[0]
    diff = np.abs(np.asarray(back, dtype=int) - np.asarray(img, dtype=int))
    assert diff.max() <= 1  # truncation may lose at most one level


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------


def test_atomic_write_temp_name_and_success(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "photo.png"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        Image.new("RGB", (3, 3)).save(tmp)  # format detected from the temporary suffix

    atomic_write(target, write)
    (tmp,) = seen
    assert tmp.parent == target.parent
    assert tmp.name.startswith(".photo.png.") and tmp.name.endswith(".partial.png")
    assert target.is_file() and not tmp.exists()
    assert os.listdir(target.parent) == ["photo.png"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_atomic_write_failure_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out.png"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"\x89PNG half")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert os.listdir(tmp_path) == []

    target.write_bytes(b"old complete result")
    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old complete result"
    assert os.listdir(tmp_path) == ["out.png"]


def test_save_image_formats(tmp_path: Path) -> None:
    img = _noise(20, 10)
    save_image(img, tmp_path / "a.png")
    save_image(img, tmp_path / "b.JPG")
    save_image(img, tmp_path / "c")
    with Image.open(tmp_path / "a.png") as a:
        assert a.format == "PNG" and np.array_equal(np.asarray(a), np.asarray(img))
    with Image.open(tmp_path / "b.JPG") as b:
        assert b.format == "JPEG" and b.size == (20, 10)
    with Image.open(tmp_path / "c") as c:
        assert c.format == "PNG"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.JPG", "c"]


def test_save_image_rgba_as_jpeg(tmp_path: Path) -> None:
    save_image(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), tmp_path / "t.jpg")
    with Image.open(tmp_path / "t.jpg") as im:
        assert im.getpixel((2, 2))[0] > 250  # white background, as in load_image


def test_save_tensor(tmp_path: Path) -> None:
    w = torch.randn(1, 18, 512)
    save_tensor({"latent": w}, tmp_path / "lat" / "a.pt")
    got = torch.load(tmp_path / "lat" / "a.pt", weights_only=True)
    assert torch.equal(got["latent"], w)
    assert os.listdir(tmp_path / "lat") == ["a.pt"]


# --------------------------------------------------------------------------------------------
# Animations
# --------------------------------------------------------------------------------------------


def test_gif_frames_loop_and_boomerang(tmp_path: Path) -> None:
    save_animation(_frames(4), tmp_path / "a.gif", fps=20)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4
        assert im.info.get("loop") == 0
        assert im.info.get("duration") == 50

    save_animation(_frames(2), tmp_path / "fast.gif", fps=120)
    with Image.open(tmp_path / "fast.gif") as im:
        assert im.info.get("duration") == 20  # browsers would slow anything shorter down

    save_animation(_frames(4), tmp_path / "b.gif", boomerang=True, loop=False)
    with Image.open(tmp_path / "b.gif") as im:
        assert im.n_frames == 6  # a b c d c b
        assert "loop" not in im.info
        colours = []
        for i in range(im.n_frames):
            im.seek(i)
            colours.append(im.convert("RGB").getpixel((5, 5)))
    assert colours[4] == colours[2] and colours[5] == colours[1]
    assert sorted(os.listdir(tmp_path)) == ["a.gif", "b.gif", "fast.gif"]


def test_webp_animation_lossless(tmp_path: Path) -> None:
    frames = _frames(3)
    save_animation(frames, tmp_path / "a.webp")
    with Image.open(tmp_path / "a.webp") as im:
        assert im.n_frames == 3
        im.seek(1)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(frames[1]))


def test_mp4_animation_even_dimensions(tmp_path: Path) -> None:
    ffmpeg = pytest.importorskip("imageio_ffmpeg")
    out = tmp_path / "a.mp4"
    save_animation(_frames(5, (33, 21)), out, fps=12, boomerang=True)
    assert out.stat().st_size > 0
    assert os.listdir(tmp_path) == ["a.mp4"]
    # Probe with plain subprocess calls: imageio-ffmpeg's frame reader leaks pipe handles.
    n_frames, _ = ffmpeg.count_frames_and_secs(str(out))
    assert n_frames == 8  # 5 frames + 3 on the way back
    probe = subprocess.run(
        [ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    video = next(line for line in probe.stderr.splitlines() if "Video:" in line)
    assert "h264" in video and "yuv420p" in video
    assert re.search(r"\b34x22\b", video)  # padded to even width and height


def test_animation_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="avi"):
        save_animation(_frames(2), tmp_path / "a.avi")
    with pytest.raises(UsageError):
        save_animation([], tmp_path / "a.gif")
    with pytest.raises(UsageError):
        save_animation(_frames(2), tmp_path / "a.gif", fps=0)
    assert os.listdir(tmp_path) == []


def test_animation_mixed_sizes_follow_first(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 10), "red"), Image.new("L", (7, 7), 128)]
    save_animation(frames, tmp_path / "m.gif")
    with Image.open(tmp_path / "m.gif") as im:
        assert im.size == (20, 10) and im.n_frames == 2


# --------------------------------------------------------------------------------------------
# side_by_side
# --------------------------------------------------------------------------------------------


def test_side_by_side_size() -> None:
    imgs = [Image.new("RGB", (40, 20)), Image.new("RGB", (30, 30)), Image.new("L", (10, 10))]
    strip = side_by_side(imgs)
    assert strip.mode == "RGB"
    assert strip.size == (40 + 20 + 20, 20)

    tall = side_by_side(imgs, height=40)
    assert tall.size == (80 + 40 + 40, 40)


def test_side_by_side_labels() -> None:
    imgs = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    strip = side_by_side(imgs, labels=["input", "a very long label that cannot fit at all"])
    assert strip.width == 128 and strip.height > 64
    band = np.asarray(strip)[64:]
    assert band.min() < 128  # some text was drawn
    assert np.asarray(strip)[:64, :64].tolist() == np.asarray(imgs[0]).tolist()
    with pytest.raises(ValueError):
        side_by_side(imgs, labels=["only one"])
