"""Training data: images paired with their captions *by name*, reproducible sample by sample.

The released training code sorted the image list and the caption list separately and paired them
by position, so one extra or missing file shifted every caption onto the wrong image (and its cat
and bird loaders did not load at all).  Here every image finds its own caption file from its own
relative path, and anything that cannot be paired is reported with its file name.

Layouts (``docs/training-data.md``), chosen with ``--data-format`` or detected from the folder:

* ``celeba`` — Multi-Modal CelebA-HQ: ``DIR/images/<stem>.<ext>`` +
  ``DIR/celeba-caption/<stem>.txt``;
* ``cub`` — CUB-200-2011 with Reed et al.'s captions: ``DIR/images/<class>/<name>.jpg`` +
  ``DIR/text_c10/<class>/<name>.txt``;
* ``sidecar`` — ``a.png`` + ``a.txt`` (or ``a.png.txt``) side by side, anywhere under DIR;
* ``jsonl`` — a manifest (``DIR/captions.jsonl`` or any ``.jsonl`` file) of
  ``{"image": path, "captions": [...]}`` lines, paths relative to the manifest's folder.

A caption file holds one caption per line (blank lines ignored); each sample draws one of them.

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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from clipinvert.errors import InputError, UsageError, first_line
from clipinvert.imaging import UNREADABLE_IMAGE_EXTENSIONS, list_inputs, load_image, to_tensor

__all__ = [
    "DATA_FORMATS",
    "ImageCaptionDataset",
    "ResumableSampler",
    "Sample",
    "check_image",
    "collate",
    "derive_seed",
    "detect_format",
    "split_validation",
]

#: Values of ``--data-format``.
DATA_FORMATS: tuple[str, ...] = ("auto", "celeba", "cub", "sidecar", "jsonl")

#: Name of the manifest ``auto`` looks for in a data folder.
MANIFEST_NAME = "captions.jsonl"

# Folder names of the two tree layouts: (image folders accepted, caption folder).
#: Image folders of a CelebA-HQ root: ours, then the CelebAMask-HQ download's own name.
CELEBA_IMAGE_FOLDERS = ("images", "CelebA-HQ-img")
_CELEBA_CAPTIONS = "celeba-caption"
_CUB_IMAGES = ("images",)
_CUB_CAPTIONS = "text_c10"

_FORMAT_NAMES = {
    "celeba": "Multi-Modal CelebA-HQ",
    "cub": "CUB",
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


class _Scan:
    """What a folder scan found: usable samples, and each skipped file with its reason."""

    def __init__(self, warn: Warn | None, check_images: bool, max_pixels: int) -> None:
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
            missing: str) -> None:
        """Keep ``image`` with ``captions`` unless it has none or cannot be read.

        ``captions`` is ``None`` when no caption source exists (``missing`` says where it was
        looked for), an empty list when the source holds no caption.
        """
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
        self.samples.append(Sample(image.absolute(), tuple(captions), str(shown)))


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
    """
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


def _scan_tree(images_dir: Path, captions_dir: Path, scan: _Scan) -> None:
    """``images_dir/<rel>.<ext>`` pairs with ``captions_dir/<rel>.txt`` (celeba, cub)."""
    for image, rel in _list_images(images_dir, scan):
        shown = images_dir / rel
        caption_file = captions_dir / rel.with_suffix(".txt")
        captions = _read_captions(caption_file, shown, scan)
        scan.add(image, shown, captions, f"no caption file ({caption_file})")


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


def _scan_jsonl(manifest: Path, scan: _Scan) -> None:
    """One ``{"image": ..., "captions": [...]}`` object per line; blank lines ignored."""
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
        if not resolved.is_file():
            scan.skip(resolved, f"image not found ({where})")
            continue
        captions = None if raw is None else [c.strip() for c in raw if c.strip()]
        if captions == []:
            scan.skip(resolved, f"empty captions list ({where})")
            continue
        scan.add(resolved, resolved, captions, f'no "captions" ({where})')


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
    """The layout of ``root``: ``celeba``, ``cub``, ``sidecar`` or ``jsonl``, or a UsageError.

    In order: a ``.jsonl`` file or a folder holding ``captions.jsonl`` → ``jsonl``;
    ``images/`` (or ``CelebA-HQ-img/``) + ``celeba-caption/`` → ``celeba``; ``images/`` +
    ``text_c10/`` → ``cub``; any ``.txt`` file under the folder → ``sidecar``.
    """
    root = Path(root)
    _check_root(root)
    if root.is_file() or (root / MANIFEST_NAME).is_file():
        return "jsonl"
    if find_dir(root, CELEBA_IMAGE_FOLDERS) and (root / _CELEBA_CAPTIONS).is_dir():
        return "celeba"
    if find_dir(root, _CUB_IMAGES) and (root / _CUB_CAPTIONS).is_dir():
        return "cub"
    if _has_text_file(root):
        return "sidecar"
    raise UsageError(
        f"cannot tell the layout of {root}: expected {MANIFEST_NAME}, images/ + celeba-caption/, "
        "images/ + text_c10/, or <image>.txt captions beside the images (see --data-format)"
    )


def _scan(root: Path, data_format: str, scan: _Scan) -> None:
    if data_format == "jsonl":
        manifest = root if root.is_file() else root / MANIFEST_NAME
        if not manifest.is_file():
            raise UsageError(f"no caption manifest: {manifest} not found")
        _scan_jsonl(manifest, scan)
        return
    if not root.is_dir():
        raise UsageError(f"--data-format {data_format} needs a folder, not a file: {root}")
    if data_format == "sidecar":
        _scan_sidecar(root, scan)
        return
    if data_format == "celeba":
        names, captions = CELEBA_IMAGE_FOLDERS, _CELEBA_CAPTIONS
    else:
        names, captions = _CUB_IMAGES, _CUB_CAPTIONS
    images_dir = find_dir(root, names)
    if images_dir is None or not (root / captions).is_dir():
        wanted = f"{names[0]}/ and {captions}/"
        raise UsageError(f"{root} is not a {_FORMAT_NAMES[data_format]} folder: needs {wanted}")
    _scan_tree(images_dir, root / captions, scan)


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

    ``dataset[index]`` (also ``dataset[(epoch, index)]``) returns
    ``{"image": float32 (3, size, size) in [-1, 1], "caption": str, "index": int, "path": str}``:
    the image decoded with :func:`~clipinvert.imaging.load_image`, resized like
    :func:`~clipinvert.imaging.to_tensor` (BILINEAR), then flipped left-right with probability
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
    ) -> None:
        if data_format not in DATA_FORMATS:
            choices = ", ".join(DATA_FORMATS[:-1]) + " or " + DATA_FORMATS[-1]
            raise UsageError(f"unknown data format {data_format!r}: choose {choices}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        root = Path(root)
        _check_root(root)
        resolved = detect_format(root) if data_format == "auto" else data_format
        scan = _Scan(warn, check_images, max_pixels)
        _scan(root, resolved, scan)

        self.root = root
        self.format = resolved
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
            what = _FORMAT_NAMES[resolved]
            why = f"; {len(self.skipped)} skipped (see the lines above)" if self.skipped else ""
            if usable == 0:
                raise UsageError(f"no usable image-caption pairs in {root} ({what}){why}")
            raise UsageError(
                f"only {usable} usable image-caption pair{'s' if usable != 1 else ''} in {root}"
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
            image = load_image(sample.path, self.max_pixels)
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
