"""The paper's benchmark end to end: choose the inputs, build the prompts, edit, score.

``run_benchmark`` is what `clipinvert eval benchmark` runs (docs/evaluation.md#benchmark):

1. read the labelled set — CelebA-HQ (``images/<index>.jpg`` + ``CelebAMask-HQ-attribute-anno.txt``,
   optionally a test list) or a JSONL of images with their attributes;
2. for every target (an attribute, or a combination for AMA-multiple) draw ``per_target`` test
   images that lack it, seeded (:func:`~clipinvert.evaluation.protocol.choose_inputs`), and
   write the choice with its prompts to ``OUT/selection.json`` — another method can be run on
   exactly these and scored with ``--edits``;
3. edit them with the current model into ``OUT/edits/<target>/<stem>.png`` (atomic writes; an
   edit already on disk from the same selection and model is kept, so a stopped run resumes);
4. score every edit (:func:`~clipinvert.evaluation.run.evaluate_pairs`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..fileio import atomic_write_json, atomic_write_text
from ..manifest import fingerprint
from . import protocol

CELEBA_ANNOTATIONS = "CelebAMask-HQ-attribute-anno.txt"


@dataclass(frozen=True)
class Labelled:
    """One candidate input: its file, the attributes it has, and (faces) whether it is male."""

    name: str
    path: Path
    attributes: frozenset[str]
    male: bool | None = None
    box: tuple[int, int, int, int] | None = None  # CUB: the bird's box, cropped as in training


def read_labelled(data: Path, *, test_list: Path | None = None, split: str = "all",
                  log: Callable[[str], None] | None = None) -> list[Labelled]:
    """The candidate inputs of a labelled set, from ``split`` (``all``, ``train``, ``test``):

    * CelebA-HQ with its attribute file (``test``: ``test/filenames.pickle`` beside it);
    * CUB-200-2011 with ``attributes/image_attribute_labels.txt`` (names ``category:class``,
      :func:`cub_attribute`; the split of :meth:`~clipinvert.training.data.CubLayout.split_names`);
    * AFHQ (``test``: its ``val/`` folder), unlabelled: every image lacks every attribute;
    * a JSONL of ``{"image", "attributes"}`` lines (attributes: the names the image has).

    With ``test_list`` (see :func:`read_test_list`) only those images are candidates."""
    from ..training.data import SPLITS, find_afhq, find_cub

    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: choose {', '.join(SPLITS)}")
    note = log or (lambda line: None)
    cub = None if data.is_file() else find_cub(data)
    if data.is_file() and data.suffix == ".jsonl":
        if split != "all":
            raise UsageError(f"--split {split}: a JSONL of labelled images has no split of its "
                             "own (give --test-list, or a JSONL of the test images)")
        items = _read_jsonl(data)
    elif (data / CELEBA_ANNOTATIONS).is_file():
        items = _read_celeba(data)
        if split != "all" and test_list is None:
            test_list = data / split / "filenames.pickle"
            if not test_list.is_file():
                raise UsageError(f"--split {split}: {test_list} not found (Multi-Modal "
                                 "CelebA-HQ's split; or give --test-list)")
    elif cub is not None and (cub.meta / CUB_LABELS).is_file():
        items = _read_cub(cub, split, note)
    elif (afhq := find_afhq(data, split)) is not None:
        items = _read_unlabelled(afhq[1])
    else:
        raise UsageError(f"--data {data}: expected CelebA-HQ (images/ and {CELEBA_ANNOTATIONS}), "
                         f"CUB-200-2011 (images/ and {CUB_LABELS}), AFHQ (train/ and val/) or "
                         "a JSONL of images with their attributes")
    if test_list is not None:
        wanted = read_test_list(test_list)
        items = [i for i in items if i.name in wanted or Path(i.name).stem in wanted]
    if not items:
        raise UsageError(f"--data {data}: no labelled image to draw inputs from")
    return items


CUB_LABELS = "attributes/image_attribute_labels.txt"


def cub_attribute(raw: str) -> str:
    """A CUB ``attributes.txt`` name as the protocol names it: ``category:class``.

    ``has_wing_color::blue`` → ``wing_color:blue``; ``has_bill_shape::curved_(up_or_down)`` →
    ``bill_shape:curved`` (the explanation in brackets dropped, underscores read as spaces:
    ``hooked_seabird`` → ``hooked seabird``).
    """
    category, _, label = raw.partition("::")
    category = category.removeprefix("has_")
    label = re.sub(r"_?\(.*\)$", "", label).replace("_", " ").strip()
    return f"{category}:{label}"


def _read_cub(layout: Any, split: str, note: Callable[[str], None]) -> list[Labelled]:
    """CUB's images of ``split`` with the attributes present in each (``is_present`` 1)."""
    from ..training.data import read_cub_index

    meta = layout.meta
    names_file = next((p for p in (meta / "attributes.txt", meta / "attributes" / "attributes.txt",
                                   meta.parent / "attributes.txt") if p.is_file()), None)
    if names_file is None:
        raise UsageError(f"{meta}: attributes.txt not found (the attribute names of "
                         f"{CUB_LABELS}; the download keeps it beside CUB_200_2011/)")
    names = {}
    for line in names_file.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2:
            names[parts[0]] = cub_attribute(parts[1].strip())
    present: dict[str, set[str]] = {}
    bad, first_bad = 0, 0
    labels = meta / CUB_LABELS
    try:
        text = labels.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {labels} ({exc.strerror or exc})") from None
    for number, line in enumerate(text.splitlines(), 1):
        # image_id attribute_id is_present certainty_id time; a few lines carry more fields
        parts = line.split()
        if not parts:
            continue
        try:
            image_id, attribute, is_present = parts[0], parts[1], int(parts[2])
        except (IndexError, ValueError):
            bad, first_bad = bad + 1, first_bad or number
            continue
        if is_present == 1 and attribute in names:
            present.setdefault(image_id, set()).add(names[attribute])
    if bad:
        note(f"note: {bad} line(s) of {labels} unreadable, left out (first: line {first_bad})")
    wanted = layout.split_names(split, note)
    boxes = layout.boxes() or {}
    items = []
    for image_id, rel in read_cub_index(meta).items():
        key = Path(rel).with_suffix("").as_posix()
        if wanted is None or key in wanted:
            items.append(Labelled(Path(rel).name, layout.images / rel,
                                  frozenset(present.get(image_id, ())), box=boxes.get(key)))
    return items


def _read_unlabelled(folders: Sequence[Path]) -> list[Labelled]:
    """AFHQ's images: no attribute labels, so every image may be edited towards any class."""
    from ..imaging import list_inputs

    return [Labelled(path.name, path, frozenset()) for folder in folders
            for path, _ in list_inputs(folder)]


def read_test_list(path: Path) -> set[str]:
    """The image names of a test split (:func:`~clipinvert.training.data.read_name_list`: a
    text file, or a ``filenames.pickle`` read without allowing any class)."""
    from ..training.data import read_name_list

    return read_name_list(path, "test list")


def _read_celeba(root: Path) -> list[Labelled]:
    from ..training.data import CELEBA_IMAGE_FOLDERS, find_dir

    images = find_dir(root, CELEBA_IMAGE_FOLDERS) or root / "images"
    try:
        lines = (root / CELEBA_ANNOTATIONS).read_text(encoding="utf-8").split("\n")
        names = lines[1].split()
        items = []
        for line in lines[2:]:
            parts = line.split()
            if not parts:
                continue
            values = [int(v) for v in parts[1:]]
            if len(values) != len(names):
                raise ValueError(f"{parts[0]} has {len(values)} labels for {len(names)} names")
            present = frozenset(n for n, v in zip(names, values, strict=True) if v > 0)
            items.append(Labelled(parts[0], images / parts[0], present,
                                  male="Male" in present))
    except (OSError, IndexError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{root / CELEBA_ANNOTATIONS} is not a CelebA attribute file: "
                         f"{exc}") from None
    return items


def _read_jsonl(path: Path) -> list[Labelled]:
    items = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = Path(rec["image"])
            listed = rec.get("attributes") or []
            if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
                raise TypeError("attributes must be a list of names")
            attrs = frozenset(listed)
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path}:{number}: expected {{\"image\": …, \"attributes\": "
                             f"[…]}} ({exc})") from None
        image = image if image.is_absolute() else path.parent / image
        male = rec.get("male")
        items.append(Labelled(image.name, image, attrs,
                              male=bool(male) if male is not None else "Male" in attrs))
    # an edit is written as <target>/<stem>.png: two inputs of one stem would share it
    seen: dict[str, Path] = {}
    for item in items:
        other = seen.setdefault(item.path.stem, item.path)
        if other != item.path:
            raise UsageError(f"{path}: {other} and {item.path} have the same name; the "
                             "benchmark names each edit after its input — rename one")
    return items


def targets_for(domain: str) -> list[tuple[str, ...]]:
    """What the benchmark edits on a domain: each attribute, then the combinations."""
    if domain in protocol.ZERO_SHOT:
        return [(a,) for a in protocol.ZERO_SHOT[domain].evaluated]
    return [(a,) for a in protocol.FACE_ATTRIBUTES] + list(protocol.FACE_COMBINATIONS)


def prompt_for(domain: str, target: Sequence[str], item: Labelled, gendered: bool) -> str:
    if domain in protocol.ZERO_SHOT:
        return protocol.ZERO_SHOT[domain].prompt(target[0])
    return protocol.face_prompt(target, male=item.male, gendered=gendered)


def select(items: Sequence[Labelled], domain: str, *, per_target: int, seed: int,
           gendered: bool) -> dict[str, Any]:
    """The benchmark's inputs and prompts, reproducible from ``seed``."""
    by_name = {i.name: i for i in items}
    targets = targets_for(domain)
    candidates = {"+".join(t): [i.name for i in items if not set(t) & i.attributes]
                  for t in targets}
    chosen = protocol.choose_inputs(candidates, per_target, seed)
    selection = []
    for target in targets:
        key = "+".join(target)
        for name in chosen[key]:
            item = by_name[name]
            selection.append({"target": key, "attributes": list(target), "input": str(item.path),
                              "prompt": prompt_for(domain, target, item, gendered)})
    short = {k: len(v) for k, v in chosen.items() if len(v) < per_target}
    return {"domain": domain, "seed": seed, "per_target": per_target, "gendered": gendered,
            "short": short, "edits": selection}


def prepared_inputs(items: Sequence[tuple[Path, tuple[int, int, int, int] | None]],
                    output: Path, resize: str) -> list[Path]:
    """The image each selected input is edited and scored as, one per ``(path, box)``.

    A CUB bird (its AttnGAN crop, :func:`~clipinvert.training.data.cub_crop_box`) or a
    non-square photo on a domain whose ``resize`` is not ``stretch`` is written, squared, to
    ``output/inputs/<stem>.png`` and that file is the input: the edit, the scores and any other
    method run on ``selection.json`` then all see the pixels training saw
    (:func:`~clipinvert.training.data.load_sample_image`).  Anything else stays its own file.
    """
    from PIL import Image

    from .. import imaging
    from ..training.data import load_sample_image

    made = []
    for path, box in items:
        if box is None:
            if resize == "stretch":
                made.append(path)
                continue
            try:
                with Image.open(path) as im:
                    square = im.width == im.height
            except Exception:  # noqa: BLE001 - unreadable: the edit loop says so, one line
                square = True
            if square:
                made.append(path)
                continue
        target = output / "inputs" / f"{path.stem}.png"
        try:  # written every run: a changed policy or box must not find an old square
            imaging.save_image(load_sample_image(path, box, resize), target)
        except Exception:  # noqa: BLE001 - the edit loop reports the unreadable input
            made.append(path)
            continue
        made.append(target)
    return made


def run_benchmark(data: Path, output: Path, *, domain: str = "faces", registry: Any = None,
                  per_target: int = protocol.SAMPLES_PER_TARGET, seed: int = 0,
                  gendered: bool = False, edits: Path | None = None,
                  test_list: Path | None = None, split: str = "all", device: str = "auto",
                  batch_size: int = 8,
                  strength: float = 1.0, metrics: str | None = None,
                  evaluate: Callable[..., dict[str, Any]] | None = None,
                  log: Callable[[str], None] = print, **eval_kwargs: Any) -> dict[str, Any]:
    """Run the protocol; returns the report (``OUT/clipinvert-report.json``).

    Paths given relative to the current folder are made absolute first: ``selection.json``
    and ``pairs.jsonl`` name images absolute or relative to their own folder (the manifest
    rule, :func:`~clipinvert.evaluation.pairs.manifest_path`), never relative to wherever this
    command happened to be started.
    """
    from ..registry import Registry
    from .pairs import manifest_path
    from .run import check_eval_output, evaluate_pairs

    data, output = Path(os.path.abspath(data)), Path(os.path.abspath(output))
    edits = Path(os.path.abspath(edits)) if edits is not None else None
    test_list = Path(os.path.abspath(test_list)) if test_list is not None else None
    registry = registry or Registry.load()
    check_eval_output(output, eval_kwargs.get("report_path"))
    items = read_labelled(data, test_list=test_list, split=split, log=log)
    if test_list is None and split == "all":
        log(f"note: no --split test or --test-list: inputs are drawn from all {len(items)} "
            "labelled images (the paper drew them from a test split the model was not trained "
            "on)")
    sel = select(items, domain, per_target=per_target, seed=seed, gendered=gendered)
    sel["split"] = split
    for target, n in sel["short"].items():
        log(f"note: only {n} test images lack {target} (asked for {per_target})")
    output.mkdir(parents=True, exist_ok=True)
    known = registry.domains.get(domain)
    _use_prepared_inputs(sel["edits"], items, output, known.resize if known else "stretch")
    selection_file = output / "selection.json"
    atomic_write_json(selection_file, sel)
    root = edits if edits is not None else output / "edits"
    manifest = output / "pairs.jsonl"
    lines = []
    for e in sel["edits"]:
        e["output"] = str(root / e["target"] / f"{Path(e['input']).stem}.png")
        line = {k: e[k] for k in ("input", "output", "prompt", "attributes")}
        for k in ("input", "output"):
            line[k] = manifest_path(Path(line[k]), manifest.parent)
        lines.append(json.dumps(line))
    if edits is None:
        made = _edit_all(sel, root, registry, domain, device=device, batch_size=batch_size,
                         strength=strength, log=log, quiet=eval_kwargs.get("quiet", False))
    else:
        made = {"edits": "given", "folder": str(edits)}
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return (evaluate or evaluate_pairs)(
        manifest, output, domain=domain, registry=registry, metrics=metrics, device=device,
        command="eval benchmark", log=log,
        extra={"benchmark": {"data": str(data), "split": split, "seed": seed,
                             "per_target": per_target,
                             "gendered": gendered, "selection": str(selection_file),
                             "short": sel["short"], **made}},
        **eval_kwargs)


def _use_prepared_inputs(edits: list[dict[str, Any]], items: Sequence[Labelled], output: Path,
                         resize: str) -> None:
    """Point each selected edit at the image the model sees (:func:`prepared_inputs`), keeping
    the original file as ``"source"`` when they differ."""
    boxes = {str(i.path): i.box for i in items}
    inputs = list(dict.fromkeys(e["input"] for e in edits))
    made = dict(zip(inputs, prepared_inputs([(Path(p), boxes.get(p)) for p in inputs], output,
                                            resize), strict=True))
    for e in edits:
        square = made[e["input"]]
        if square != Path(e["input"]):
            e["source"], e["input"] = e["input"], str(square)


def _edit_all(sel: dict[str, Any], root: Path, registry: Any, domain: str, *, device: str,
              batch_size: int, strength: float, log: Callable[[str], None],
              quiet: bool = False) -> dict[str, Any]:
    """Make every selected edit with the domain's model into ``root``; edits already made by
    this model for this selection are kept (a record in ``root`` says which), so a stopped run
    resumes."""
    from rich.console import Console

    from ..batch import make_progress
    from ..pipeline import Editor

    editor = Editor(domain, registry=registry, device=device)
    model = editor.weight_identity(edit=True)
    key = fingerprint({"model": model, "strength": strength,
                       "edits": [(e["input"], e["prompt"]) for e in sel["edits"]]})
    record = root / ".benchmark-edits.json"
    done_before = False
    if record.is_file():
        try:
            done_before = json.loads(record.read_text(encoding="utf-8")).get("key") == key
        except (OSError, ValueError):
            done_before = False
    if not done_before:
        # Edits of another model or selection must not pass for this run's on a resume.
        stale = [Path(e["output"]) for e in sel["edits"] if Path(e["output"]).is_file()]
        if stale and not record.is_file():
            raise UsageError(f"{record.parent} holds images the benchmark did not make "
                             f"(e.g. {stale[0]}): choose another -o")
        for path in stale:
            path.unlink()
        atomic_write_json(record, {"key": key, "model": model, "strength": strength})
    todo = [e for e in sel["edits"] if not (done_before and Path(e["output"]).is_file())]
    log(f"editing {len(todo)} of {len(sel['edits'])} selected inputs "
        f"({len(sel['edits']) - len(todo)} already made)")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for e in todo:
        by_prompt.setdefault(e["prompt"], []).append(e)
    failed = 0
    with make_progress(Console(stderr=True), quiet) as bar:
        task = bar.add_task("editing", total=len(todo))
        for prompt, group in by_prompt.items():
            failed += _edit_group(editor, prompt, group, batch_size, strength, log,
                                  lambda n: bar.advance(task, n))
    return {"edits": "made", "model": model, "strength": strength, "failed_edits": failed}


def _edit_group(editor: Any, prompt: str, group: list[dict[str, Any]], batch_size: int,
                strength: float, log: Callable[[str], None],
                advance: Callable[[int], None]) -> int:
    """The edits of one prompt, in batches; returns how many inputs could not be read."""
    from .. import imaging

    failed = 0
    embedding = editor.embed(prompt)
    for start in range(0, len(group), batch_size):
        chunk, images = [], []
        for e in group[start:start + batch_size]:
            try:
                images.append(imaging.load_image(Path(e["input"])))
                chunk.append(e)
            except Exception as exc:  # noqa: BLE001 - one line, the rest goes on
                failed += 1
                log(f"failed {e['input']}: {exc}")
        if not chunk:
            advance(len(group[start:start + batch_size]))
            continue
        for e, img in zip(chunk, editor.edit(images, embedding, strength=strength).pil(),
                          strict=True):
            imaging.save_image(img, Path(e["output"]))
        advance(len(group[start:start + batch_size]))
    return failed
