"""Training data sets: pairing by name, reported problems, reproducible samples, resumable order."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipinvert.errors import UsageError
from clipinvert.training.data import (
    DATA_FORMATS,
    ImageCaptionDataset,
    ResumableSampler,
    collate,
    detect_format,
    split_validation,
)

SIZE = 16  # decode size for most tests: the pipeline is the same at 256, only slower


def _image(path: Path, shade: int = 0) -> Path:
    """A 12x6 image, dark on the left and bright on the right (so a flip shows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (12, 6), (shade, shade, shade))
    im.paste((255, 255 - shade, 200), (6, 0, 12, 6))
    im.save(path)
    return path


def _text(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _captions(stem: str) -> list[str]:
    return [f"{stem} caption one", f"{stem} caption two", f"{stem} caption three"]


def _by_stem(ds: ImageCaptionDataset) -> dict[str, tuple[str, ...]]:
    return {Path(s.path).name.split(".")[0]: s.captions for s in ds.samples}


def _celeba(root: Path, n: int = 12) -> Path:
    """Stems 0..n-1 (sorted as text: 0, 1, 10, 11, 2, ...), image 5 missing but its caption kept."""
    for i in range(n):
        if i != 5:
            _image(root / "images" / f"{i}.{'jpg' if i % 2 else 'png'}", shade=i * 10)
        _text(root / "celeba-caption" / f"{i}.txt", _captions(str(i)))
    _text(root / "celeba-caption" / "0a.txt", _captions("0a"))  # extra, no image
    return root


def _sidecar(root: Path) -> Path:
    _image(root / "a.png")
    _text(root / "a.txt", _captions("a"))
    _image(root / "sub" / "b.jpg")
    _text(root / "sub" / "b.jpg.txt", _captions("b"))
    _image(root / "c.png")
    _text(root / "c.txt", ["wrong, c.png.txt wins"])
    _text(root / "c.png.txt", _captions("c"))
    return root


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
def test_celeba_pairs_by_name_not_position(tmp_path: Path) -> None:
    warnings: list[str] = []
    ds = ImageCaptionDataset(_celeba(tmp_path / "mm"), "celeba", warn=warnings.append, size=SIZE)
    assert ds.format == "celeba"
    assert len(ds) == 11 and ds.skipped == [] and warnings == []
    for stem, captions in _by_stem(ds).items():
        assert captions == tuple(_captions(stem))
    # one line of the file is drawn per sample
    item = ds[0]
    assert item["caption"] in ds.samples[0].captions


def test_celeba_accepts_original_image_folder_name(tmp_path: Path) -> None:
    _image(tmp_path / "CelebA-HQ-img" / "3.jpg")
    _image(tmp_path / "CelebA-HQ-img" / "12.jpg")
    _text(tmp_path / "celeba-caption" / "3.txt", _captions("3"))
    _text(tmp_path / "celeba-caption" / "12.txt", _captions("12"))
    ds = ImageCaptionDataset(tmp_path, size=SIZE)
    assert ds.format == "celeba"
    assert _by_stem(ds) == {"12": tuple(_captions("12")), "3": tuple(_captions("3"))}


def test_cub_pairs_class_and_name(tmp_path: Path) -> None:
    names = {"001.Albatross": ["Albatross_0002", "Albatross_0010"], "002.Auklet": ["Auklet_0001"]}
    for cls, stems in names.items():
        for stem in stems:
            _image(tmp_path / "images" / cls / f"{stem}.jpg")
            _text(tmp_path / "text_c10" / cls / f"{stem}.txt", _captions(stem))
    _text(tmp_path / "text_c10" / "001.Albatross" / "Albatross_0001.txt", _captions("x"))
    ds = ImageCaptionDataset(tmp_path, "cub", size=SIZE)
    assert len(ds) == 3 and ds.format == "cub"
    for stem, captions in _by_stem(ds).items():
        assert captions == tuple(_captions(stem))


def test_sidecar_both_names_recursive(tmp_path: Path) -> None:
    ds = ImageCaptionDataset(_sidecar(tmp_path), "sidecar", size=SIZE)
    assert _by_stem(ds) == {s: tuple(_captions(s)) for s in "abc"}


def test_jsonl_manifest_relative_absolute_and_file_path(tmp_path: Path) -> None:
    data = tmp_path / "set"
    _image(data / "img" / "x.png")
    absolute = _image(tmp_path / "elsewhere" / "y.jpg")
    lines = [
        {"image": "img/x.png", "captions": _captions("x")},
        {"image": str(absolute), "captions": _captions("y")},
    ]
    manifest = data / "captions.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in lines) + "\n\n", encoding="utf-8")
    ds = ImageCaptionDataset(data, size=SIZE)
    assert ds.format == "jsonl"
    assert _by_stem(ds) == {"x": tuple(_captions("x")), "y": tuple(_captions("y"))}
    # a manifest named directly, anywhere: paths are relative to its own folder
    other = data / "lists" / "train.jsonl"
    other.parent.mkdir()
    other.write_text(json.dumps({"image": "../img/x.png", "captions": ["only"]}) + "\n"
                     + json.dumps({"image": str(absolute), "caption": "single"}) + "\n")
    ds2 = ImageCaptionDataset(other, size=SIZE)
    assert [s.captions for s in ds2.samples] == [("only",), ("single",)]


def test_jsonl_bad_lines_are_skipped_with_their_line(tmp_path: Path) -> None:
    for stem in ("a", "b"):
        _image(tmp_path / f"{stem}.png")
    rows = [
        json.dumps({"image": "a.png", "captions": ["a"]}),
        "{not json",
        json.dumps({"image": "gone.png", "captions": ["g"]}),
        json.dumps({"image": "b.png", "captions": ["b"]}),
        json.dumps({"image": "a.png", "captions": ["  ", ""]}),
        json.dumps(["a list"]),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    warnings: list[str] = []
    ds = ImageCaptionDataset(tmp_path, warn=warnings.append, size=SIZE)
    assert len(ds) == 2 and len(ds.skipped) == 4 and len(warnings) == 4
    manifest = tmp_path / "captions.jsonl"
    assert warnings[0].startswith(f"skipped {manifest} line 2: not valid JSON (")
    assert warnings[1] == f"skipped {tmp_path / 'gone.png'}: image not found ({manifest} line 3)"
    assert warnings[2] == f"skipped {tmp_path / 'a.png'}: empty captions list ({manifest} line 5)"
    assert warnings[3] == f"skipped {manifest} line 6: not a JSON object"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: _celeba(p, 3), "celeba"),
        (_sidecar, "sidecar"),
    ],
)
def test_auto_detection(tmp_path: Path, make, expected: str) -> None:
    make(tmp_path)
    assert detect_format(tmp_path) == expected
    assert ImageCaptionDataset(tmp_path, "auto", size=SIZE).format == expected


def test_auto_detection_cub_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "cub" / "images").mkdir(parents=True)
    (tmp_path / "cub" / "text_c10").mkdir()
    assert detect_format(tmp_path / "cub") == "cub"
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "captions.jsonl").write_text("")
    assert detect_format(tmp_path / "j") == "jsonl"
    assert detect_format(tmp_path / "j" / "captions.jsonl") == "jsonl"
    assert set(DATA_FORMATS) == {"auto", "celeba", "cub", "afhq", "sidecar", "jsonl"}


# --------------------------------------------------------------------------------------------
# Problems: reported by name, counted, never a traceback
# --------------------------------------------------------------------------------------------
def test_missing_empty_and_corrupt_are_reported_and_counted(tmp_path: Path) -> None:
    root = _celeba(tmp_path / "mm", 4)
    _image(root / "images" / "nocap.png")
    _image(root / "images" / "blank.png")
    _text(root / "celeba-caption" / "blank.txt", ["", "   ", ""])
    good = (root / "images" / "0.png").read_bytes()
    (root / "images" / "broken.png").write_bytes(good[: len(good) // 2])
    _text(root / "celeba-caption" / "broken.txt", ["a caption"])
    cut = root / "images" / "cut.jpg"  # a JPEG cut short: its header still parses
    Image.effect_noise((64, 64), 50).convert("RGB").save(cut, quality=90)
    cut.write_bytes(cut.read_bytes()[:-300])
    _text(root / "celeba-caption" / "cut.txt", ["a caption"])
    (root / "images" / "notes.jpg").write_text("this is not a picture\n")
    _text(root / "celeba-caption" / "notes.txt", ["a caption"])

    warnings: list[str] = []
    ds = ImageCaptionDataset(root, warn=warnings.append, size=SIZE)
    assert len(ds) == 4
    imgs, caps = root / "images", root / "celeba-caption"
    assert len(warnings) == 5
    assert warnings[0] == f"skipped {imgs / 'blank.png'}: empty caption file ({caps / 'blank.txt'})"
    assert warnings[1].startswith(f"skipped {imgs / 'broken.png'}: truncated or corrupt image (")
    cut_line = f"skipped {imgs / 'cut.jpg'}: truncated or corrupt image (decoding failed)"
    assert warnings[2] == cut_line
    assert warnings[3] == f"skipped {imgs / 'nocap.png'}: no caption file ({caps / 'nocap.txt'})"
    assert warnings[4] == f"skipped {imgs / 'notes.jpg'}: not an image file (contents are text)"
    assert [(p.name, r.split(" (")[0]) for p, r in ds.skipped] == [
        ("blank.png", "empty caption file"),
        ("broken.png", "truncated or corrupt image"),
        ("cut.jpg", "truncated or corrupt image"),
        ("nocap.png", "no caption file"),
        ("notes.jpg", "not an image file"),
    ]
    assert all("\n" not in line for line in warnings)


def test_sidecar_missing_caption_wording(tmp_path: Path) -> None:
    _sidecar(tmp_path)
    _image(tmp_path / "sub" / "d.png")
    warnings: list[str] = []
    ds = ImageCaptionDataset(tmp_path, warn=warnings.append, size=SIZE)
    assert len(ds) == 3
    assert warnings == [
        f"skipped {tmp_path / 'sub' / 'd.png'}: no caption file (d.txt or d.png.txt beside it)"
    ]


def _one_line_usage_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UsageError, match=match) as info:
        ImageCaptionDataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


def test_unusable_sets_are_one_line_usage_errors(tmp_path: Path) -> None:
    _one_line_usage_error("data folder not found", tmp_path / "nope")
    _one_line_usage_error("unknown data format 'coco'", tmp_path, "coco")
    # nothing to go on
    _one_line_usage_error("cannot tell the layout", tmp_path)
    # only images, no captions at all (explicit sidecar)
    _image(tmp_path / "only" / "a.png")
    warnings: list[str] = []
    msg = _one_line_usage_error(
        "no usable image-caption pairs", tmp_path / "only", "sidecar", warn=warnings.append
    )
    assert "1 skipped" in msg and len(warnings) == 1
    # one usable pair is too few to train
    _text(tmp_path / "only" / "a.txt", ["a"])
    _one_line_usage_error("only 1 usable image-caption pair in .* at least 2", tmp_path / "only")
    assert len(ImageCaptionDataset(tmp_path / "only", min_samples=1, size=SIZE)) == 1
    # a layout named explicitly that is not there
    _one_line_usage_error("is not a Multi-Modal CelebA-HQ folder", tmp_path / "only", "celeba")
    _one_line_usage_error("no caption manifest", tmp_path / "only", "jsonl")
    (tmp_path / "file.png").write_bytes(b"x")
    _one_line_usage_error("must be a folder or a .jsonl manifest", tmp_path / "file.png")


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------
def test_getitem_shape_range_and_default_size(tmp_path: Path) -> None:
    ds = ImageCaptionDataset(_sidecar(tmp_path))
    item = ds[1]
    assert set(item) == {"image", "caption", "index", "path"}
    assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["index"] == 1 and item["path"] == str(ds.samples[1].path)
    assert Path(item["path"]).is_absolute()


def test_getitem_is_deterministic_per_seed_epoch_index(tmp_path: Path) -> None:
    root = _celeba(tmp_path, 12)
    a = ImageCaptionDataset(root, seed=7, size=SIZE)
    b = ImageCaptionDataset(root, seed=7, size=SIZE)
    torch.manual_seed(0)
    first = [a[i] for i in range(len(a))]
    torch.manual_seed(123)  # global RNG state plays no part
    torch.rand(5)
    b.set_epoch(0)
    second = [b[i] for i in range(len(b) - 1, -1, -1)][::-1]  # any order of access
    for x, y in zip(first, second, strict=True):
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
    # (epoch, index) keys give the same as set_epoch
    a.set_epoch(3)
    assert a[4]["caption"] == b[(3, 4)]["caption"]
    assert torch.equal(a[4]["image"], b[(3, 4)]["image"])

    # across epochs both draws change for some samples
    draws = [[a.draws(i, epoch) for i in range(len(a))] for epoch in range(4)]
    assert len({tuple(c for c, _ in d) for d in draws}) > 1
    assert len({tuple(f for _, f in d) for d in draws}) > 1
    flips = [f for d in draws for _, f in d]
    assert 0 < sum(flips) < len(flips)
    # a different seed gives different draws
    c = ImageCaptionDataset(root, seed=8, size=SIZE)
    assert [c.draws(i, 0) for i in range(len(c))] != draws[0]


def test_flip_is_a_mirror_and_can_be_disabled(tmp_path: Path) -> None:
    root = _celeba(tmp_path, 12)
    ds = ImageCaptionDataset(root, seed=1, size=SIZE)
    plain = ImageCaptionDataset(root, seed=1, size=SIZE, flip=False)
    seen = set()
    for epoch in range(3):
        for i in range(len(ds)):
            choice, flipped = ds.draws(i, epoch)
            assert plain.draws(i, epoch) == (choice, False)  # same caption with or without flip
            x, y = ds[(epoch, i)]["image"], plain[(epoch, i)]["image"]
            assert torch.equal(x, y.flip(2) if flipped else y)
            assert y[:, :, 0].mean() < y[:, :, -1].mean()  # never mirrored: dark side left
            seen.add(flipped)
    assert seen == {True, False}


def test_decode_failure_after_scan_is_returned_not_raised(tmp_path: Path) -> None:
    root = _celeba(tmp_path, 4)
    ds = ImageCaptionDataset(root, size=SIZE)
    victim = ds.samples[2].path
    victim.write_bytes(victim.read_bytes()[:40])  # cut after the scan
    item = ds[2]
    assert item["image"] is None and item["error"].startswith("truncated or corrupt image")
    batch = collate([ds[0], item, ds[1]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert batch["index"].tolist() == [0, 1]
    assert batch["failed"] == [(str(victim), item["error"])]
    assert collate([item])["image"].shape[0] == 0


def test_collate(tmp_path: Path) -> None:
    ds = ImageCaptionDataset(_sidecar(tmp_path), size=SIZE)
    batch = collate([ds[2], ds[0]])
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["image"][0], ds[2]["image"])
    assert batch["caption"] == [ds[2]["caption"], ds[0]["caption"]]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [2, 0]
    assert batch["path"] == [ds[2]["path"], ds[0]["path"]] and batch["failed"] == []


def test_workers_see_the_same_samples(tmp_path: Path) -> None:
    ds = ImageCaptionDataset(_celeba(tmp_path, 6), seed=3, size=SIZE, warn=lambda s: None)
    pickle.dumps(ds)  # a lambda callback does not stop spawned workers
    ds.set_epoch(2)
    sampler = ResumableSampler(len(ds), seed=3)
    sampler.set_epoch(2)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=2,
        multiprocessing_context="fork",
    )
    got = torch.cat([b["image"] for b in loader])
    want = torch.stack([ds[i]["image"] for i in sampler.indices(2)])
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------------------------
def test_split_is_fixed_by_seed(tmp_path: Path) -> None:
    ds = ImageCaptionDataset(_celeba(tmp_path, 21), size=SIZE)  # 20 images
    names = lambda d: [s.name for s in d.samples]  # noqa: E731
    train, val = split_validation(ds, 0.25, seed=5)
    again_train, again_val = split_validation(ds, 0.25, seed=5)
    assert names(train) == names(again_train) and names(val) == names(again_val)
    assert len(val) == 5 and len(train) == 15
    assert sorted(names(train) + names(val)) == sorted(names(ds))
    assert names(split_validation(ds, 0.25, seed=6)[1]) != names(val)
    assert train.skipped == [] and val.seed == ds.seed and val.size == ds.size
    # at least one sample on each side
    two = ds.subset([0, 1])
    assert [len(d) for d in split_validation(two, 0.01, 0)] == [1, 1]
    assert [len(d) for d in split_validation(two, 0.99, 0)] == [1, 1]
    with pytest.raises(UsageError, match="between 0 and 1"):
        split_validation(ds, 1.0, 0)
    with pytest.raises(UsageError, match="cannot hold out"):
        split_validation(ds.subset([0]), 0.5, 0)


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------
def test_sampler_order_by_seed_and_epoch() -> None:
    s = ResumableSampler(10, seed=1)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and len(s) == 10
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e1) == list(range(10)) and e1 != e0
    assert ResumableSampler(10, seed=1).indices(1) == e1
    assert ResumableSampler(10, seed=2).indices(0) != e0
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    assert list(s) == []  # the epoch is used up until set_epoch moves on


@pytest.mark.parametrize("k", [0, 3, 7, 10])
def test_sampler_resumes_exactly(k: int) -> None:
    uninterrupted = []
    ref = ResumableSampler(10, seed=4)
    for epoch in range(3):
        ref.set_epoch(epoch)
        uninterrupted.extend(ref)

    first = ResumableSampler(10, seed=4)
    first.set_epoch(1)
    it = iter(first)
    consumed = [next(it) for _ in range(k)]
    next(it, None)  # fetched ahead (a DataLoader prefetching) but never trained on
    state = first.state_dict(position=k)
    assert state["epoch"] == 1 and state["position"] == k

    resumed = ResumableSampler(10, seed=4)
    resumed.load_state_dict(state)
    rest = []
    for epoch in range(1, 3):
        resumed.set_epoch(epoch)  # the resumed epoch keeps its position
        rest.extend(resumed)
    assert uninterrupted[:10] + consumed + rest == uninterrupted
    assert first.state_dict()["position"] == min(k + 1, 10)  # default: what was yielded


def test_sampler_state_must_match() -> None:
    state = ResumableSampler(10, seed=4, world_size=2).state_dict()
    for other in (ResumableSampler(11, seed=4, world_size=2), ResumableSampler(10, seed=5,
                  world_size=2), ResumableSampler(10, seed=4, world_size=4)):
        with pytest.raises(UsageError, match="cannot resume the sample order"):
            other.load_state_dict(state)
    with pytest.raises(UsageError, match="incomplete"):
        ResumableSampler(10).load_state_dict({})


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 3, True), (10, 3, False), (8, 4, True)])
def test_ranks_partition_the_data(n: int, world: int, drop_last: bool) -> None:
    ranks = [ResumableSampler(n, seed=9, rank=r, world_size=world, drop_last=drop_last)
             for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    flat = [i for p in per_rank for i in p]
    single = ResumableSampler(n, seed=9).indices()
    if drop_last:
        assert len(flat) == len(set(flat)) == (n // world) * world
        assert sorted(flat) == sorted(single[: len(flat)])
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    # rank r takes every world-th sample of the same epoch order
    for r, p in enumerate(per_rank):
        padded = (single * 2)[: len(flat)]
        assert p == padded[r::world]


def test_images_only_reads_every_layout_without_captions(tmp_path: Path) -> None:
    """The e4e stage's data: bare images and a manifest without captions train; the draws
    (flips) and the order are those of the captioned set, and captions are never read."""
    import numpy as np

    bare = tmp_path / "bare"
    (bare / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", "sub/c.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(bare / name)
    with pytest.raises(UsageError, match="cannot tell the layout"):
        ImageCaptionDataset(bare)  # captions required: refused as before
    ds = ImageCaptionDataset(bare, images_only=True, size=16, seed=4)
    assert sorted(Path(s.name).relative_to(bare).as_posix() for s in ds.samples) == names
    assert ds.skipped == [] and {ds[i]["caption"] for i in range(3)} == {""}
    # the same images with captions (one an empty caption file): same samples, same flips
    captioned = tmp_path / "captioned"
    captioned.mkdir()
    for i, name in enumerate(names):
        Image.open(bare / name).save(captioned / f"{i}.png")
        (captioned / f"{i}.txt").write_text("" if i == 0 else "a caption\n")
    both = ImageCaptionDataset(captioned, images_only=True, size=16, seed=4)
    assert len(both) == 3 and both.skipped == []  # the empty caption file is not read
    assert [both.draws(i, 2)[1] for i in range(3)] == [ds.draws(i, 2)[1] for i in range(3)]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(bare / n)}) + "\n" for n in names))
    assert len(ImageCaptionDataset(manifest, images_only=True)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no usable images in"):
        ImageCaptionDataset(tmp_path / "empty", images_only=True)
