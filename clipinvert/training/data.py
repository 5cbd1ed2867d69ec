"""Training data: images paired with their captions *by name*, reproducible sample by sample.

The released training code sorted the image list and the caption list separately and paired them
by position, so one extra or missing file shifted every caption onto the wrong image (and its cat
and bird loaders did not load at all).  Here every image finds its own caption file from its own
relative path, and anything that cannot be paired is reported with its file name.

Layouts (``docs/training-data.md``), chosen with ``--data-format`` or detected from the folder:

* ``celeba`` — Multi-Modal CelebA-HQ: ``DIR/images/<stem>.<ext>`` +
  ``DIR/celeba-caption/<stem>.txt``;
* ``cub`` — CUB-200-2011 with Reed et al.'s captions: ``DIR/images/<class>/<name>.jpg`` +
  ``DIR/text_c10/<class>/<name>.txt`` (or AttnGAN's ``text/``; DIR may also be AttnGAN's
  ``birds/`` folder holding ``CUB_200_2011/``).  With ``images.txt`` and ``bounding_boxes.txt``
  beside ``images/`` each bird is cropped as AttnGAN cropped it (:func:`cub_crop_box`);
* ``afhq`` — an AFHQ folder (``DIR/train/cat``, ``DIR/val/cat``, or one of those folders) whose
  captions come from a JSONL manifest (``captions.jsonl`` in the image folder or in DIR);
* ``sidecar`` — ``a.png`` + ``a.txt`` (or ``a.png.txt``) side by side, anywhere under DIR;
* ``jsonl`` — a manifest (``DIR/captions.jsonl`` or any ``.jsonl`` file) of
  ``{"image": path, "captions": [...]}`` lines, paths relative to the manifest's folder.

A caption file holds one caption per line (blank lines ignored); each sample draws one of them.

Splits (``split``): ``all`` takes every image; ``train`` and ``test`` take the data set's own
lists, as the paper did — AFHQ's ``train/`` and ``val/`` (or ``test/``) folders, AttnGAN's
``train|test/filenames.pickle`` for CUB (else CUB's ``train_test_split.txt``), and Multi-Modal
CelebA-HQ's ``train|test/filenames.pickle``.  Non-square images are squared by the domain's
``resize`` policy (:func:`~clipinvert.imaging.fit_square`), exactly as ``edit`` and ``eval`` do.

Images only (``images_only=True``, the e4e stage: docs/training.md#e4e-stage): the same layouts,
splits, crops and draws, but no caption is read or needed — every readable image of the layout is
a sample (its caption ``""``), and a folder of bare images (no layout at all) is one too.

Reproducibility: the caption drawn and the horizontal flip of a sample depend only on
``(seed, epoch, index)`` — never on global RNG state — so a run resumed mid-epoch, data decoded in
worker processes, or several DDP ranks all see exactly the samples an uninterrupted single-process
run sees.  :class:`ResumableSampler` orders the samples the same way, from ``(seed, epoch)``, and
its state (epoch, position) lets a resumed run continue at the very next sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from clipinvert.errors import InputError, UsageError, first_line
from clipinvert.imaging import (
    UNREADABLE_IMAGE_EXTENSIONS,
    fit_square,
    list_inputs,
    load_image,
    to_tensor,
)
from clipinvert.registry import RESIZE_POLICIES

__all__ = [
    "DATA_FORMATS",
    "SPLITS",
    "ImageCaptionDataset",
    "ResumableSampler",
    "Sample",
    "check_image",
    "collate",
    "cub_crop_box",
    "derive_seed",
    "detect_format",
    "find_cub",
    "load_sample_image",
    "read_name_list",
    "split_validation",
]

#: Values of ``--data-format``.
DATA_FORMATS: tuple[str, ...] = ("auto", "celeba", "cub", "afhq", "sidecar", "jsonl")

#: Values of ``--split``: everything, or the data set's own train or test list.
SPLITS: tuple[str, ...] = ("all", "train", "test")

#: Name of the manifest ``auto`` looks for in a data folder.
MANIFEST_NAME = "captions.jsonl"

# Folder names of the two tree layouts: (image folders accepted, caption folder).
#: Image folders of a CelebA-HQ root: ours, then the CelebAMask-HQ download's own name.
CELEBA_IMAGE_FOLDERS = ("images", "CelebA-HQ-img")
_CELEBA_CAPTIONS = "celeba-caption"
_CUB_IMAGES = ("images",)
#: Caption folders of CUB: Reed et al.'s download, then AttnGAN's copy of it.
CUB_CAPTION_FOLDERS = ("text_c10", "text")
#: The folder of the CUB-200-2011 download inside AttnGAN's ``birds/`` data folder.
CUB_SUBFOLDER = "CUB_200_2011"
#: AFHQ's folders per split (v1 names its test images ``val``, v2 ``test``).
AFHQ_SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}

_FORMAT_NAMES = {
    "celeba": "Multi-Modal CelebA-HQ",
    "cub": "CUB",
    "afhq": "AFHQ",
    "sidecar": "sidecar captions",
    "jsonl": "JSONL manifest",
}

Warn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------
def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. ``("sample", seed, epoch, index)``).

    A stable hash (BLAKE2b of the parts' ``repr``), identical across processes, machines and
    Python runs — unlike ``hash()``, which is salted per process for strings.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


# ---------------------------------------------------------------------------------------------
# Finding pairs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One usable image: its absolute path, its captions, and its name for messages."""

    path: Path
    captions: tuple[str, ...]
    name: str
    # CUB: the bird's bounding box ``(x, y, w, h)`` from bounding_boxes.txt, cropped on loading
    box: tuple[int, int, int, int] | None = None


class _Scan:
    """What a folder scan found: usable samples, and each skipped file with its reason."""

    def __init__(self, warn: Warn | None, check_images: bool, max_pixels: int,
                 images_only: bool = False) -> None:
        self.images_only = images_only  # captions are neither read nor required
        self.samples: list[Sample] = []
        self.skipped: list[tuple[Path, str]] = []
        self.warn = warn
        self.check_images = check_images
        self.max_pixels = max_pixels

    def skip(self, shown: Path | str, reason: str) -> None:
        self.skipped.append((Path(shown), reason))
        self.note(f"skipped {shown}: {reason}")

    def note(self, line: str) -> None:
        if self.warn is not None:
            self.warn(line)

    def add(self, image: Path, shown: Path | str, captions: Sequence[str] | None,
            missing: str, box: tuple[int, int, int, int] | None = None) -> None:
        """Keep ``image`` with ``captions`` unless it has none or cannot be read.

        ``captions`` is ``None`` when no caption source exists (``missing`` says where it was
        looked for), an empty list when the source holds no caption.  Images only: every
        readable image is kept, with the one caption ``""`` (so its draws stay the same).
        """
        if self.images_only:
            captions = ("",)
        if captions is None:
            self.skip(shown, missing)
            return
        if not captions:
            return  # the caller already reported why (empty caption file, unreadable one)
        if self.check_images:
            try:
                check_image(image, self.max_pixels)
            except InputError as exc:
                self.skip(shown, str(exc))
                return
        self.samples.append(Sample(image.absolute(), tuple(captions), str(shown), box))


def check_image(path: Path, max_pixels: int = 100_000_000) -> None:
    """Cheap readability check: the header parses (PIL ``verify``), or :class:`InputError`.

    Nothing is decoded for a good file (only a JPEG without its end marker is decoded in full).
    A file that fails is handed to :func:`~clipinvert.imaging.load_image`, so the reason is
    worded exactly as everywhere else
    (``truncated or corrupt image (PNG header unreadable)``, ``not an image file (contents are
    text)``, ...); in the rare case that ``load_image`` decodes what ``verify`` refused, the image
    is accepted.
    """
    path = Path(path)
    if path.suffix.lower() in UNREADABLE_IMAGE_EXTENSIONS:  # HEIC, camera raw, ...: worded there
        load_image(path, max_pixels)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise ValueError("too large")
                fmt = im.format
                im.verify()
        # verify() checks a PNG's chunks to the end but reads only a JPEG's header: a JPEG cut
        # short (an interrupted download) lacks the end-of-image marker, so decode that one.
        if fmt in ("JPEG", "MPO") and not _ends_with_eoi(path):
            load_image(path, max_pixels)
    except InputError:
        raise
    except Exception:  # PIL raises many types; load_image words the reason
        load_image(path, max_pixels)


def _ends_with_eoi(path: Path) -> bool:
    """True when the file's last bytes (trailing NULs aside) are the JPEG end marker FF D9."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 64))
        tail = fh.read().rstrip(b"\0")
    return tail.endswith(b"\xff\xd9")


def _read_captions(path: Path, shown: Path | str, scan: _Scan) -> list[str] | None:
    """The non-blank, stripped lines of a caption file; ``None`` if it does not exist.

    An unreadable or empty file is reported (against ``shown``, the image) and gives ``[]``.
    Images only: never read (``None``).
    """
    if scan.images_only:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        scan.skip(shown, f"caption file is a folder ({path})")
        return []
    except UnicodeDecodeError:
        scan.skip(shown, f"caption file is not UTF-8 text ({path})")
        return []
    except OSError as exc:
        scan.skip(shown, f"cannot read caption file {path} ({exc.strerror or exc})")
        return []
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        scan.skip(shown, f"empty caption file ({path})")
    return captions


def _list_images(folder: Path, scan: _Scan) -> list[tuple[Path, Path]]:
    notes: list[str] = []
    found = list_inputs(folder, notes=notes)
    for line in notes:  # broken symlinks, unreadable sub-folders: already one line each
        scan.note(line)
    return found


def _scan_tree(images_dir: Path, captions_dir: Path, scan: _Scan,
               wanted: set[str] | None = None,
               boxes: Mapping[str, tuple[int, int, int, int]] | None = None) -> None:
    """``images_dir/<rel>.<ext>`` pairs with ``captions_dir/<rel>.txt`` (celeba, cub).

    ``wanted``: the split's names (:func:`_in_list`); other images are left out silently (they
    belong to the other split).  ``boxes``: CUB's bounding boxes by ``<rel>`` without suffix;
    when given, an image without one is skipped.
    """
    for image, rel in _list_images(images_dir, scan):
        if wanted is not None and not _in_list(rel, wanted):
            continue
        shown = images_dir / rel
        box = None
        if boxes is not None:
            box = boxes.get(rel.with_suffix("").as_posix())
            if box is None:
                scan.skip(shown, "no bounding box in bounding_boxes.txt")
                continue
        caption_file = captions_dir / rel.with_suffix(".txt")
        captions = _read_captions(caption_file, shown, scan)
        scan.add(image, shown, captions, f"no caption file ({caption_file})", box)


def _scan_sidecar(root: Path, scan: _Scan) -> None:
    """``a.png`` pairs with ``a.png.txt``, else ``a.txt``, in the same folder."""
    for image, rel in _list_images(root, scan):
        shown = root / rel
        captions = None
        for candidate in (image.with_name(image.name + ".txt"), image.with_suffix(".txt")):
            captions = _read_captions(candidate, shown, scan)
            if captions is not None:
                break
        missing = f"no caption file ({rel.with_suffix('.txt').name} or {rel.name}.txt beside it)"
        scan.add(image, shown, captions, missing)


def _manifest_entries(manifest: Path, scan: _Scan
                      ) -> Iterator[tuple[str, Path, list[str] | None]]:
    """``(where, image path, captions)`` of each usable line of a caption manifest.

    One ``{"image": ..., "captions": [...]}`` object per line, blank lines ignored; a path is
    relative to the manifest's folder.  ``captions`` is ``None`` when the line has none, ``[]``
    when all are blank.  A line that is not such an object is skipped with its line number.
    """
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"caption manifest is not UTF-8 text: {manifest}") from None
    except OSError as exc:
        why = exc.strerror or exc
        raise UsageError(f"cannot read caption manifest {manifest} ({why})") from None
    base = manifest.parent
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            scan.skip(where, f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(entry, dict):
            scan.skip(where, "not a JSON object")
            continue
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            scan.skip(where, 'no "image" path')
            continue
        raw = entry.get("captions", entry.get("caption"))
        if isinstance(raw, str):
            raw = [raw]
        if raw is not None and (
            not isinstance(raw, list) or not all(isinstance(c, str) for c in raw)
        ):
            scan.skip(where, '"captions" must be a list of strings')
            continue
        path = Path(image)
        resolved = path if path.is_absolute() else base / path
        yield where, resolved, None if raw is None else [c.strip() for c in raw if c.strip()]


def _scan_jsonl(manifest: Path, scan: _Scan) -> None:
    """Every image a caption manifest names, with its captions."""
    for where, resolved, captions in _manifest_entries(manifest, scan):
        if not resolved.is_file():
            scan.skip(resolved, f"image not found ({where})")
            continue
        if captions == [] and not scan.images_only:
            scan.skip(resolved, f"empty captions list ({where})")
            continue
        scan.add(resolved, resolved, captions, f'no "captions" ({where})')


# ---------------------------------------------------------------------------------------------
# Split lists
# ---------------------------------------------------------------------------------------------
class _NamesOnly(pickle.Unpickler):
    """Unpickles plain containers of strings and numbers only: a list of image names names no
    class, so any global it asks for means the file is something else (and must not run)."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"it names {module}.{name}, not a list of image names")


def read_name_list(path: Path, what: str = "test list") -> set[str]:
    """The image names of a split: a text file with one name per line, or a ``filenames.pickle``
    of Multi-Modal CelebA-HQ or AttnGAN's CUB (a pickled list of names, written by Python 2 —
    hence ``latin1`` — and read without allowing any class).  Names may lack the extension;
    CUB's are ``<class>/<name>``.  Anything else is a one-line :class:`UsageError`."""
    try:
        if path.suffix.lower() in (".pickle", ".pkl"):
            with path.open("rb") as fh:
                names = _NamesOnly(fh, encoding="latin1").load()
            if not isinstance(names, list | tuple) or not all(
                    isinstance(n, str | bytes | int) for n in names):
                raise pickle.UnpicklingError("it does not hold a list of image names")
            wanted = {n.decode() if isinstance(n, bytes) else str(n) for n in names}
        else:
            wanted = {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                      if ln.strip()}
    except (OSError, UnicodeDecodeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc}") from None
    if not wanted:
        raise UsageError(f"the {what} {path} names no image")
    return wanted


def _in_list(rel: Path, wanted: set[str]) -> bool:
    """True when a list names the image at ``rel``: with or without its suffix, by its path
    below the image folder (CUB's ``class/name``) or by its file name (CelebA-HQ's ``12``)."""
    stem = rel.with_suffix("")
    return bool({rel.as_posix(), stem.as_posix(), rel.name, stem.name} & wanted)


def _split_list(bases: Sequence[Path], split: str) -> Path | None:
    """The first ``<base>/<split>/filenames.pickle`` (Multi-Modal CelebA-HQ, AttnGAN)."""
    for base in bases:
        if (base / split / "filenames.pickle").is_file():
            return base / split / "filenames.pickle"
    return None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: choose {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------------
# CUB-200-2011
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CubLayout:
    """Where one CUB copy keeps its parts (:func:`find_cub`)."""

    images: Path  # images/<class>/<name>.jpg
    meta: Path  # the folder of images/: images.txt, bounding_boxes.txt, attributes/, ...
    captions: Path | None  # text_c10/ or text/, <class>/<name>.txt

    @property
    def bases(self) -> tuple[Path, ...]:
        """Folders that may hold AttnGAN's ``train/`` and ``test/`` lists: the download's
        folder and the one above it (AttnGAN's ``birds/``)."""
        return (self.meta, self.meta.parent)

    def split_names(self, split: str, note: Warn | None = None) -> set[str] | None:
        """The split's ``class/name`` list (``None`` for ``all``), or a UsageError.

        AttnGAN's ``filenames.pickle`` first: its 8,855/2,933 split by species is the one the
        paper used (2,933 test images); else the download's own ``train_test_split.txt``
        (5,994/5,794 by image), said in a note as it is not the paper's.
        """
        if split == "all":
            return None
        listed = _split_list(self.bases, split)
        if listed is not None:
            return read_name_list(listed, f"{split} list")
        index_file, split_file = self.meta / "images.txt", self.meta / "train_test_split.txt"
        if not (index_file.is_file() and split_file.is_file()):
            raise UsageError(f"--split {split}: {self.meta} has no {split}/filenames.pickle "
                             "(AttnGAN's split) nor images.txt + train_test_split.txt")
        if note is not None:
            note(f"note: --split {split} from {split_file} (CUB's own split by image); the paper "
                 f"used AttnGAN's split by species: put its {split}/filenames.pickle beside "
                 f"{self.meta.name}/")
        index = read_cub_index(self.meta)
        flags = _read_id_table(split_file, 1)
        want = "1" if split == "train" else "0"
        return {Path(index[i]).with_suffix("").as_posix() for i, (flag,) in flags.items()
                if flag == want and i in index}

    def boxes(self) -> dict[str, tuple[int, int, int, int]] | None:
        """Bounding boxes by ``class/name``, or ``None`` when the download has none."""
        box_file = self.meta / "bounding_boxes.txt"
        if not box_file.is_file() or not (self.meta / "images.txt").is_file():
            return None
        index = read_cub_index(self.meta)
        boxes = {}
        for i, values in _read_id_table(box_file, 4).items():
            try:
                # AttnGAN reads the file with pandas and casts it to int (truncating).
                x, y, w, h = (int(float(v)) for v in values)
            except ValueError:
                continue
            if i in index and w > 0 and h > 0:
                boxes[Path(index[i]).with_suffix("").as_posix()] = (x, y, w, h)
        return boxes


def _read_id_table(path: Path, fields: int) -> dict[str, tuple[str, ...]]:
    """``id v1 … vN`` lines of a CUB metadata file: the first ``fields`` values by id.

    Lines too short are left out (a caller sees the id missing); extra fields are ignored.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or exc})") from None
    table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > fields:
            table[parts[0]] = tuple(parts[1:fields + 1])
    return table


def read_cub_index(meta: Path) -> dict[str, str]:
    """CUB's ``images.txt``: image id → ``<class>/<name>.jpg`` below ``images/``."""
    return {i: v for i, (v,) in _read_id_table(meta / "images.txt", 1).items()}


def find_cub(root: Path, captions: Path | None = None) -> CubLayout | None:
    """The CUB parts under ``root``, or ``None`` when it holds no CUB images folder.

    ``root`` may be the CUB-200-2011 download (``images/``, ``images.txt`` ...) or AttnGAN's
    ``birds/`` folder holding it as ``CUB_200_2011/``; captions come from ``captions`` if given,
    else the first ``text_c10/`` or ``text/`` in ``root`` or beside ``images/``.
    """
    images = find_dir(root, _CUB_IMAGES) or find_dir(root / CUB_SUBFOLDER, _CUB_IMAGES)
    if images is None:
        return None
    meta = images.parent
    if captions is None:
        captions = next((base / name for base in dict.fromkeys((root, meta))
                         for name in CUB_CAPTION_FOLDERS if (base / name).is_dir()), None)
    return CubLayout(images, meta, captions)


def cub_crop_box(box: tuple[int, int, int, int], width: int, height: int
                 ) -> tuple[int, int, int, int]:
    """The crop ``(left, top, right, bottom)`` AttnGAN (``get_imgs``) took of a CUB bird.

    A square of half-side ``r = int(max(w, h) * 0.75)`` — 1.5 times the box's longer side —
    around the box's centre ``(int(x + w/2), int(y + h/2))``, clipped to the image; the
    CLIPInverter release loaded its birds the same way.  Clipping can leave it non-square: the
    domain's ``resize`` policy squares it afterwards.
    """
    x, y, w, h = box
    r = int(max(w, h) * 0.75)
    cx, cy = int((2 * x + w) / 2), int((2 * y + h) / 2)
    return max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)


def load_sample_image(path: Path, box: tuple[int, int, int, int] | None = None,
                      resize: str = "stretch", max_pixels: int = 100_000_000) -> Image.Image:
    """The square the model sees of one data-set image, before :func:`to_tensor`.

    Decoded with :func:`load_image` (an :class:`InputError` if it cannot be), cropped to a CUB
    box (:func:`cub_crop_box`), then squared by the domain's ``resize`` policy
    (:func:`~clipinvert.imaging.fit_square`): training and ``eval benchmark`` both read images
    through here, and ``edit`` squares with the same policy.
    """
    image = load_image(path, max_pixels)
    if box is not None:
        image = image.crop(cub_crop_box(box, *image.size))
    return fit_square(image, resize)


def _scan_cub(root: Path, split: str, captions: Path | None, scan: _Scan) -> None:
    layout = find_cub(root, captions)
    if layout is not None and scan.images_only:  # the birds (cropped) without their captions
        layout = replace(layout, captions=layout.captions or layout.meta / CUB_CAPTION_FOLDERS[0])
    elif layout is None or layout.captions is None or not layout.captions.is_dir():
        where = f"{captions}" if captions is not None else "text_c10/ or text/"
        raise UsageError(f"{root} is not a CUB folder: needs images/ (or {CUB_SUBFOLDER}/images/)"
                         f" and captions ({where})")
    boxes = layout.boxes()
    if boxes is None:
        scan.note(f"note: no bounding_boxes.txt + images.txt in {layout.meta}: whole images "
                  "are used, not the bird crops the paper trained on")
    wanted = layout.split_names(split, scan.note)
    _scan_tree(layout.images, layout.captions, scan, wanted, boxes)


# ---------------------------------------------------------------------------------------------
# AFHQ
# ---------------------------------------------------------------------------------------------
def _afhq_splits(base: Path) -> dict[str, Path]:
    """AFHQ's split folders in ``base``: ``{"train": …, "test": …}`` when it has both."""
    found = {key: hit for key, names in AFHQ_SPLIT_FOLDERS.items()
             if (hit := find_dir(base, names)) is not None}
    return found if len(found) == len(AFHQ_SPLIT_FOLDERS) else {}


def find_afhq(root: Path, split: str = "all") -> tuple[Path, list[Path]] | None:
    """``(AFHQ root, the split's image folders)``, or ``None`` when ``root`` is not AFHQ.

    ``root`` is the AFHQ folder (``train/<animal>/``, ``val/<animal>/``; the animal is ``cat``,
    the paper's, or the only one there) — ``all`` then takes both splits — or one of its image
    folders (``afhq/train/cat``), which ``train``/``test`` swap for that split's folder of the
    same animal and ``all`` keeps as given.
    """
    if not root.is_dir():
        return None
    splits = _afhq_splits(root)
    if splits:
        animals = sorted(p.name for p in splits["train"].iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        if not animals:
            return None
        if "cat" not in animals and len(animals) > 1:
            raise UsageError(f"{root}: AFHQ with {', '.join(animals)} but no cat/: give the "
                             "animal's folder, e.g. afhq/train/dog")
        animal, afhq = "cat" if "cat" in animals else animals[0], root
    else:
        afhq, animal = root.parent.parent, root.name
        splits = _afhq_splits(afhq)
        if root.parent not in splits.values():
            return None
        if split == "all":
            return afhq, [root]
    keys = tuple(AFHQ_SPLIT_FOLDERS) if split == "all" else (split,)
    return afhq, [splits[key] / animal for key in keys]


def _looks_like_afhq(root: Path) -> bool:
    """True for an AFHQ folder or image folder, also one without the cat (:func:`find_afhq`
    then says which animal folder to give)."""
    try:
        return find_afhq(root) is not None
    except UsageError:
        return True


def _scan_afhq(root: Path, split: str, captions: Path | None, scan: _Scan) -> None:
    """Each image of the split's folders with its captions from a manifest, matched by path
    (the manifest's lines for other folders are left alone: they are the other split's)."""
    found = find_afhq(root, split)
    if found is None:
        raise UsageError(f"{root} is not an AFHQ folder: needs train/<animal>/ and val/<animal>/")
    afhq, folders = found
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--split {split}: {folder} not found")
        manifest = captions or next((d / MANIFEST_NAME for d in (folder, afhq)
                                     if (d / MANIFEST_NAME).is_file()), None)
        if scan.images_only:
            for image, rel in _list_images(folder, scan):
                scan.add(image, folder / rel, None, "")
            continue
        if manifest is None or not manifest.is_file():
            raise UsageError(f"no captions for {folder}: expected {MANIFEST_NAME} there or in "
                             f"{afhq} (clipinvert caption writes one), or pass --captions FILE")
        _scan_folder_by_manifest(folder, manifest, scan)


def _scan_folder_by_manifest(folder: Path, manifest: Path, scan: _Scan) -> None:
    """The images under ``folder``, each with its captions from ``manifest`` matched by path:
    what `clipinvert caption` wrote for a folder it could only read (AFHQ's image folders, or
    any plain folder given with --captions or the domain's registered ``captions``)."""
    listed = {os.path.abspath(image): (where, caps)
              for where, image, caps in _manifest_entries(manifest, scan)}
    for image, rel in _list_images(folder, scan):
        shown = folder / rel
        where, caps = listed.get(os.path.abspath(image), ("", None))
        if caps == []:
            scan.skip(shown, f"empty captions list ({where})")
            continue
        scan.add(image, shown, caps, f"no captions in {manifest}")


def find_dir(root: Path, names: Sequence[str]) -> Path | None:
    """The first of the folders ``names`` that exists under ``root``."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _has_text_file(root: Path) -> bool:
    """True when a non-hidden ``.txt`` file lies anywhere under ``root``."""
    for path in root.rglob("*.txt"):
        if not any(part.startswith(".") for part in path.relative_to(root).parts):
            return True
    return False


def _check_root(root: Path) -> None:
    if not root.exists():
        raise UsageError(f"data folder not found: {root}")
    if not root.is_dir() and root.suffix.lower() != ".jsonl":
        raise UsageError(f"--data must be a folder or a .jsonl manifest: {root}")


def detect_format(root: Path | str) -> str:
    """The layout of ``root``: ``afhq``, ``jsonl``, ``celeba``, ``cub`` or ``sidecar``, or a
    UsageError.

    In order: an AFHQ folder or one of its image folders (:func:`find_afhq`) → ``afhq``; a
    ``.jsonl`` file or a folder holding ``captions.jsonl`` → ``jsonl``; ``images/`` (or
    ``CelebA-HQ-img/``) + ``celeba-caption/`` → ``celeba``; ``images/`` (or
    ``CUB_200_2011/images/``) + ``text_c10/``, ``text/`` or ``images.txt`` → ``cub``; any
    ``.txt`` file under the folder → ``sidecar``.
    """
    root = Path(root)
    _check_root(root)
    cub = None if root.is_file() else find_cub(root)
    # AttnGAN's birds/ has train/ and test/ folders too: a CUB folder is never AFHQ
    if cub is None and _looks_like_afhq(root):
        return "afhq"
    if root.is_file() or (root / MANIFEST_NAME).is_file():
        return "jsonl"
    if find_dir(root, CELEBA_IMAGE_FOLDERS) and (root / _CELEBA_CAPTIONS).is_dir():
        return "celeba"
    if cub is not None and (cub.captions is not None or (cub.meta / "images.txt").is_file()):
        return "cub"  # the download itself: its captions may come from --captions
    if _has_text_file(root):
        return "sidecar"
    raise UsageError(
        f"cannot tell the layout of {root}: expected {MANIFEST_NAME}, images/ + celeba-caption/, "
        "images/ + text_c10/, AFHQ's train/ + val/, or <image>.txt captions beside the images "
        "(see --data-format)"
    )


def _scan(root: Path, data_format: str, scan: _Scan, split: str = "all",
          captions: Path | None = None) -> None:
    if split != "all" and data_format in ("jsonl", "sidecar"):
        raise UsageError(f"--split {split}: a {_FORMAT_NAMES[data_format]} has no split of its "
                         "own; give --data the AFHQ, CUB or CelebA-HQ folder (captions of AFHQ "
                         "with --captions FILE), or split it into two folders")
    if data_format == "jsonl":
        manifest = root if root.is_file() else root / MANIFEST_NAME
        if not manifest.is_file():
            raise UsageError(f"no caption manifest: {manifest} not found")
        _scan_jsonl(manifest, scan)
        return
    if not root.is_dir():
        raise UsageError(f"--data-format {data_format} needs a folder, not a file: {root}")
    if data_format == "sidecar" and captions is not None and captions.is_file():
        _scan_folder_by_manifest(root, captions, scan)  # a plain folder + a caption manifest
    elif data_format == "sidecar":
        _scan_sidecar(root, scan)
    elif data_format == "afhq":
        _scan_afhq(root, split, captions, scan)
    elif data_format == "cub":
        _scan_cub(root, split, captions, scan)
    else:
        images_dir = find_dir(root, CELEBA_IMAGE_FOLDERS)
        caption_dir = captions or root / _CELEBA_CAPTIONS
        if images_dir is None or not caption_dir.is_dir():
            raise UsageError(f"{root} is not a {_FORMAT_NAMES[data_format]} folder: needs "
                             f"{CELEBA_IMAGE_FOLDERS[0]}/ and {_CELEBA_CAPTIONS}/")
        wanted = None
        if split != "all":
            listed = _split_list((root,), split)
            if listed is None:
                raise UsageError(f"--split {split}: {root / split / 'filenames.pickle'} not "
                                 "found (Multi-Modal CelebA-HQ's split)")
            wanted = read_name_list(listed, f"{split} list")
        _scan_tree(images_dir, caption_dir, scan, wanted)


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------
class ImageCaptionDataset(Dataset):
    """Images and their captions, paired by name; ``dataset[i]`` is one augmented sample.

    ``root`` is the ``--data`` folder (or a ``.jsonl`` manifest); ``data_format`` one of
    :data:`DATA_FORMATS`.  Construction scans the whole set: every image without captions, with
    an empty or unreadable caption file, or whose header does not parse is *skipped*: listed in
    :attr:`skipped` as ``(path, reason)`` and reported through ``warn`` as one line
    ``skipped <path>: <reason>``.  A set left with fewer than ``min_samples`` usable pairs (2 by
    default: training rolls captions across a batch) is refused with a one-line
    :class:`UsageError` (exit 2) naming the folder, as is a missing folder or an unknown format.
    ``split`` (:data:`SPLITS`) takes the data set's own train or test list; ``captions`` is a
    caption source other than the layout's own (a CUB caption folder, AFHQ's manifest);
    ``resize`` the domain's policy for non-square images (models.toml).  ``images_only``: no
    caption is read or required (the e4e stage); a folder that is no known layout is taken as
    bare images, all of them under it.

    ``dataset[index]`` (also ``dataset[(epoch, index)]``) returns
    ``{"image": float32 (3, size, size) in [-1, 1], "caption": str, "index": int, "path": str}``:
    the image read by :func:`load_sample_image` (decoded, a CUB bird cropped from its box,
    squared by the ``resize`` policy), resized like :func:`~clipinvert.imaging.to_tensor`
    (BILINEAR), then flipped left-right with probability
    1/2 unless ``flip`` is false; the caption drawn uniformly from the image's captions.  Both
    draws come from a generator seeded by ``(seed, epoch, index)`` only (the caption draw first,
    then the flip draw, both always made), so the same key gives the same sample in any process.

    If the full decode fails in ``__getitem__`` (a file truncated after the header, or changed
    since the scan) no exception is raised: the dict has ``"image": None`` and ``"error"``, the
    one-line reason; :func:`collate` leaves such samples out of the batch and lists them in
    ``batch["failed"]`` so the trainer can report them and go on.
    """

    def __init__(
        self,
        root: Path | str,
        data_format: str = "auto",
        *,
        seed: int = 0,
        flip: bool = True,
        size: int = 256,
        warn: Warn | None = None,
        min_samples: int = 2,
        check_images: bool = True,
        max_pixels: int = 100_000_000,
        split: str = "all",
        captions: Path | str | None = None,
        resize: str = "stretch",
        images_only: bool = False,
    ) -> None:
        if data_format not in DATA_FORMATS:
            choices = ", ".join(DATA_FORMATS[:-1]) + " or " + DATA_FORMATS[-1]
            raise UsageError(f"unknown data format {data_format!r}: choose {choices}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        _check_split(split)
        if resize not in RESIZE_POLICIES:
            raise UsageError(f"unknown resize policy {resize!r}: use {', '.join(RESIZE_POLICIES)}")
        root = Path(root)
        _check_root(root)
        caption_source = Path(captions) if captions is not None else None
        if caption_source is not None and not caption_source.exists():
            raise UsageError(f"--captions {caption_source}: not found")
        resolved = data_format
        if data_format == "auto":
            try:
                resolved = detect_format(root)
            except UsageError:
                plain_with_manifest = caption_source is not None and caption_source.is_file()
                if not (images_only or plain_with_manifest) or not root.is_dir():
                    raise
                # bare images (the e4e stage), or a plain folder whose captions come from a
                # manifest (--captions, a domain's registered captions): sidecar's listing
                resolved = "sidecar"
        scan = _Scan(warn, check_images, max_pixels, images_only)
        _scan(root, resolved, scan, split, caption_source)

        self.root = root
        self.format = resolved
        self.split = split
        self.resize = resize
        self.seed = int(seed)
        self.flip = bool(flip)
        self.size = int(size)
        self.max_pixels = max_pixels
        self.epoch = 0
        self.samples: list[Sample] = scan.samples
        self.skipped: list[tuple[Path, str]] = scan.skipped
        self.warn = warn

        usable = len(self.samples)
        if usable < max(1, min_samples):
            what = "images" if images_only and resolved == "sidecar" else _FORMAT_NAMES[resolved]
            why = f"; {len(self.skipped)} skipped (see the lines above)" if self.skipped else ""
            pair = "image" if images_only else "image-caption pair"
            if usable == 0:
                raise UsageError(f"no usable {pair}s in {root} ({what}){why}")
            raise UsageError(
                f"only {usable} usable {pair}{'s' if usable != 1 else ''} in {root}"
                f" ({what}), training needs at least {min_samples}{why}"
            )

    # -- construction from a subset (split_validation) -----------------------------------------
    def subset(self, indices: Sequence[int]) -> ImageCaptionDataset:
        """A data set of the samples at ``indices`` (in that order), with the same settings.

        Its :attr:`skipped` is empty (the files were skipped by this set) and its epoch is 0.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.samples = [self.samples[i] for i in indices]
        new.skipped = []
        new.epoch = 0
        return new

    # -- state ---------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draws ``dataset[index]`` makes (a sampler's ``set_epoch``).

        Worker processes hold a copy of the data set made when a DataLoader iterator starts:
        call this before ``iter(loader)``, or, with ``persistent_workers=True``, index with
        ``(epoch, index)`` keys instead.
        """
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["warn"] = None  # a callback may not pickle (spawned workers); workers never warn
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.root)!r}, format={self.format!r}, "
            f"samples={len(self.samples)}, skipped={len(self.skipped)})"
        )

    # -- samples -------------------------------------------------------------------------------
    def draws(self, index: int, epoch: int | None = None) -> tuple[int, bool]:
        """``(caption number, flipped)`` of sample ``index`` in ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else int(epoch)
        sample = self.samples[index]
        gen = _generator("sample", self.seed, epoch, int(index))
        choice = int(torch.randint(len(sample.captions), (1,), generator=gen))
        coin = bool(torch.rand((), generator=gen) < 0.5)
        return choice, self.flip and coin

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            epoch, index = int(key[0]), operator.index(key[1])
        else:
            epoch, index = self.epoch, operator.index(key)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample index {index} out of range (0..{len(self.samples) - 1})")
        sample = self.samples[index]
        choice, flipped = self.draws(index, epoch)
        item: dict[str, Any] = {
            "image": None,
            "caption": sample.captions[choice],
            "index": index,
            "path": str(sample.path),
        }
        try:
            image = load_sample_image(sample.path, sample.box, self.resize, self.max_pixels)
        except InputError as exc:
            item["error"] = first_line(exc)
            return item
        tensor = to_tensor([image], self.size)[0]
        item["image"] = tensor.flip(2) if flipped else tensor
        return item


# ---------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------
def split_validation(
    dataset: ImageCaptionDataset, fraction: float, seed: int
) -> tuple[ImageCaptionDataset, ImageCaptionDataset]:
    """``(train, val)``: ``round(fraction · n)`` samples held out, chosen by ``seed`` alone.

    At least one sample on each side (a data set of 2 gives 1 + 1); both keep the source's
    settings (seed, flip, size) and its sample order.  A fraction outside (0, 1) or a set of
    fewer than 2 samples is a :class:`UsageError`.
    """
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
    n = len(dataset)
    if n < 2:
        raise UsageError(f"cannot hold out validation samples from a set of {n}: use --val-data")
    n_val = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=_generator("split", int(seed), n)).tolist()
    val = sorted(order[:n_val])
    held = set(val)
    train = [i for i in range(n) if i not in held]
    return dataset.subset(train), dataset.subset(val)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
class ResumableSampler(Sampler[int]):
    """Sample indices in a per-epoch order fixed by ``(seed, epoch)``, resumable mid-epoch.

    Like torch's ``DistributedSampler``: the epoch's permutation of ``range(n)`` (identity when
    ``shuffle`` is false) is truncated (``drop_last``) or padded by repeating its start to a
    multiple of ``world_size``, and rank ``r`` takes ``indices[r::world_size]``.  Iterating yields
    this rank's indices from :attr:`position` to the end of the epoch, one at a time (the trainer
    batches them), advancing :attr:`position`; start the next epoch with :meth:`set_epoch`.

    :meth:`state_dict` is the same on every rank (the position counts this rank's samples, and
    all ranks advance together), so rank 0 alone can save it and every rank load it.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        if self.drop_last:
            self.num_samples = self.n // self.world_size
        else:
            self.num_samples = math.ceil(self.n / self.world_size)
        self.total_size = self.num_samples * self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` at position 0; the current epoch keeps its position (a resume)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's whole index list for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            gen = _generator("sampler", self.seed, epoch, self.n)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        if self.drop_last:
            order = order[: self.total_size]
        elif order and len(order) < self.total_size:
            repeats = math.ceil((self.total_size - len(order)) / len(order))
            order = (order + order * repeats)[: self.total_size]
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.indices()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index

    def __len__(self) -> int:
        """Samples per epoch on this rank (not what is left: see :attr:`remaining`)."""
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Samples this rank has still to yield in the current epoch."""
        return self.num_samples - self.position

    def state_dict(self, position: int | None = None) -> dict[str, int | bool]:
        """``{"epoch", "position", ...}`` to save in a resumable checkpoint.

        ``position`` defaults to the samples yielded so far.  A DataLoader fetches ahead of the
        training loop, so the trainer should pass the number of samples (per rank, this epoch)
        its optimizer steps have actually consumed.
        """
        pos = self.position if position is None else int(position)
        if not 0 <= pos <= self.num_samples:
            raise ValueError(f"position {pos} out of range (0..{self.num_samples})")
        return {
            "epoch": self.epoch,
            "position": pos,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where :meth:`state_dict` left off; a different set-up is a UsageError.

        The order can only be reproduced with the same data set size, seed, shuffling, number of
        processes and ``drop_last``; anything else is refused in one line.
        """
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise UsageError("cannot resume the sample order: sampler state incomplete") from None
        checks = (
            ("n", self.n, "data set size"),
            ("seed", self.seed, "seed"),
            ("shuffle", self.shuffle, "shuffling"),
            ("world_size", self.world_size, "number of processes"),
            ("drop_last", self.drop_last, "drop_last"),
        )
        for key, mine, label in checks:
            if key in state and state[key] != mine:
                raise UsageError(
                    f"cannot resume the sample order: the {label} was {state[key]}, "
                    f"now {mine}"
                )
        if not 0 <= position <= self.num_samples:
            raise UsageError(
                f"cannot resume the sample order: position {position} outside the epoch "
                f"(0..{self.num_samples})"
            )
        self.epoch = epoch
        self.position = position


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch ``dataset[i]`` dicts: ``{"image", "caption", "index", "path", "failed"}``.

    ``image`` is ``(B, 3, S, S)``, ``caption`` and ``path`` are lists, ``index`` a long tensor;
    samples whose decode failed are left out and listed in ``failed`` as ``(path, reason)``.
    When all of them failed, ``image`` has shape ``(0, 3, 0, 0)``: the trainer skips the batch
    (under DDP every rank has to agree to skip it).
    """
    kept = [s for s in samples if s.get("image") is not None]
    failed = [(str(s["path"]), str(s.get("error", "unreadable image"))) for s in samples
              if s.get("image") is None]
    image = torch.stack([s["image"] for s in kept]) if kept else torch.empty((0, 3, 0, 0))
    return {
        "image": image,
        "caption": [str(s["caption"]) for s in kept],
        "index": torch.tensor([int(s["index"]) for s in kept], dtype=torch.long),
        "path": [str(s["path"]) for s in kept],
        "failed": failed,
    }
