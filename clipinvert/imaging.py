"""Image I/O for clipinvert: finding inputs, safe decoding, tensor conversion, atomic outputs.

Why this module exists as one place:

* Real-world photo folders contain everything: 16-bit PNGs, CMYK JPEGs, transparent stickers,
  phone pictures that are only upright because of an EXIF tag, half-copied files, stray text
  files with an image suffix.  Every one of them must either become a proper 8-bit RGB image or
  fail with a one-line :class:`~clipinvert.errors.InputError` so the batch can go on.  PIL's own
  exceptions never leave :func:`load_image`.
* The networks expect exactly what the released e4e/CLIPInverter code fed them (BILINEAR resize,
  ``[-1, 1]`` range) and their outputs are turned back into pixels the same way (``tensor2im``),
  so results match the reference implementation bit for bit where it matters.
* Outputs are written atomically: a crash, Ctrl-C or full disk never leaves a half-written file
  that a later ``--skip-existing`` run would mistake for a finished result.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import stat
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from clipinvert.errors import InputError, UsageError
from clipinvert.fileio import atomic_write
from clipinvert.registry import RESIZE_POLICIES  # a domain's ``resize`` (models.toml)

# Formats PIL may try when opening an input.  Restricting the list keeps PIL from handing
# arbitrary files to risky or exotic decoders (EPS would call Ghostscript, for example) while
# still accepting every common photo format, whatever the file's suffix says.
_OPEN_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "MPO",
    "WEBP",
    "BMP",
    "DIB",
    "TIFF",
    "GIF",
    "PPM",
    "TGA",
    "ICO",
    "QOI",
    "AVIF",
)

# Suffixes of photo formats that may turn up in a photo folder, with how to name them in an
# error message.  Those PIL cannot open here (with the formats above) are still listed as
# inputs, so a batch reports them as failed instead of silently leaving them out.
_UNREADABLE_CANDIDATES: dict[str, str] = {
    ".heic": "HEIC images",
    ".heif": "HEIF images",
    ".hif": "HEIF images",
    ".avif": "AVIF images",
    ".avifs": "AVIF images",
    ".jxl": "JPEG XL images",
    ".jp2": "JPEG 2000 images",
    ".j2k": "JPEG 2000 images",
    ".jpf": "JPEG 2000 images",
    ".jpx": "JPEG 2000 images",
    ".psd": "Photoshop (PSD) files",
    ".svg": "SVG images",
    ".svgz": "SVG images",
}
_RAW_SUFFIXES: tuple[str, ...] = (
    ".raw", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng",
    ".orf", ".rw2", ".raf", ".pef", ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw",
)
_UNREADABLE_CANDIDATES.update({ext: f"{ext[1:].upper()} camera raw files" for ext in _RAW_SUFFIXES})


def _readable_suffix(suffix: str) -> bool:
    """True when PIL registers ``suffix`` for a format that :func:`load_image` may open.

    Optional codecs register their suffixes only when installed (Pillow's AVIF plugin does so
    only with libavif present), so e.g. ``.avif`` is readable on some builds and not others.
    """
    fmt = Image.EXTENSION.get(suffix)
    return fmt is not None and fmt in _OPEN_FORMATS and fmt in Image.OPEN


Image.init()  # registers every plugin's suffixes (load_image calls it anyway)

#: Suffixes (lower case, with the dot) of the image files a folder walk picks up and decodes.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
    | {ext for ext in _UNREADABLE_CANDIDATES if _readable_suffix(ext)}
)

#: Suffixes of image formats this build cannot read.  A folder walk lists them anyway, and
#: :func:`load_image` refuses them with a one-line reason naming the format.
UNREADABLE_IMAGE_EXTENSIONS: frozenset[str] = frozenset(_UNREADABLE_CANDIDATES) - IMAGE_EXTENSIONS

# Camera raw files are TIFF-like: PIL would decode just the small embedded preview, so they
# are refused before PIL sees them.  Other unreadable suffixes get a chance first (a JPEG
# saved as ``.heic`` still loads) and only a failure is worded from the suffix.
_REFUSE_UP_FRONT: frozenset[str] = UNREADABLE_IMAGE_EXTENSIONS & frozenset(_RAW_SUFFIXES)


def _unreadable_reason(path: Path) -> str:
    suffix = path.suffix.lower()
    return f"{_UNREADABLE_CANDIDATES[suffix]} cannot be read here — convert to PNG or JPEG"


# Leading bytes of the formats above, used only to word error messages: a file that starts
# like a PNG but cannot be opened is a damaged PNG, not "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"qoif", "QOI"),
)

# Errors PIL (and the codecs under it) raise for damaged data.  Broad on purpose: decoders
# report corruption through many exception types, and none of them may escape load_image.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    ZeroDivisionError,
    RuntimeError,
)


# --------------------------------------------------------------------------------------------
# Finding inputs
# --------------------------------------------------------------------------------------------


def list_inputs(
    root: Path, exclude: Sequence[Path] = (), notes: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """Resolve an input argument to ``(absolute path, relative path)`` pairs.

    A single file is taken as is (whatever its suffix: the user named it, so a bad one should
    fail loudly in :func:`load_image` rather than be silently skipped).  A folder is walked
    recursively for files whose suffix is in :data:`IMAGE_EXTENSIONS` or
    :data:`UNREADABLE_IMAGE_EXTENSIONS` (the latter fail in :func:`load_image` with a reason,
    instead of vanishing from the batch); the relative path lets callers mirror the input tree
    in the output folder.  The result is sorted by relative POSIX path so runs are reproducible
    across file systems.

    The walk:

    * skips hidden files and folders (``.git``, ``.DS_Store``, our own ``.partial``
      temporaries) silently;
    * never enters a folder in ``exclude`` (typically the output folder when it lies inside the
      input).  Folders are compared by identity (device and inode), so ``out``, ``./out``, an
      absolute path or a symlink to it all match; the root itself is never excluded;
    * follows symlinked folders, and relative paths go through the link's name.  Every real
      folder is walked once: plain sub-folders are claimed first, then symlinked ones in order
      of their relative path, and a link to a folder already walked (a loop back to a parent,
      or a second link to the same place) is skipped;
    * skips broken symlinks and unreadable sub-folders.

    Each thing skipped other than hidden ones adds one line to ``notes`` (when given), e.g.
    ``skipped photos/loop: symlink to a folder already walked (photos)``; paths in notes are
    the root as given joined with the relative path.
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"input not found: {root}")
    if root.is_file():
        return [(root.absolute(), Path(root.name))]
    if not root.is_dir():
        raise UsageError(f"input is neither a file nor a folder: {root}")

    def note(rel: Path, why: str) -> None:
        if notes is not None:
            notes.append(f"skipped {root / rel}: {why}")

    def identity(st: os.stat_result) -> tuple[int, int]:
        return st.st_dev, st.st_ino

    excluded: set[tuple[int, int]] = set()
    for folder in exclude:
        with contextlib.suppress(OSError):  # a folder that does not exist cannot be walked into
            excluded.add(identity(os.stat(folder)))

    base = root.absolute()
    wanted = IMAGE_EXTENSIONS | UNREADABLE_IMAGE_EXTENSIONS
    walked: dict[tuple[int, int], Path] = {identity(base.stat()): Path(".")}
    links: list[tuple[str, Path]] = []  # symlinked folders still to walk, as (sort key, rel)
    found: list[tuple[Path, Path]] = []

    def claim(rel: Path, st: os.stat_result, is_link: bool) -> bool:
        """Mark the folder at ``rel`` as walked, or note why it is skipped."""
        key = identity(st)
        if key in excluded:
            note(rel, "excluded folder")
            return False
        if key in walked:
            what = "symlink to a folder" if is_link else "folder"
            note(rel, f"{what} already walked ({root / walked[key]})")
            return False
        walked[key] = rel
        return True

    def walk(top: Path) -> None:
        """Walk ``top`` (already claimed) and its plain sub-folders; queue symlinked ones."""
        stack = [top]
        while stack:
            rel = stack.pop()
            try:
                with os.scandir(base / rel) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                if rel == Path("."):
                    raise UsageError(
                        f"cannot read input folder: {root} ({exc.strerror or exc})"
                    ) from None
                note(rel, f"cannot read folder ({exc.strerror or exc})")
                continue
            subdirs: list[Path] = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                child = rel / entry.name
                wanted_file = Path(entry.name).suffix.lower() in wanted
                try:
                    if entry.is_symlink():
                        # os.stat, not entry.stat: the latter has no inode on Windows.
                        try:
                            st = os.stat(base / child)  # follows the link
                        except OSError as exc:  # missing target, a loop of links (ELOOP)
                            missing = isinstance(exc, FileNotFoundError)
                            why = "target missing" if missing else exc.strerror or str(exc)
                            note(child, f"broken symlink ({why})")
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            heapq.heappush(links, (child.as_posix(), child))
                        elif wanted_file and stat.S_ISREG(st.st_mode):
                            found.append((base / child, child))
                    elif entry.is_dir(follow_symlinks=False):
                        if claim(child, os.lstat(base / child), is_link=False):
                            subdirs.append(child)
                    elif wanted_file and entry.is_file(follow_symlinks=False):
                        found.append((base / child, child))
                except OSError as exc:  # vanished meanwhile, no permission, ...
                    note(child, f"cannot access ({exc.strerror or exc})")
            stack.extend(reversed(subdirs))  # depth first, in name order

    walk(Path("."))
    while links:
        _, rel = heapq.heappop(links)
        try:
            st = (base / rel).stat()
        except OSError as exc:  # changed since it was listed
            note(rel, f"broken symlink ({exc.strerror or exc})")
            continue
        if claim(rel, st, is_link=True):
            walk(rel)

    found.sort(key=lambda pair: pair[1].as_posix())
    return found


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _sniff(path: Path) -> tuple[str | None, bool]:
    """Guess ``(image format, looks like text)`` from the first bytes, for error wording only."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None, False
    textish = _looks_like_text(head)
    for magic, name in _MAGIC:
        # A file cut inside the signature itself (2+ bytes left) still counts as that format.
        partial = 2 <= len(head) < len(magic) and magic.startswith(head)
        if head.startswith(magic) or partial:
            # "BM" is too short a signature to beat plain text ("BMW service notes").
            if not (name == "BMP" and textish):
                return name, False
    if head[:4] == b"RIFF" and (len(head) < 12 or head[8:12] == b"WEBP"):
        return "WEBP", False
    if re.match(rb"P[1-6]\s", head):  # plain PNM variants are text, but they are images
        return "PPM", False
    return None, textish


def _looks_like_text(head: bytes) -> bool:
    """True for UTF-8 text without control characters (the head may end mid-character)."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(c.isprintable() or c in "\t\n\r\f" for c in text)
    return False


def _too_large(size: tuple[int, int], max_pixels: int) -> InputError:
    w, h = size
    return InputError(f"image too large: {w}x{h} (limit {max_pixels:,} pixels)")


def _int_bit_depth(im: Image.Image, arr: np.ndarray) -> int:
    """Bit depth of an integer-mode image, so values are scaled by range rather than clipped.

    ``I;16*`` modes are 16-bit by definition.  Mode ``I`` is a 32-bit container that PIL uses
    for several sources: 16-bit PGM (PIL already normalises those to 0..65535), TIFFs with a
    declared ``BitsPerSample``, and others; when the file does not say, the smallest common
    depth that holds the data is assumed.
    """
    if im.mode.startswith("I;16"):
        return 16
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        bits = tags.get(258)
        if isinstance(bits, tuple):
            bits = bits[0] if bits else None
        if isinstance(bits, int) and 1 <= bits <= 32:
            signed = tags.get(339) in (2, (2,))
            return bits - 1 if signed else bits
    if im.format == "PPM":
        return 16
    peak = int(arr.max()) if arr.size else 0
    for bits in (8, 16, 24):
        if peak < (1 << bits):
            return bits
    return 31  # signed 32-bit container


def _int_to_l(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer greyscale image to 8 bits (65535 -> 255), rounding."""
    arr = np.asarray(im).astype(np.int64)
    bits = _int_bit_depth(im, arr)
    top = (1 << bits) - 1
    arr = np.clip(arr, 0, top)
    scaled = (arr * 255 + top // 2) // top
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _float_to_l(im: Image.Image) -> Image.Image:
    """Map a float greyscale image to 8 bits.

    Float images carry no bit depth, so the usual conventions are assumed: data within
    ``[0, 1]`` is normalised, data within ``[0, 255]`` is already in 8-bit units, and anything
    brighter (HDR) is scaled by its maximum.  NaN/inf become black; negatives clip to 0.
    """
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(arr.max()) if arr.size else 0.0
    if peak <= 1.0:
        arr = arr * 255.0
    elif peak > 255.0:
        arr = arr * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white.

    White, not black: a transparent background converted naively becomes black, which the
    encoder then tries to reproduce as part of the face photo.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return _int_to_l(im).convert("RGB")
    if mode == "F":
        return _float_to_l(im).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def load_image(path: Path, max_pixels: int = 100_000_000) -> Image.Image:
    """Decode ``path`` to a fully loaded 8-bit RGB image, or raise :class:`InputError`.

    The whole image is decoded here (``load()``), so a truncated file fails now, with a clear
    message, instead of deep inside the model later.  The size is checked from the header
    before decoding, so an oversized image (or a decompression bomb) costs no memory.  EXIF
    orientation is applied because phones store portrait photos sideways; animated files yield
    their first frame.  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never touched: silently
    grey-padded faces would be worse than an error.  A format this build cannot read (a suffix
    in :data:`UNREADABLE_IMAGE_EXTENSIONS`: HEIC, JPEG XL, camera raw, ...) fails with a reason
    naming it, e.g. ``HEIC images cannot be read here — convert to PNG or JPEG``.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("file not found") from None
    except PermissionError:
        raise InputError("permission denied (cannot read the file)") from None
    except OSError as exc:
        raise InputError(f"cannot access file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise InputError("is a folder, not an image file")
    if st.st_size == 0:
        raise InputError("empty file (0 bytes)")
    if path.suffix.lower() in _REFUSE_UP_FRONT:
        raise InputError(_unreadable_reason(path))

    try:
        with warnings.catch_warnings():
            # PIL warns (rather than fails) between MAX_IMAGE_PIXELS and twice that; our own
            # max_pixels check below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()
            formats = [f for f in _OPEN_FORMATS if f in Image.OPEN]
            with Image.open(path, formats=formats) as im:
                if im.width * im.height > max_pixels:
                    raise _too_large(im.size, max_pixels)
                try:
                    im.load()
                except MemoryError:
                    raise InputError(f"image too large to decode: {im.width}x{im.height}") from None
                except _DECODE_ERRORS:
                    raise InputError("truncated or corrupt image (decoding failed)") from None
                try:
                    upright = ImageOps.exif_transpose(im)
                except _DECODE_ERRORS:
                    upright = im  # unreadable EXIF: keep the pixels, lose only the rotation
                try:
                    return _to_rgb(upright)
                except _DECODE_ERRORS:
                    raise InputError(f"unsupported image mode {im.mode!r}") from None
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        raise InputError(f"image too large: {pixels} (decompression-bomb guard)") from None
    except PermissionError:
        raise InputError("permission denied (cannot read the file)") from None
    except FileNotFoundError:
        raise InputError("file not found") from None
    except IsADirectoryError:
        raise InputError("is a folder, not an image file") from None
    except MemoryError:
        raise InputError("image too large to decode (out of memory)") from None
    except _DECODE_ERRORS as exc:
        # The header could not be read.  Word the reason from the leading bytes: a damaged PNG
        # and a text file renamed to .png need different fixes.
        fmt, textish = _sniff(path)
        if fmt is not None:
            raise InputError(f"truncated or corrupt image ({fmt} header unreadable)") from None
        if path.suffix.lower() in UNREADABLE_IMAGE_EXTENSIONS:  # a real HEIC, an SVG (text), ...
            raise InputError(_unreadable_reason(path)) from None
        if textish:
            raise InputError("not an image file (contents are text)") from None
        if isinstance(exc, UnidentifiedImageError):
            raise InputError("not an image file (unrecognised or unsupported format)") from None
        raise InputError("truncated or corrupt image (cannot read header)") from None


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as the encoder's uint8 ``(size, size, 3)`` input: the released e4e transform's
    ``Resize((size, size))`` on the PIL image (BILINEAR, which PIL antialiases when
    shrinking).  Readers call it ahead of the model (batch.prepare); :func:`to_tensor` too, so
    both give the same bytes."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8, copy=True)


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` pixels, on any device, as the float32 ``(B, 3, S, S)`` model input
    in ``[-1, 1]`` (``ToTensor`` then ``Normalize(0.5, 0.5)``, the same float32 operations in
    the same order as ever, so the values are the same on the CPU and a GPU).  The result is
    channels-last in memory (a view of the HWC bytes), which the CPU encoder prefers."""
    return pixels.permute(0, 3, 1, 2).to(torch.float32).div(255.0).sub(0.5).div(0.5)


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Stack images into a ``(B, 3, size, size)`` float32 batch in ``[-1, 1]``.

    Mirrors the released e4e transform exactly: ``Resize((size, size))`` on the PIL image
    (BILINEAR, which PIL antialiases when shrinking), ``ToTensor`` (divide by 255) and
    ``Normalize(0.5, 0.5)``.  Any other resampler shifts the inversion slightly.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    pixels = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        pixels[i] = to_pixels(image, size)
    return normalize_pixels(torch.from_numpy(pixels)).contiguous()


def fit_square(image: Image.Image, policy: str = "stretch") -> Image.Image:
    """``image`` made square by a domain's ``resize`` policy, before :func:`to_tensor`.

    ``stretch`` returns it unchanged (:func:`to_tensor` squashes it, changing its aspect ratio);
    ``center-crop`` keeps the centred square of side ``min(w, h)`` (offsets rounded down), which
    is what AFHQ's and CUB's generators were trained on; ``pad`` centres it on a black square of
    side ``max(w, h)``, so nothing is cut off.  Why one function: ``train``, ``edit`` and
    ``eval`` all call it, so a model sees the same pixels of one photo in each of them.
    Cropping (or padding) before the one resize keeps :func:`to_tensor`'s released transform
    untouched.  An unknown policy is a :class:`ValueError` (the registry checks its files).
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {policy!r}: use {', '.join(RESIZE_POLICIES)}")
    w, h = image.size
    if policy == "stretch" or w == h:
        return image
    if policy == "center-crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(image.convert("RGB"), ((side - w) // 2, (side - h) // 2))
    return canvas


def to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Generator output ``(B, 3, H, W)`` (about ``[-1, 1]``) as uint8 ``(B, H, W, 3)`` pixels,
    computed where the tensor is (on a GPU: no float batch crosses the bus, only the bytes).

    Same arithmetic as the released ``tensor2im``: ``(x + 1) / 2``, clamp to ``[0, 1]``,
    ``* 255`` and *truncate*, not round, so outputs match published ones.  The maths runs in
    float32 whatever the model's dtype, and the float → uint8 cast truncates towards zero like
    numpy's ``astype(uint8)`` did here before, so the bytes are the same on every device
    (tests/test_imaging_io.py proves it against that numpy reference, rounding edges included).
    A single ``(3, H, W)`` image is accepted too.  NaNs (a diverged edit) become black; +inf
    white, -inf black.
    """
    x = batch.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(batch.shape)}")
    x = torch.nan_to_num(x.to(torch.float32), nan=-1.0)
    x = ((x + 1) / 2).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """Turn generator output ``(B, 3, H, W)`` (about ``[-1, 1]``) into uint8 RGB images
    (:func:`to_uint8`, then to the CPU)."""
    arr = to_uint8(batch).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


def to_host_pixels(batch: torch.Tensor) -> list[PendingPixels]:
    """Generator output as one uint8 ``(H, W, 3)`` image per sample in host memory, for the
    writer threads (:func:`save_image` takes them as they are).

    The conversion (:func:`to_uint8`) runs on the tensor's device.  On CUDA the bytes go to
    page-locked host memory with a ``non_blocking`` copy and a CUDA event recorded after it:
    nothing here waits for the GPU (no ``.cpu()``, ``.item()``, ``.numpy()`` of a device
    tensor, no ``synchronize``); each writer waits on the event in its own thread
    (:meth:`PendingPixels.wait`).  The pinned buffers come from PyTorch's caching host
    allocator and stay alive while a writer holds their numpy view, so a buffer is reused only
    after its image is written.  On the CPU the arrays are plain views, ready at once.
    """
    pixels = to_uint8(batch)
    if pixels.device.type == "cuda":
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        arr = host.numpy()
        return [PendingPixels(arr[i], ready) for i in range(arr.shape[0])]
    arr = pixels.cpu().numpy()
    return [PendingPixels(arr[i]) for i in range(arr.shape[0])]


# --------------------------------------------------------------------------------------------
# Atomic outputs
# --------------------------------------------------------------------------------------------


# ``atomic_write`` lives in :mod:`clipinvert.fileio` (one helper for every file clipinvert
# writes); it is re-exported here because image, tensor and manifest writers call it as
# ``imaging.atomic_write``.


#: Output image formats (``--ext``), the one list: PNG (lossless, the default), JPEG and WebP
#: at quality 95, lossless JPEG XL (through imagecodecs: as fast as fpng's PNG and ~30 %
#: smaller, but fewer programs open it).
OUTPUT_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "webp", "jxl")


def _format_for(path: Path) -> str:
    """PIL format name for ``path``'s suffix; PNG (lossless) when there is none or it is unknown.
    ``JXL`` for ``.jxl`` (written through imagecodecs, not PIL)."""
    suffix = path.suffix.lower()
    if suffix == ".jxl":
        return "JXL"
    return Image.registered_extensions().get(suffix, "PNG")


PNG_LEVEL = 1
"""Default ``--png-level``.  Level 1 is written by fpng (a 1024² photo in ~4-6 ms of one core
against ~65-90 ms for zlib level 1, file ~7 % larger; docs/performance.md), or by PIL's zlib at
level 1 where fpng is missing or fails; any other level is PIL's zlib at that level (0 = stored,
9 = smallest).  Pixels are the same at every level and with either encoder."""


class PendingPixels:
    """An output image still arriving: uint8 ``(H, W, 3)`` pixels that an asynchronous
    device → host copy is filling, and the CUDA event recorded after that copy.  A writer
    thread calls :meth:`wait` (which blocks that thread only, never the model's) before
    reading the bytes.  On the CPU there is no event and :meth:`wait` returns at once."""

    __slots__ = ("array", "ready")

    def __init__(self, array: np.ndarray, ready: object | None = None) -> None:
        self.array, self.ready = array, ready

    def wait(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()  # type: ignore[attr-defined]
        return self.array


ImageOut = Image.Image | np.ndarray | PendingPixels
"""What :func:`save_image` takes: a PIL image, or uint8 ``(H, W, 3)`` RGB pixels (possibly
still arriving from the GPU)."""


def as_pil(image: ImageOut) -> Image.Image:
    """A PIL image of output pixels (waiting first for pixels still arriving from the GPU),
    for what needs a picture: PIL's encoders, paste-back, strips, animations."""
    if isinstance(image, PendingPixels):
        image = image.wait()
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


def _fpng(arr: np.ndarray) -> bytes | None:
    """PNG bytes from fpng (uint8 RGB/RGBA), or None when fpng is missing or fails: the
    caller then uses PIL's zlib.  fpng is pinned (pyproject) because it is alpha-versioned;
    its output decodes bit-exact with PIL (tests/test_imaging_io.py)."""
    try:
        import fpng
    except ImportError:
        return None
    try:
        return fpng.from_ndarray(np.ascontiguousarray(arr))
    except Exception:  # noqa: BLE001 - any failure of the fast path falls back to zlib
        return None


def _jxl(arr: np.ndarray) -> bytes:
    """Lossless JPEG XL at effort 1 (imagecodecs' libjxl): ~5-7 ms a 1024² photo."""
    try:
        import imagecodecs
    except ImportError:
        raise UsageError("--ext jxl needs imagecodecs (pip install imagecodecs)") from None
    return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(arr), lossless=True, effort=1,
                                           numthreads=1))


def _jpeg(arr: np.ndarray) -> bytes | None:
    """JPEG quality 95 through imagecodecs' libjpeg-turbo: the same bytes as PIL's (same
    library, same settings: tests/test_imaging_io.py compares them) in 3.7 core-ms a 1024²
    photo against PIL's 5.2 (PIL also copies the pixels into an image first).  None where
    imagecodecs is missing or fails: PIL writes it."""
    try:
        import imagecodecs

        return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(arr), level=95))
    except Exception:  # noqa: BLE001 - ImportError or an encoder error: PIL's path
        return None


def encode_image(image: ImageOut, fmt: str, *, png_level: int = PNG_LEVEL) -> bytes | None:
    """The file's bytes from a fast encoder, or None when PIL is to write it (see
    :func:`save_image`).  Why not always PIL: its PNG (zlib) took 65-90 core-ms a 1024² photo,
    the largest cost of a batch run on a GPU (issue 20)."""
    if isinstance(image, PendingPixels):
        image = image.wait()
    if isinstance(image, np.ndarray):
        arr: np.ndarray | None = image
    elif image.mode in ("RGB", "RGBA"):
        arr = np.asarray(image)
    else:
        arr = None  # other modes (L, P, ...) keep PIL's own encoding of them
    if fmt == "JXL":
        return _jxl(arr if arr is not None else np.asarray(_to_rgb(image)))  # type: ignore[arg-type]
    if fmt == "PNG" and png_level == PNG_LEVEL and arr is not None:
        return _fpng(arr)
    if fmt == "JPEG" and arr is not None and arr.ndim == 3 and arr.shape[2] == 3:
        return _jpeg(arr)
    return None


def save_image(image: ImageOut, path: Path, *, png_level: int = PNG_LEVEL) -> None:
    """Save atomically in the format the suffix names (PNG by default).

    JPEG and WebP are written at quality 95: these are final results, and the default 75 shows
    visible artefacts on skin and hair.  PNGs at ``png_level`` (:data:`PNG_LEVEL`: 1 is fpng
    when it works, else PIL's zlib), ``.jxl`` lossless JPEG XL.  ``image`` may be a PIL image
    or uint8 ``(H, W, 3)`` RGB pixels (:class:`PendingPixels` waits for them first), so a
    writer thread, not the model's, pays for making a picture of them.
    """
    path = Path(path)
    fmt = _format_for(path)
    data = encode_image(image, fmt, png_level=png_level)
    if data is not None:
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return
    img = as_pil(image)
    params: dict[str, object] = {}
    if fmt == "JPEG":
        params = {"quality": 95}
        if img.mode not in ("RGB", "L", "CMYK"):
            img = _to_rgb(img)
    elif fmt == "WEBP":
        params = {"quality": 95}
    elif fmt == "PNG":
        params = {"compress_level": png_level}

    def write(tmp: Path) -> None:
        img.save(tmp, format=fmt, **params)

    atomic_write(path, write)


def save_tensor(obj: dict[str, torch.Tensor], path: Path) -> None:
    """``torch.save`` atomically; tensors go to CPU first so the file loads on any machine."""
    portable = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}
    atomic_write(Path(path), lambda tmp: torch.save(portable, tmp))


def _even(frame: Image.Image) -> np.ndarray:
    """RGB array padded (edge-replicated) to even width/height, which yuv420p requires."""
    arr = np.asarray(frame.convert("RGB"))
    h, w = arr.shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    return np.pad(arr, pad, mode="edge") if (h % 2 or w % 2) else arr


def save_animation(
    frames: Sequence[Image.Image],
    path: Path,
    fps: float = 10.0,
    loop: bool = True,
    boomerang: bool = False,
) -> None:
    """Write frames (e.g. an edit-strength sweep) as ``.gif``, ``.webp`` or ``.mp4``, atomically.

    GIF for universal previews, lossless WebP for exact frames, H.264/yuv420p MP4 for anything
    that plays in browsers and messengers.  ``boomerang`` appends the frames reversed without
    repeating the two ends, so a looping sweep plays smoothly back and forth.  All frames are
    brought to the first frame's size.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".webp", ".mp4"):
        shown = suffix or "(none)"
        raise UsageError(f"unsupported animation format {shown!r}: use .gif, .webp or .mp4")
    if not frames:
        raise UsageError("no frames to write")
    if not fps > 0:
        raise UsageError(f"fps must be positive, got {fps}")

    size = frames[0].size
    seq: list[Image.Image] = []
    for frame in frames:
        rgb = frame.convert("RGB")  # always a copy: safe to clear its metadata below
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        rgb.info = {}  # a source GIF's "loop"/"duration" must not override ours
        seq.append(rgb)
    if boomerang:  # a b c d -> a b c d c b (then loops to a); 1-2 frames are unchanged
        seq = seq + seq[-2:0:-1]
    duration_ms = max(1, round(1000.0 / fps))

    if suffix == ".gif":
        # GIF counts in 1/100 s and browsers replace delays under 20 ms by 100 ms, so
        # very high frame rates are capped at 50 fps rather than played in slow motion.
        gif_ms = max(20, duration_ms)

        def write(tmp: Path) -> None:
            extra = {"loop": 0} if loop else {}  # no NETSCAPE block at all: play once
            seq[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=seq[1:],
                duration=gif_ms,
                optimize=True,
                **extra,
            )

    elif suffix == ".webp":

        def write(tmp: Path) -> None:
            seq[0].save(
                tmp,
                format="WEBP",
                save_all=True,
                append_images=seq[1:],
                duration=duration_ms,
                loop=0 if loop else 1,
                lossless=True,
            )

    else:
        try:
            import imageio.v2 as iio
            import imageio_ffmpeg  # noqa: F401  (the plugin imageio needs for mp4)
        except ImportError:
            raise UsageError(
                "mp4 output needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg);"
                " or use .gif/.webp"
            ) from None

        def write(tmp: Path) -> None:
            writer = iio.get_writer(
                tmp,
                format="FFMPEG",
                mode="I",
                fps=fps,
                codec="libx264",
                pixelformat="yuv420p",
                quality=None,
                macro_block_size=1,
                output_params=["-crf", "18", "-movflags", "+faststart"],
                ffmpeg_log_level="error",
            )
            with writer:
                for frame in seq:
                    writer.append_data(_even(frame))

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# Comparison strips
# --------------------------------------------------------------------------------------------


def _fit_label(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
) -> str:
    """Shorten ``text`` with '...' until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def side_by_side(
    images: Sequence[Image.Image],
    labels: Sequence[str] | None = None,
    height: int | None = None,
) -> Image.Image:
    """Concatenate images left to right at a common height, optionally labelled underneath.

    Used for ``input | inversion | edit ...`` previews: seeing the inversion next to the input
    is how users judge whether an odd edit comes from the edit or from a poor inversion.
    Aspect ratios are kept; labels use PIL's built-in font (scaled with the strip) so no font
    files are needed, and are shortened to fit under their image.
    """
    if not images:
        raise ValueError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    h = int(height) if height is not None else images[0].height
    if h <= 0:
        raise ValueError(f"height must be positive, got {h}")

    tiles: list[Image.Image] = []
    for im in images:
        rgb = im if im.mode == "RGB" else _to_rgb(im)
        w = max(1, round(rgb.width * h / rgb.height))
        tiles.append(rgb if rgb.size == (w, h) else rgb.resize((w, h), Image.Resampling.LANCZOS))

    total_w = sum(t.width for t in tiles)
    band = 0
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None
    if labels is not None:
        font = ImageFont.load_default(size=max(10, h // 20))
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        top, bottom = probe.textbbox((0, 0), "Ag", font=font)[1::2]
        pad = max(2, (bottom - top) // 3)
        band = bottom - top + 2 * pad

    strip = Image.new("RGB", (total_w, h + band), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = 0
    for i, tile in enumerate(tiles):
        strip.paste(tile, (x, 0))
        if labels is not None and font is not None:
            text = str(labels[i])
            try:
                text = _fit_label(draw, text, font, tile.width - 4)
            except UnicodeError:  # bitmap fallback font is Latin-1 only
                text = _fit_label(
                    draw, text.encode("ascii", "replace").decode(), font, tile.width - 4
                )
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            tx = x + (tile.width - (right - left)) // 2 - left
            ty = h + (band - (bottom - top)) // 2 - top
            draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
        x += tile.width
    return strip
