"""Training the CelebA attribute classifier that the AMA metric scores edits with.

The paper follows Nie et al. (2021): MobileNet-v1 with mish activations
(:class:`~clipinvert.nets.attributes.AttributeNet`) trained on CelebA's aligned images with a
binary cross-entropy per attribute, Adam (lr 1e-3), batches of 128, 20 epochs, the images split
7:2:1 by their position in ``list_attr_celeba.txt``.  No trained weights were ever published,
so :func:`train_classifier` (``clipinvert eval train-classifier``) lets a user make them;
docs/attribute-classifier.md describes the recipe, the split and the file written.

What a run writes (``OUT`` is the ``output`` argument, e.g. ``celeba-attributes.pt``):

* ``OUT`` — the classifier (:data:`~clipinvert.nets.attributes.ATTRIBUTES_FORMAT`), written
  atomically once training and the held-out evaluation are done; the registry role
  ``attributes`` names it and :func:`clipinvert.checkpoints.load_attribute_classifier` reads it.
* ``OUT``'s stem + ``.accuracy.json`` — the per-attribute held-out accuracy (test and val
  splits), the training history and every skipped image, for people and scripts.
* ``OUT`` + ``.resume.pt`` — while the run is unfinished only: model, optimizer, epoch and
  position in it, best model so far, history and RNG states, saved at every epoch end, every
  :data:`SAVE_EVERY_S` seconds and when Ctrl-C / SIGTERM stop the run.  Running the same call
  again continues from it (bit for bit on the CPU); it is deleted when ``OUT`` is written.

An existing ``OUT`` is never replaced silently: it must be this very run's file (a rerun of a
finished run just reports its accuracy) or ``overwrite`` must be given.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .. import __version__
from ..errors import ClipInvertError, InputError, UsageError, WeightsError, first_line
from ..fileio import atomic_write, atomic_write_json
from ..imaging import load_image, to_tensor
from ..nets.attributes import (
    ATTRIBUTES_FORMAT,
    INPUT_SIZE,
    MOBILENET_WIDTHS,
    NORMALIZE,
    AttributeNet,
)

__all__ = [
    "ATTRIBUTE_LIST",
    "IMAGE_FOLDER",
    "AttributeList",
    "CelebAAttributes",
    "CelebAData",
    "ClassifierResult",
    "accuracy_table",
    "find_celeba",
    "load_celeba",
    "read_attribute_list",
    "save_attribute_classifier",
    "split_indices",
    "state_path_for",
    "report_path_for",
    "train_classifier",
]

Log = Callable[[str], None]

ATTRIBUTE_LIST = "list_attr_celeba.txt"
IMAGE_FOLDER = "img_align_celeba"
SPLITS = ("train", "val", "test")
STATE_FORMAT = "clipinvert-attribute-training/1"
SAVE_EVERY_S = 600.0  # a crash (not a stop, which always saves) loses at most this much work
REPORT_LIMIT = 20  # skipped images of one kind listed one line each; the rest are counted
# Settings a resumed run must share with the saved one (epochs may be raised; device, workers,
# progress and the log are how a run is carried out, not what it trains).
_FIXED = ("celeba_dir", "limit", "batch_size", "lr", "seed", "input_size", "widths")
_VALUES = {"1": 1, "+1": 1, "-1": 0, "0": 0}


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------
def find_celeba(celeba_dir: Path | str) -> tuple[Path, Path]:
    """``(image folder, attribute list)`` of a CelebA folder, or a one-line :class:`UsageError`.

    Accepted layouts: ``DIR/img_align_celeba/`` + ``DIR/list_attr_celeba.txt`` (torchvision's),
    the official download's ``DIR/Img/img_align_celeba/`` + ``DIR/Anno/list_attr_celeba.txt``,
    and the images one level deeper (``img_align_celeba/img_align_celeba/``) as some archives
    unpack.
    """
    root = Path(celeba_dir)
    if not root.exists():
        raise UsageError(f"CelebA folder {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder: give the CelebA folder that holds "
                         f"{IMAGE_FOLDER}/ and {ATTRIBUTE_LIST}")
    lists = (root / ATTRIBUTE_LIST, root / "Anno" / ATTRIBUTE_LIST)
    attr_file = next((p for p in lists if p.is_file()), None)
    if attr_file is None:
        raise UsageError(f"{root} holds no {ATTRIBUTE_LIST} (looked in {root} and "
                         f"{root / 'Anno'}): is it the CelebA folder?")
    folders = (root / IMAGE_FOLDER / IMAGE_FOLDER, root / IMAGE_FOLDER,
               root / "Img" / IMAGE_FOLDER)
    image_dir = next((p for p in folders if p.is_dir()), None)
    if image_dir is None:
        raise UsageError(f"{root} holds no {IMAGE_FOLDER}/ folder of aligned images (looked in "
                         f"{root} and {root / 'Img'})")
    return image_dir, attr_file


@dataclass(frozen=True)
class AttributeList:
    """``list_attr_celeba.txt``: attribute names, image file names and their 0/1 labels."""

    path: Path
    names: tuple[str, ...]
    files: tuple[str, ...]
    labels: torch.Tensor  # (images, attributes) uint8, 1 where the attribute is present
    declared: int  # the image count on line 1


def read_attribute_list(path: Path | str) -> AttributeList:
    """Parse CelebA's attribute list: line 1 the image count, line 2 the attribute names, then
    ``<file> <one value per attribute: 1 or -1>`` per image (``0`` is read as absent too).

    Any malformed line is a one-line :class:`UsageError` naming the file and line: labels that
    silently shift by one column would train a classifier for the wrong attributes.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file (expected CelebA's attribute list)") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror or first_line(exc)})") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise UsageError(f"{path} is not a CelebA attribute list: it needs the image count, a "
                         "line of attribute names, then a line per image")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise UsageError(f"{path} line 1 should be the number of images, found "
                         f"{lines[0].strip()[:40]!r}") from None
    names = tuple(lines[1].split())
    if not names:
        raise UsageError(f"{path} line 2 should name the attributes, found nothing")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{path} line 2 names the attribute {dup} twice")
    files: list[str] = []
    rows: list[list[int]] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise UsageError(f"{path} line {number}: expected a file name and {len(names)} "
                             f"values of 1/-1, found {len(parts) - 1} values")
        try:
            rows.append([_VALUES[v] for v in parts[1:]])
        except KeyError as exc:
            raise UsageError(f"{path} line {number}: {exc.args[0]!r} is not 1 or -1") from None
        if parts[0] in seen:
            raise UsageError(f"{path} line {number}: {parts[0]} is listed twice")
        seen.add(parts[0])
        files.append(parts[0])
    if not files:
        raise UsageError(f"{path} lists no images")
    labels = torch.tensor(rows, dtype=torch.uint8)
    return AttributeList(path, names, tuple(files), labels, declared)


def split_indices(n: int) -> dict[str, range]:
    """CelebA's 7:2:1 split by position: train the first 70 %, val the next 20 %, test the last
    10 % of the list (boundaries rounded down: 141819 / 182339 of 202599, as Nie et al.)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    a, b = n * 7 // 10, n * 9 // 10
    return {"train": range(0, a), "val": range(a, b), "test": range(b, n)}


class CelebAAttributes(Dataset):
    """Images of the list (by row) as the classifier sees them, with their labels.

    An item is ``{"image": (3, S, S) in [-1, 1] or None, "label": (A,) float, "row", "file"}``
    plus ``"error"`` (one line) when the image cannot be decoded: the batch goes on without it
    and the trainer reports it once.  Preprocessing: a square bilinear resize to ``size``,
    ``ToTensor`` and ``Normalize(0.5, 0.5)`` (:func:`clipinvert.imaging.to_tensor`).
    """

    def __init__(self, image_dir: Path, files: Sequence[str], labels: torch.Tensor,
                 size: int = INPUT_SIZE) -> None:
        self.image_dir = Path(image_dir)
        self.files = tuple(files)
        self.labels = labels
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": None, "label": self.labels[row].float(), "row": row,
                                "file": self.files[row]}
        try:
            image = load_image(self.image_dir / self.files[row])
        except InputError as exc:
            item["error"] = first_line(exc)
            return item
        item["image"] = to_tensor([image], self.size)[0]
        return item


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded items; those that failed are listed in ``failed`` as (file, reason)."""
    kept = [it for it in items if it["image"] is not None]
    failed = [(str(it["file"]), str(it.get("error", "unreadable image"))) for it in items
              if it["image"] is None]
    if kept:
        images = torch.stack([it["image"] for it in kept])
        labels = torch.stack([it["label"] for it in kept])
    else:
        images, labels = torch.empty((0, 3, 0, 0)), torch.empty((0, len(items[0]["label"])))
    return {"image": images, "label": labels, "failed": failed}


class _Skipped:
    """Images left out (missing, unreadable): each reported once, as one line, and counted.

    The first :data:`REPORT_LIMIT` of a kind are listed; after that one line says the rest are
    only counted (every one is in the accuracy JSON), so a half-copied folder does not flood the
    terminal with 100,000 lines.
    """

    def __init__(self, log: Log, image_dir: Path) -> None:
        self.log = log
        self.image_dir = image_dir
        self.items: dict[str, tuple[str, str]] = {}  # file → (kind, reason)

    def add(self, file: str, reason: str, kind: str) -> None:
        if file in self.items:
            return
        self.items[file] = (kind, reason)
        n = self.count(kind)
        if n <= REPORT_LIMIT:
            self.log(f"skipped {self.image_dir / file}: {reason}")
        elif n == REPORT_LIMIT + 1:
            self.log(f"(more {kind} images are skipped without a line each; they are counted "
                     "and listed in the accuracy JSON)")

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.items.values() if k == kind)

    def state(self) -> list[list[str]]:
        return [[f, k, r] for f, (k, r) in self.items.items()]

    def restore(self, saved: Sequence[Sequence[str]]) -> None:
        """Take back the unreadable images an earlier session found (already reported); the
        missing ones come from this session's own scan of the folder."""
        earlier = {str(f): (str(k), str(r)) for f, k, r in saved if k == "unreadable"}
        self.items = {**earlier, **self.items}


@dataclass
class CelebAData:
    """A CelebA folder ready to train on: the dataset, each split's usable rows, what is
    missing."""

    root: Path
    image_dir: Path
    attr_file: Path
    names: tuple[str, ...]
    dataset: CelebAAttributes
    rows: dict[str, list[int]]  # split → dataset rows whose image file exists
    listed: int  # rows used (after ``limit``)
    missing: list[str]
    skipped: _Skipped  # missing images so far; unreadable ones are added as they are decoded


def load_celeba(celeba_dir: Path | str, *, limit: int | None = None, size: int = INPUT_SIZE,
                log: Log = print) -> CelebAData:
    """Read the list, split it 7:2:1 by position and leave out rows whose image is missing.

    The split is made over the list's rows (the first ``limit`` of them when given) *before*
    missing images are left out, so a missing file never moves another image into another
    split.  Each missing image is one line through ``log`` (see :class:`_Skipped`); none found at
    all, or a split left empty, is a :class:`UsageError`.
    """
    image_dir, attr_file = find_celeba(celeba_dir)
    table = read_attribute_list(attr_file)
    n = len(table.files)
    if table.declared != n:
        log(f"note: {attr_file} says {table.declared} images but lists {n}; using the {n} "
            "listed")
    if limit is not None:
        n = min(n, int(limit))
    files, labels = table.files[:n], table.labels[:n]
    try:
        present = {e.name for e in os.scandir(image_dir) if not e.name.startswith(".")}
    except OSError as exc:
        raise UsageError(f"cannot list {image_dir} ({exc.strerror or first_line(exc)})") from None
    skipped = _Skipped(log, image_dir)
    missing = []
    for f in files:
        exists = f in present if "/" not in f else (image_dir / f).is_file()
        if not exists:
            missing.append(f)
            skipped.add(f, f"file not found (listed in {attr_file.name})", "missing")
    if len(missing) == n:
        raise UsageError(f"none of the {n} images listed in {attr_file} is in {image_dir}")
    gone = set(missing)
    rows = {s: [r for r in rng if files[r] not in gone] for s, rng in split_indices(n).items()}
    for s in ("val", "test"):
        if not rows[s]:
            raise UsageError(f"the {s} split of {attr_file} is empty: it needs at least 10 "
                             "listed images (split 7:2:1 by position)")
    dataset = CelebAAttributes(image_dir, files, labels, size)
    return CelebAData(Path(celeba_dir), image_dir, attr_file, table.names, dataset, rows, n,
                      missing, skipped)


# ---------------------------------------------------------------------------------------------
# The output file
# ---------------------------------------------------------------------------------------------
def state_path_for(output: Path | str) -> Path:
    """Where an unfinished run keeps its resumable state: ``OUT.resume.pt``."""
    output = Path(output)
    return output.with_name(output.name + ".resume.pt")


def report_path_for(output: Path | str) -> Path:
    """The accuracy JSON beside the classifier: ``OUT``'s stem + ``.accuracy.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".accuracy.json")


def _cpu_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def save_attribute_classifier(path: Path | str, net: AttributeNet, *,
                              accuracy: dict[str, Any] | None = None,
                              training: dict[str, Any] | None = None) -> None:
    """Write ``net`` in the classifier file format (docs/attribute-classifier.md), atomically.

    Tensors and plain Python types only, so ``torch.load(weights_only=True)`` reads it.
    """
    ckpt = {
        "format": ATTRIBUTES_FORMAT,
        "state_dict": _cpu_state(net),
        "attributes": list(net.attributes),
        "input_size": int(net.input_size),
        "normalize": list(NORMALIZE),
        "accuracy": accuracy or {},
        "training": training or {},
    }
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


@dataclass
class ClassifierResult:
    """What :func:`train_classifier` made: the files and the held-out accuracy.

    ``accuracy[split]`` (``"test"``, ``"val"``) is ``{"mean", "images", "per_attribute":
    {name: accuracy}, "majority": {name: share of the more common label}}`` — the majority
    share is the accuracy of always answering the commoner label, the bar a useful attribute
    must clear.  ``images`` counts ``listed``, ``missing``, ``unreadable`` and each split's
    images used.  ``trained`` is False when the output already was this run's finished file.
    """

    output: Path
    report: Path
    attributes: tuple[str, ...]
    accuracy: dict[str, dict[str, Any]]
    images: dict[str, int]
    history: list[dict[str, float]]
    best_epoch: int
    epochs: int
    skipped: list[dict[str, str]]
    trained: bool = True

    @property
    def test_accuracy(self) -> dict[str, float]:
        return dict(self.accuracy["test"]["per_attribute"])

    @property
    def val_accuracy(self) -> dict[str, float]:
        return dict(self.accuracy["val"]["per_attribute"])


def accuracy_table(accuracy: dict[str, dict[str, Any]]) -> list[str]:
    """Per-attribute held-out accuracy as aligned text lines (test, val, test majority)."""
    test, val = accuracy["test"], accuracy["val"]
    names = list(test["per_attribute"])
    width = max(len("attribute"), *(len(n) for n in names))
    lines = [f"{'attribute':<{width}}  {'test':>7}  {'val':>7}  {'majority':>8}"]
    for n in names:
        lines.append(f"{n:<{width}}  {test['per_attribute'][n]:7.2%}  "
                     f"{val['per_attribute'].get(n, float('nan')):7.2%}  "
                     f"{test['majority'][n]:8.2%}")
    lines.append(f"{'mean':<{width}}  {test['mean']:7.2%}  {val['mean']:7.2%}  "
                 f"{_mean(test['majority'].values()):8.2%}")
    return lines


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _accuracy_block(names: Sequence[str], counts: dict[str, Any]) -> dict[str, Any]:
    """``{"mean", "images", "per_attribute", "majority"}`` from correct/positive counts."""
    n = int(counts["images"])
    per = {a: counts["correct"][i] / n for i, a in enumerate(names)}
    majority = {a: max(p, n - p) / n for a, p in zip(names, counts["positives"], strict=True)}
    return {"mean": _mean(per.values()), "images": n, "per_attribute": per,
            "majority": majority}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _loader_worker_init(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (the main process saves and stops) and die with it."""
    from ..workers import worker_init

    worker_init()


def _step(net: AttributeNet, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          labels: torch.Tensor) -> tuple[float, int]:
    """One Adam step on the mean binary cross-entropy over every (image, attribute) pair.

    ``BCEWithLogits`` is the reference's sigmoid + ``BCELoss`` without the precision lost where
    the sigmoid saturates.  Returns (loss, correct labels).
    """
    logits = net(images)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = int(((logits.detach() > 0) == (labels > 0.5)).sum())
    return float(loss.detach()), correct


def _check_settings(epochs: int, batch_size: int, lr: float, limit: int | None,
                    input_size: int, widths: Sequence[int], workers: int | None) -> None:
    if epochs < 1:
        raise UsageError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 2:
        raise UsageError(f"batch size must be at least 2 (BatchNorm needs two images), got "
                         f"{batch_size}")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"learning rate must be a number above 0, got {lr}")
    if limit is not None and limit < 10:
        raise UsageError(f"limit must be at least 10 images (split 7:2:1), got {limit}")
    if input_size < 8:
        raise UsageError(f"input size must be at least 8 pixels, got {input_size}")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be 0 or more, got {workers}")
    try:
        with torch.device("meta"):
            AttributeNet(widths, 1, input_size=input_size)
    except ValueError as exc:
        raise UsageError(f"widths: {exc}") from None


class _Run:
    """One training run's mutable state: what ``OUT.resume.pt`` holds."""

    def __init__(self, net: AttributeNet, optimizer: torch.optim.Optimizer, config: dict,
                 epochs: int, run_id: str, overwrite: bool, skipped: _Skipped) -> None:
        self.net, self.optimizer = net, optimizer
        self.config, self.epochs, self.run_id, self.overwrite = config, epochs, run_id, overwrite
        self.skipped = skipped
        self.epoch = 0  # epochs completed
        self.position = 0  # samples of the current epoch consumed (a multiple of the batch)
        self.validated = 0  # epochs whose model has been scored on the val split
        self.sums = {"loss": 0.0, "batches": 0, "correct": 0, "labels": 0}  # this epoch so far
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] | None = None  # {"epoch", "mean", "val": counts, "state_dict"}

    def state(self) -> dict[str, Any]:
        from ..training.checkpoint import rng_states

        return {"format": STATE_FORMAT, "run_id": self.run_id, "overwrite": self.overwrite,
                "config": self.config, "epochs": self.epochs, "epoch": self.epoch,
                "position": self.position, "validated": self.validated,
                "sums": dict(self.sums), "history": list(self.history), "best": self.best,
                "skipped": self.skipped.state(), "model": _cpu_state(self.net),
                "optimizer": self.optimizer.state_dict(), "rng": rng_states(),
                "tool": f"clipinvert {__version__}"}

    def save(self, path: Path) -> None:
        state = self.state()
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def restore(self, state: dict[str, Any]) -> None:
        from ..training.checkpoint import set_rng_states

        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.validated = int(state["validated"])
        self.sums = dict(state["sums"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.skipped.restore(state["skipped"])
        set_rng_states(state["rng"])


def _read_state(path: Path) -> dict[str, Any]:
    from ..weights.reader import read_weights

    try:
        state = read_weights(path, what="classifier training state", cache=False)
    except WeightsError as exc:
        raise UsageError(f"{exc} — delete {path} to start the run over") from None
    if state.get("format") != STATE_FORMAT:
        raise UsageError(f"{path} is not a classifier training state — delete it or choose "
                         "another output")
    return state


def _differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    return [f"{k} {config.get(k)!r} (the run has {saved.get(k)!r})" for k in _FIXED
            if saved.get(k) != config.get(k)]


def _finished(output: Path, config: dict[str, Any], epochs: int) -> tuple[dict | None, str]:
    """The training record of ``output`` when it is a finished run of these very settings;
    else ``None`` and how the file differs (for the refusal)."""
    from ..weights.reader import read_weights

    try:
        ckpt = read_weights(output, what="attribute classifier", cache=False)
    except WeightsError:
        return None, "is not an attribute classifier"
    training = ckpt.get("training")
    if ckpt.get("format") != ATTRIBUTES_FORMAT or not isinstance(training, dict):
        return None, "is not an attribute classifier written by this trainer"
    saved = training.get("config") or {}
    changed = _differences(saved, config)
    if training.get("epochs") != epochs:
        changed.append(f"epochs {epochs} (the file has {training.get('epochs')!r})")
    if changed:
        return None, "holds a classifier trained with other settings: " + "; ".join(changed)
    return {"accuracy": ckpt.get("accuracy") or {}, "training": training,
            "attributes": tuple(ckpt.get("attributes") or ())}, ""


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from ..batch import make_progress, stderr_console

    bar = make_progress(stderr_console(), quiet=not enabled)
    with bar:
        yield bar


def _loader(dataset: Dataset, rows: Sequence[int], batch_size: int, workers: int,
            device: torch.device) -> DataLoader:
    return DataLoader(Subset(dataset, list(rows)), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate,
                      worker_init_fn=_loader_worker_init if workers else None,
                      pin_memory=device.type == "cuda", persistent_workers=False)


@torch.no_grad()
def _evaluate(net: AttributeNet, data: CelebAData, split: str, *, batch_size: int,
              workers: int, device: torch.device, skipped: _Skipped, bar: Any,
              label: str) -> dict[str, Any]:
    """Correct predictions and positive labels per attribute over a split's readable images
    (eval mode: BatchNorm's running statistics)."""
    rows = data.rows[split]
    n_attr = len(data.names)
    correct = torch.zeros(n_attr, dtype=torch.long)
    positives = torch.zeros(n_attr, dtype=torch.long)
    images = 0
    was_training = net.training
    net.eval()
    task = bar.add_task(label, total=len(rows))
    try:
        for batch in _loader(data.dataset, rows, batch_size, workers, device):
            for file, reason in batch["failed"]:
                skipped.add(file, reason, "unreadable")
            if len(batch["image"]):
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"] > 0.5
                pred = (net(x) > 0).cpu()
                correct += (pred == y).sum(0)
                positives += y.sum(0)
                images += len(x)
            bar.advance(task, len(batch["image"]) + len(batch["failed"]))
    finally:
        bar.remove_task(task)
        net.train(was_training)
    if images == 0:
        raise ClipInvertError(f"no image of the {split} split could be read")
    return {"images": images, "correct": correct.tolist(), "positives": positives.tolist()}


def _train_epoch(run: _Run, data: CelebAData, *, state_path: Path, batch_size: int,
                 workers: int, device: torch.device, seed: int, bar: Any, log: Log) -> None:
    """Train from ``run.position`` to the end of the epoch ``run.epoch``.

    The epoch's order is a permutation fixed by (seed, epoch) and cut to whole batches, so a
    resumed run feeds exactly the batches an uninterrupted one would.  Ctrl-C / SIGTERM finish
    the batch in progress, save the state and stop.
    """
    from ..training.data import ResumableSampler
    from ..workers import DeferredStop

    train_rows = data.rows["train"]
    order = [train_rows[i] for i in ResumableSampler(len(train_rows), seed=seed)
             .indices(run.epoch)]
    usable = len(order) // batch_size * batch_size
    task = bar.add_task(f"epoch {run.epoch + 1}/{run.epochs}", total=usable,
                        completed=run.position)
    last_save = time.monotonic()
    net = run.net
    net.train()
    try:
        with DeferredStop() as stop:
            loader = _loader(data.dataset, order[run.position:usable], batch_size, workers,
                             device)
            for batch in loader:
                for file, reason in batch["failed"]:
                    run.skipped.add(file, reason, "unreadable")
                if len(batch["image"]) >= 2:  # BatchNorm needs two images
                    x = batch["image"].to(device, non_blocking=True)
                    y = batch["label"].to(device, non_blocking=True)
                    loss, correct = _step(net, run.optimizer, x, y)
                    if not math.isfinite(loss):
                        raise ClipInvertError(f"the training loss became {loss} in epoch "
                                              f"{run.epoch + 1}: try a lower learning rate")
                    run.sums["loss"] += loss
                    run.sums["batches"] += 1
                    run.sums["correct"] += correct
                    run.sums["labels"] += y.numel()
                run.position += batch_size
                bar.advance(task, batch_size)
                if stop.signum:
                    run.save(state_path)
                    log(f"stopped in epoch {run.epoch + 1} after {run.position} images; saved "
                        f"{state_path}: run the same command again to continue")
                    stop.reraise()
                if time.monotonic() - last_save > SAVE_EVERY_S and run.position < usable:
                    run.save(state_path)
                    last_save = time.monotonic()
    finally:
        bar.remove_task(task)


def check_resume(output: Path | str, *, resume: bool, overwrite: bool) -> None:
    """What ``clipinvert eval train-classifier`` allows before any work, as ``clipinvert
    train`` does with its run folder: nothing is continued or replaced unasked.

    Without ``resume`` an unfinished run (``OUT.resume.pt``) or an existing ``OUT`` is refused
    in one line naming ``--resume`` (``overwrite`` starts over instead); with it there must be
    something to continue — an unfinished run, or a finished ``OUT`` whose accuracy
    :func:`train_classifier` then reports.  (:func:`train_classifier` itself, for library
    callers, continues a saved run by default.)
    """
    output = Path(output)
    state = state_path_for(output)
    if output.is_dir():  # train_classifier says what to give instead
        return
    if resume:
        if not state.exists() and not output.exists():
            raise UsageError(f"--resume: {output} has no run to continue (no {state.name}); "
                             "leave out --resume to start one")
        return
    if overwrite:
        return
    if state.exists():
        raise UsageError(f"{state} holds an unfinished run of {output}: pass --resume to "
                         "continue it, or --overwrite to start over")
    if output.exists():
        raise UsageError(f"{output} already exists: pass --resume to continue (or report) its "
                         "run, --overwrite to replace it, or choose another -o")


def train_classifier(
    celeba_dir: Path | str,
    output: Path | str,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    workers: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    log: Log = print,
    progress: bool = True,
    limit: int | None = None,
    input_size: int = INPUT_SIZE,
    widths: Sequence[int] = MOBILENET_WIDTHS,
) -> ClassifierResult:
    """Train the AMA attribute classifier on CelebA and write it to ``output``.

    ``celeba_dir`` holds ``img_align_celeba/`` and ``list_attr_celeba.txt``
    (:func:`find_celeba`).  The defaults are the paper's recipe; ``limit`` (the first N listed
    images, split 7:2:1 in turn), ``input_size`` and ``widths`` are for quick trials and tests.
    ``workers``: decoding processes (default: up to 8, one per CPU core); ``progress``: rich
    progress bars on a terminal; ``log``: every message line.

    After each epoch the model is scored on the val split, and the best one (highest mean
    accuracy; the reference trainer kept its best too) is the one written, together with its
    per-attribute accuracy on the test and val splits (printed as a table through ``log``,
    saved in the file and in the accuracy JSON: :func:`report_path_for`).

    Resuming (``resume``, on by default): an unfinished run's state ``OUT.resume.pt``
    (:func:`state_path_for`) is continued when the same call is made again — a different
    setting of what is trained is refused in one line; ``epochs`` may be raised.  With
    ``resume=False`` a saved state is discarded and the run starts over.

    ``output`` is refused (one-line :class:`UsageError`) when it exists and is not this run's
    file, unless ``overwrite``; if it is the finished file of exactly these settings, nothing is
    trained and its recorded accuracy is returned (``trained=False``).
    """
    from ..pipeline import resolve_device

    output = Path(output)
    widths = tuple(int(w) for w in widths)
    _check_settings(epochs, batch_size, lr, limit, input_size, widths, workers)
    device = resolve_device(device)
    if output.is_dir():
        raise UsageError(f"{output} is a folder: give the classifier's file name, e.g. "
                         f"{output / 'celeba-attributes.pt'}")
    state_path, report_path = state_path_for(output), report_path_for(output)
    data = load_celeba(celeba_dir, limit=limit, size=input_size, log=log)
    skipped = data.skipped
    config = {"celeba_dir": str(Path(celeba_dir).resolve()), "limit": limit,
              "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed),
              "input_size": int(input_size), "widths": list(widths),
              "split": [0.7, 0.2, 0.1], "loss": "bce", "optimizer": "adam"}
    if len(data.rows["train"]) < batch_size:
        raise UsageError(f"the train split has {len(data.rows['train'])} images, fewer than one "
                         f"batch of {batch_size}: lower the batch size")

    state = None
    if state_path.exists():
        if resume:
            state = _read_state(state_path)
            changed = _differences(state["config"], config)
            if changed:
                raise UsageError(f"{state_path} holds an unfinished run with other settings: "
                                 + "; ".join(changed) + " — give its settings to continue it, "
                                 "or start over without resuming")
            if epochs < int(state["epoch"]):
                raise UsageError(f"{state_path} has already trained {state['epoch']} epochs: "
                                 f"epochs must be at least that, not {epochs}")
        else:
            log(f"starting over: the unfinished run in {state_path} will be replaced")
    if output.exists() and not overwrite:
        if state is not None:
            ours = state.get("overwrite") or _run_id(output) == state["run_id"]
            if not ours:
                raise UsageError(f"{output} already exists and is not this run's: pass "
                                 "overwrite (--overwrite) to replace it, or choose another "
                                 "output")
        else:
            done, why = _finished(output, config, epochs)
            if done is None:
                raise UsageError(f"{output} already exists and {why}: pass overwrite "
                                 "(--overwrite) to replace it, or choose another output")
            log(f"{output} is already trained with these settings; nothing to do")
            return _result_from_file(output, report_path, done, data, skipped)

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights depend on the seed alone
        net = AttributeNet(widths, len(data.names), attributes=data.names,
                           input_size=input_size)
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    run = _Run(net, optimizer, config, epochs,
               state["run_id"] if state is not None else secrets.token_hex(8),
               bool(overwrite or (state is not None and state.get("overwrite"))), skipped)
    if state is not None:
        run.restore(state)
        run.epochs = epochs
        log(f"resuming {state_path}: {run.epoch} of {epochs} epochs done"
            + (f", {run.position} images into epoch {run.epoch + 1}" if run.position else ""))
    n_train, per_epoch = len(data.rows["train"]), len(data.rows["train"]) // batch_size
    params = sum(p.numel() for p in net.parameters())
    log(f"CelebA: {data.listed} images listed (train {n_train}, val {len(data.rows['val'])}, "
        f"test {len(data.rows['test'])}), {len(data.missing)} missing")
    log(f"training MobileNet-v1 ({params / 1e6:.2f} M parameters) on {device}: {epochs} "
        f"epochs of {per_epoch} batches of {batch_size}, Adam lr {lr:g}, seed {seed}")

    with _progress(progress) as bar:
        while True:
            if run.validated < run.epoch:  # score the model of the epoch just finished
                counts = _evaluate(net, data, "val", batch_size=batch_size, workers=workers,
                                   device=device, skipped=skipped, bar=bar,
                                   label=f"val {run.epoch}/{epochs}")
                mean = _accuracy_block(data.names, counts)["mean"]
                best = run.best is None or mean > run.best["mean"]
                if best:
                    run.best = {"epoch": run.epoch, "mean": mean, "val": counts,
                                "state_dict": _cpu_state(net)}
                s = run.sums
                record = {"epoch": run.epoch,
                          "loss": s["loss"] / max(1, s["batches"]),
                          "train_accuracy": s["correct"] / max(1, s["labels"]),
                          "val_accuracy": mean}
                run.history.append(record)
                run.validated = run.epoch
                run.sums = {"loss": 0.0, "batches": 0, "correct": 0, "labels": 0}
                run.save(state_path)
                log(f"epoch {run.epoch}/{epochs}: loss {record['loss']:.4f}, train accuracy "
                    f"{record['train_accuracy']:.2%}, val accuracy {mean:.2%}"
                    + (" (best so far)" if best else ""))
            if run.epoch >= epochs:
                break
            _train_epoch(run, data, state_path=state_path, batch_size=batch_size,
                         workers=workers, device=device, seed=seed, bar=bar, log=log)
            run.epoch += 1
            run.position = 0
            run.save(state_path)  # the epoch is safe before its (interruptible) val pass

        assert run.best is not None
        net.load_state_dict(run.best["state_dict"])
        test = _evaluate(net, data, "test", batch_size=batch_size, workers=workers,
                         device=device, skipped=skipped, bar=bar, label="test")

    accuracy = {"test": _accuracy_block(data.names, test),
                "val": _accuracy_block(data.names, run.best["val"])}
    images = _image_counts(data, skipped, accuracy)
    training = {"config": config, "epochs": epochs, "best_epoch": int(run.best["epoch"]),
                "history": run.history, "images": images, "run_id": run.run_id,
                "tool": f"clipinvert {__version__}"}
    net.cpu()
    save_attribute_classifier(output, net, accuracy=accuracy, training=training)
    result = ClassifierResult(output, report_path, data.names, accuracy, images, run.history,
                              int(run.best["epoch"]), epochs, _skipped_list(skipped))
    _write_report(result, training)
    state_path.unlink(missing_ok=True)
    for line in accuracy_table(accuracy):
        log(line)
    log(f"wrote {output} (best epoch {result.best_epoch}: test accuracy "
        f"{accuracy['test']['mean']:.2%}, val {accuracy['val']['mean']:.2%}) and {report_path}")
    return result


def _run_id(output: Path) -> str | None:
    from ..weights.reader import read_weights

    try:
        training = read_weights(output, what="attribute classifier", cache=False).get("training")
    except WeightsError:
        return None
    return training.get("run_id") if isinstance(training, dict) else None


def _image_counts(data: CelebAData, skipped: _Skipped,
                  accuracy: dict[str, dict[str, Any]]) -> dict[str, int]:
    unreadable = {f for f, (k, _) in skipped.items.items() if k == "unreadable"}
    train = sum(1 for r in data.rows["train"] if data.dataset.files[r] not in unreadable)
    return {"listed": data.listed, "missing": len(data.missing),
            "unreadable": len(unreadable), "train": train,
            "val": int(accuracy["val"]["images"]), "test": int(accuracy["test"]["images"])}


def _skipped_list(skipped: _Skipped) -> list[dict[str, str]]:
    return [{"file": f, "kind": k, "reason": r} for f, (k, r) in skipped.items.items()]


def _write_report(result: ClassifierResult, training: dict[str, Any]) -> None:
    atomic_write_json(result.report, {
        "format": ATTRIBUTES_FORMAT, "model": result.output.name,
        "attributes": list(result.attributes), "accuracy": result.accuracy,
        "training": training, "skipped": result.skipped})


def _result_from_file(output: Path, report: Path, done: dict[str, Any], data: CelebAData,
                      skipped: _Skipped) -> ClassifierResult:
    training = done["training"]
    result = ClassifierResult(
        output, report, done["attributes"] or data.names, done["accuracy"],
        dict(training.get("images") or {}), list(training.get("history") or []),
        int(training.get("best_epoch", 0)), int(training.get("epochs", 0)),
        _skipped_list(skipped), trained=False)
    if not report.exists():
        _write_report(result, training)
    return result
