"""The paper's data read as the paper read it: AFHQ-Cat and CUB-200-2011 on tiny fakes of their
real layouts (file formats as downloaded), their splits, CUB's bird crops and attributes, and the
one resize policy that train, edit and eval share."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipinvert.errors import UsageError
from clipinvert.training.data import (
    ImageCaptionDataset,
    cub_crop_box,
    detect_format,
    find_afhq,
    read_name_list,
)

SIZE = 16


def _noise(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random-pixel image: any crop or resize difference changes its tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    Image.fromarray(arr.numpy(), "RGB").save(path)
    return path


# --------------------------------------------------------------------------------------------
# AFHQ
# --------------------------------------------------------------------------------------------
def _afhq(root: Path) -> Path:
    """afhq/{train,val}/{cat,dog}: cats 3 train + 2 val, a dog; one caption manifest at the root
    (as `clipinvert caption` writes it: paths relative to its own folder), missing one cat."""
    for split, names in (("train", ["flickr_cat_000002", "flickr_cat_000003", "pixabay_cat_1"]),
                         ("val", ["flickr_cat_000008", "pixabay_cat_0004"])):
        for i, name in enumerate(names):
            _noise(root / split / "cat" / f"{name}.jpg", (12, 12), seed=i)
    _noise(root / "train" / "dog" / "flickr_dog_000001.jpg", (12, 12))
    lines = [{"image": f"{split}/cat/{name}.jpg", "captions": [f"{name} one", f"{name} two"]}
             for split, name in (("train", "flickr_cat_000002"), ("train", "flickr_cat_000003"),
                                 ("val", "flickr_cat_000008"), ("val", "pixabay_cat_0004"))]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def test_afhq_root_and_image_folder_pick_the_split(tmp_path: Path) -> None:
    afhq = _afhq(tmp_path / "afhq")
    assert detect_format(afhq) == "afhq"
    assert detect_format(afhq / "train" / "cat") == "afhq"
    assert find_afhq(afhq, "test") == (afhq, [afhq / "val" / "cat"])
    lines: list[str] = []
    train = ImageCaptionDataset(afhq, split="train", size=SIZE, warn=lines.append)
    assert train.format == "afhq" and train.split == "train"
    assert sorted(Path(s.path).stem for s in train.samples) == ["flickr_cat_000002",
                                                               "flickr_cat_000003"]
    assert train.samples[0].captions == ("flickr_cat_000002 one", "flickr_cat_000002 two")
    # the cat without captions is one line, skipped and counted; the dog is never looked at
    assert [str(p) for p, _ in train.skipped] == [str(afhq / "train/cat/pixabay_cat_1.jpg")]
    assert lines == [f"skipped {afhq / 'train/cat/pixabay_cat_1.jpg'}: no captions in "
                     f"{afhq / 'captions.jsonl'}"]
    # test = AFHQ's val/; given the train folder itself, --split test swaps it
    for data in (afhq, afhq / "train" / "cat"):
        test = ImageCaptionDataset(data, split="test", size=SIZE)
        assert sorted(Path(s.path).stem for s in test.samples) == ["flickr_cat_000008",
                                                                  "pixabay_cat_0004"]
    assert len(ImageCaptionDataset(afhq, size=SIZE)) == 4  # all: both splits
    assert len(ImageCaptionDataset(afhq / "val" / "cat", size=SIZE)) == 2  # the folder given
    assert ImageCaptionDataset(afhq, split="test", size=SIZE)[0]["image"].shape == (3, SIZE,
                                                                                    SIZE)


def test_afhq_captions_from_another_manifest_and_v2_test_folder(tmp_path: Path) -> None:
    afhq = tmp_path / "afhq"
    for split in ("train", "test"):  # AFHQ v2 names its test split test/
        _noise(afhq / split / "cat" / "a.png", (8, 8))
        _noise(afhq / split / "cat" / "b.png", (8, 8))
    manifest = tmp_path / "elsewhere" / "caps.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps({"image": str(afhq / "test" / "cat" / f"{n}.png"),
                                            "captions": ["a cat"]}) + "\n" for n in "ab"))
    with pytest.raises(UsageError, match="no captions for .*train/cat: expected captions.jsonl"):
        ImageCaptionDataset(afhq, split="train", size=SIZE)
    ds = ImageCaptionDataset(afhq, split="test", captions=manifest, size=SIZE)
    assert [Path(s.path).name for s in ds.samples] == ["a.png", "b.png"]
    with pytest.raises(UsageError, match="--captions .*not found"):
        ImageCaptionDataset(afhq, captions=tmp_path / "none.jsonl")


def test_split_refused_where_the_data_has_none(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(json.dumps({"image": "a.png", "captions": ["x"]}) + "\n")
    with pytest.raises(UsageError, match="--split test: a JSONL manifest has no split of its"):
        ImageCaptionDataset(manifest, split="test")
    with pytest.raises(UsageError, match="unknown split 'val'"):
        ImageCaptionDataset(manifest, split="val")
    with pytest.raises(UsageError, match="unknown resize policy 'fill'"):
        ImageCaptionDataset(manifest, resize="fill")


# --------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------
CUB_IMAGES = [  # id, class/name, (width, height), box x y w h as bounding_boxes.txt writes it
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18", (40, 30),
     ("10.0", "5.0", "12.0", "8.0")),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34", (30, 40),
     ("2.0", "20.0", "6.0", "16.0")),
    (3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027", (32, 32),
     ("0.0", "0.0", "32.0", "32.0")),
    (4, "002.Laysan_Albatross/Laysan_Albatross_0003_1033", (36, 24),
     ("12.0", "4.0", "10.0", "10.0")),
]
ATTRIBUTE_NAMES = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::hooked_seabird",
                   "has_wing_color::blue", "has_wing_color::grey",
                   "has_head_pattern::unique_pattern"]


def _cub(birds: Path) -> Path:
    """AttnGAN's birds/ folder: CUB_200_2011/ as downloaded (images/, images.txt,
    bounding_boxes.txt, train_test_split.txt, classes.txt, image_class_labels.txt,
    attributes/image_attribute_labels.txt, attributes.txt one level up as in the download),
    text/ captions beside it, train|test/filenames.pickle (protocol 2, plain str lists)."""
    cub = birds / "CUB_200_2011"
    for i, name, size, _ in CUB_IMAGES:
        _noise(cub / "images" / f"{name}.jpg", size, seed=i)
        caption = birds / "text" / f"{name}.txt"
        caption.parent.mkdir(parents=True, exist_ok=True)
        caption.write_text(f"this bird {i} is white\nthis bird {i} has a long bill\n\n")
    (cub / "images.txt").write_text("".join(f"{i} {n}.jpg\n" for i, n, _, _ in CUB_IMAGES))
    (cub / "bounding_boxes.txt").write_text(
        "".join(f"{i} {' '.join(box)}\n" for i, _, _, box in CUB_IMAGES))
    (cub / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (cub / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n")
    (birds / "attributes.txt").write_text(
        "".join(f"{k} {n}\n" for k, n in enumerate(ATTRIBUTE_NAMES, 1)))
    labels = []
    for i in range(1, 5):
        for k in range(1, len(ATTRIBUTE_NAMES) + 1):
            present = int((i, k) in {(1, 1), (1, 3), (2, 2), (2, 5), (3, 4)})
            labels.append(f"{i} {k} {present} 3 12.5")
    labels[7] = "2 3 0 1 0 4.3280"  # some lines of the real file carry an extra field
    labels.append("garbage")
    (cub / "attributes").mkdir()
    (cub / "attributes" / "image_attribute_labels.txt").write_text("\n".join(labels) + "\n")
    # AttnGAN's split by species: albatross 001 trains, 002 tests
    for split, ids in (("train", (1, 2)), ("test", (3, 4))):
        (birds / split).mkdir()
        names = [n for i, n, _, _ in CUB_IMAGES if i in ids]
        (birds / split / "filenames.pickle").write_bytes(pickle.dumps(names, protocol=2))
    return birds


def test_cub_crop_is_attngans_box_arithmetic() -> None:
    # box (10, 5, 12, 8) in 40x30: r = int(12 * .75) = 9, centre (16, 9) → x 7..25, y 0..18
    assert cub_crop_box((10, 5, 12, 8), 40, 30) == (7, 0, 25, 18)
    # a box well inside: a square of side 2r = 1.5x the longer side
    assert cub_crop_box((40, 40, 20, 10), 200, 200) == (35, 30, 65, 60)
    # the whole image: clipped to it on every side
    assert cub_crop_box((0, 0, 32, 32), 32, 32) == (0, 0, 32, 32)
    # odd sizes: the centre and r truncate as int() does
    # (3, 3, 5, 7): r = int(5.25) = 5, centre (int(5.5), int(6.5)) = (5, 6)
    assert cub_crop_box((3, 3, 5, 7), 100, 100) == (0, 1, 10, 11)


def test_cub_attngan_layout_split_crops_and_captions(tmp_path: Path) -> None:
    birds = _cub(tmp_path / "birds")
    assert detect_format(birds) == "cub"
    (birds / "train" / "images").mkdir()  # an AttnGAN fork's birds/train/{images,text}/
    (birds / "train" / "text").mkdir()
    (birds / "test" / "images").mkdir()
    assert detect_format(birds) == "cub"  # train/ + test/ beside CUB_200_2011/: not AFHQ
    every = ImageCaptionDataset(birds, size=SIZE)
    assert len(every) == 4
    by_name = {Path(s.path).stem: s for s in every.samples}
    albatross = by_name["Black_Footed_Albatross_0046_18"]
    assert albatross.captions == ("this bird 1 is white", "this bird 1 has a long bill")
    assert albatross.box == (10, 5, 12, 8)
    train = ImageCaptionDataset(birds, split="train", size=SIZE)
    test = ImageCaptionDataset(birds, split="test", size=SIZE)
    assert sorted(Path(s.path).stem for s in train.samples) == [
        "Black_Footed_Albatross_0009_34", "Black_Footed_Albatross_0046_18"]
    assert sorted(Path(s.path).stem for s in test.samples) == [
        "Laysan_Albatross_0002_1027", "Laysan_Albatross_0003_1033"]
    # what a sample holds: the AttnGAN crop, squared by the policy, then the one resize
    ds = ImageCaptionDataset(birds, split="train", size=SIZE, flip=False, resize="center-crop")
    i = [Path(s.path).stem for s in ds.samples].index("Black_Footed_Albatross_0046_18")
    photo = Image.open(albatross.path).convert("RGB")
    crop = photo.crop((7, 0, 25, 18))  # 18x18: already square
    from clipinvert.imaging import to_tensor

    assert torch.equal(ds[i]["image"], to_tensor([crop], SIZE)[0])


def test_cub_download_alone_uses_its_own_split_with_a_note(tmp_path: Path) -> None:
    birds = _cub(tmp_path / "birds")
    for split in ("train", "test"):
        (birds / split / "filenames.pickle").unlink()
    notes: list[str] = []
    test = ImageCaptionDataset(birds / "CUB_200_2011", split="test", size=SIZE,
                               captions=birds / "text", warn=notes.append)
    assert sorted(Path(s.path).stem for s in test.samples) == [
        "Black_Footed_Albatross_0009_34", "Laysan_Albatross_0003_1033"]  # ids 2, 4
    assert len(notes) == 1 and "CUB's own split by image" in notes[0]


def test_cub_without_boxes_and_a_bird_without_one(tmp_path: Path) -> None:
    birds = _cub(tmp_path / "birds")
    boxes = birds / "CUB_200_2011" / "bounding_boxes.txt"
    boxes.write_text("1 10 5 12 8\n2 oops\n3 0 0 32 32\n4 12 4 10 10\n")
    lines: list[str] = []
    ds = ImageCaptionDataset(birds, size=SIZE, warn=lines.append)
    assert len(ds) == 3 and len(ds.skipped) == 1
    assert lines == [f"skipped {birds}/CUB_200_2011/images/001.Black_footed_Albatross/"
                     "Black_Footed_Albatross_0009_34.jpg: no bounding box in bounding_boxes.txt"]
    boxes.unlink()
    lines.clear()
    ds = ImageCaptionDataset(birds, size=SIZE, warn=lines.append)
    assert len(ds) == 4 and all(s.box is None for s in ds.samples)
    assert lines[0].startswith("note: no bounding_boxes.txt") and len(lines) == 1


def test_split_lists_refuse_a_pickle_that_asks_for_a_class(tmp_path: Path) -> None:
    birds = _cub(tmp_path / "birds")
    assert read_name_list(birds / "test" / "filenames.pickle") == {
        n for i, n, _, _ in CUB_IMAGES if i in (3, 4)}
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # unpickling would create the marker file
            return (open, (str(marker), "w"))

    (birds / "train" / "filenames.pickle").write_bytes(pickle.dumps([Evil()], protocol=2))
    with pytest.raises(UsageError, match="the train list .*: it names .*open, not a list"):
        ImageCaptionDataset(birds, split="train", size=SIZE)
    assert not marker.exists()


def test_celeba_split_from_its_filenames_pickle(tmp_path: Path) -> None:
    root = tmp_path / "mm"
    for i in range(4):
        _noise(root / "images" / f"{i}.jpg", (8, 8), seed=i)
        (root / "celeba-caption").mkdir(parents=True, exist_ok=True)
        (root / "celeba-caption" / f"{i}.txt").write_text("a face\n")
    with pytest.raises(UsageError, match="test/filenames.pickle not found"):
        ImageCaptionDataset(root, split="test", size=SIZE)
    (root / "test").mkdir()
    (root / "test" / "filenames.pickle").write_bytes(pickle.dumps(["1", "3"], protocol=2))
    ds = ImageCaptionDataset(root, split="test", size=SIZE)
    assert [Path(s.path).name for s in ds.samples] == ["1.jpg", "3.jpg"]


# --------------------------------------------------------------------------------------------
# The resize policy
# --------------------------------------------------------------------------------------------
def test_fit_square_policies() -> None:
    from clipinvert.imaging import fit_square

    wide = Image.new("RGB", (10, 4), (200, 10, 10))
    assert fit_square(wide, "stretch") is wide
    crop = fit_square(wide, "center-crop")
    assert crop.size == (4, 4)
    tall = Image.new("RGB", (3, 8))
    tall.putpixel((1, 2), (255, 255, 255))
    assert fit_square(tall, "center-crop").getpixel((1, 0)) == (255, 255, 255)  # top = (8-3)//2
    padded = fit_square(wide, "pad")
    assert padded.size == (10, 10)
    assert padded.getpixel((0, 2)) == (0, 0, 0) and padded.getpixel((0, 3)) == (200, 10, 10)
    with pytest.raises(ValueError, match="unknown resize policy"):
        fit_square(wide, "fill")


@pytest.mark.parametrize("policy", ["stretch", "center-crop", "pad"])
def test_train_edit_and_eval_see_the_same_tensor(tmp_path: Path, policy: str) -> None:
    """One non-square photo on a domain with `resize = policy`: the training sample, what
    `edit` hands the encoder and the input `eval benchmark` edits and scores are one tensor."""
    from clipinvert.batch import PrepareOptions, RunOptions, prepare
    from clipinvert.evaluation.benchmark import prepared_inputs
    from clipinvert.imaging import load_image, to_tensor
    from clipinvert.jobs import with_domain_resize
    from clipinvert.pipeline import Editor
    from clipinvert.registry import Registry

    photo = _noise(tmp_path / "set" / "bird.png", (37, 23))
    (tmp_path / "set" / "bird.txt").write_text("a bird\n")
    reg = Registry()
    reg.add_mapping({"domains": {"d": {"resolution": 256, "align": "none", "resize": policy}}},
                    tmp_path / "models.toml")
    editor = Editor("d", registry=reg, device="cpu")
    size = editor.input_size

    train = ImageCaptionDataset(tmp_path / "set", "sidecar", size=size, flip=False,
                                resize=reg.domain("d").resize, min_samples=1)[0]["image"]

    opts = with_domain_resize(RunOptions(output=tmp_path / "out"), editor)
    assert opts.prepare.resize == policy
    crop = prepare(photo, Path("bird"), opts.prepare).crops[0].image
    edit = editor.preprocess([crop])[0].float()

    made = prepared_inputs([(photo, None)], tmp_path / "bench", policy)
    scored = to_tensor([load_image(made[0])], size)[0]

    assert torch.equal(train, edit) and torch.equal(train, scored)
    if policy != "stretch":
        assert made[0] != photo  # the square was written for the edits and the scores
        assert not torch.equal(train, to_tensor([load_image(photo)], size)[0])  # not squashed
    assert PrepareOptions().resize == "stretch"


def test_registry_reads_a_domains_resize(tmp_path: Path) -> None:
    from clipinvert.registry import Registry

    reg = Registry()
    reg.add_mapping({"domains": {"cats": {"resolution": 512, "resize": "center-crop"},
                                 "faces": {"resolution": 1024, "align": "ffhq"}}},
                    tmp_path / "models.toml")
    assert reg.domain("cats").resize == "center-crop"
    assert reg.domain("faces").resize == "stretch"  # the default: what edit always did
    with pytest.raises(UsageError, match="domain birds: resize must be one of stretch, "
                                         "center-crop, pad, not 'crop'"):
        reg.add_mapping({"domains": {"birds": {"resolution": 256, "resize": "crop"}}},
                        tmp_path / "models.toml")


# --------------------------------------------------------------------------------------------
# eval benchmark on birds and cats
# --------------------------------------------------------------------------------------------
def test_cub_attribute_names_as_the_protocol_names_them() -> None:
    from clipinvert.evaluation.benchmark import cub_attribute
    from clipinvert.evaluation.protocol import ZERO_SHOT

    assert cub_attribute("has_wing_color::blue") == "wing_color:blue"
    assert cub_attribute("has_bill_shape::curved_(up_or_down)") == "bill_shape:curved"
    assert cub_attribute("has_bill_shape::hooked_seabird") == "bill_shape:hooked seabird"
    assert cub_attribute("has_head_pattern::unique_pattern") == "head_pattern:unique pattern"
    for raw in ATTRIBUTE_NAMES:  # every name of the fake is one the birds protocol knows
        ZERO_SHOT["birds"].attribute(cub_attribute(raw))


def test_birds_benchmark_reads_attributes_split_and_crops(tmp_path: Path) -> None:
    from clipinvert.evaluation.benchmark import read_labelled, run_benchmark

    birds = _cub(tmp_path / "birds")
    notes: list[str] = []
    items = read_labelled(birds, split="test", log=notes.append)
    assert [(i.name, sorted(i.attributes), i.box) for i in items] == [
        ("Laysan_Albatross_0002_1027.jpg", ["wing_color:grey"], (0, 0, 32, 32)),
        ("Laysan_Albatross_0003_1033.jpg", [], (12, 4, 10, 10))]
    assert notes == [f"note: 1 line(s) of {birds}/CUB_200_2011/{'attributes'}/"
                     "image_attribute_labels.txt unreadable, left out (first: line 21)"]
    every = {i.name: i.attributes for i in read_labelled(birds, log=notes.append)}
    # the 6-field line (image 2, attribute 3) still counts: absent
    assert every["Black_Footed_Albatross_0009_34.jpg"] == {"bill_shape:hooked seabird",
                                                            "head_pattern:unique pattern"}
    assert every["Black_Footed_Albatross_0046_18.jpg"] == {"bill_shape:curved",
                                                            "wing_color:blue"}

    seen: dict[str, object] = {}

    def score(manifest: Path, output: Path, **kw: object) -> dict[str, object]:
        seen["lines"] = [json.loads(x) for x in manifest.read_text().splitlines()]
        return {"ok": True}

    from clipinvert.registry import Registry

    reg = Registry()
    reg.add_mapping({"domains": {"birds": {"resolution": 256, "resize": "center-crop"}}},
                    tmp_path / "models.toml")
    out = tmp_path / "bench"
    run_benchmark(birds, out, domain="birds", registry=reg, per_target=1, split="test",
                  edits=tmp_path / "theirs", evaluate=score, log=notes.append)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["split"] == "test"
    grey = [e for e in selection["edits"] if e["target"] == "wing_color:grey"]
    assert [Path(e["source"]).name for e in grey] == ["Laysan_Albatross_0003_1033.jpg"]
    # the input edited and scored is the bird's crop, squared: (12,4,10,10) in 36x24 →
    # r 7, centre (17, 9) → x 10..24, y 2..16: 14x14
    square = Image.open(grey[0]["input"])
    photo = Image.open(grey[0]["source"]).convert("RGB")
    assert square.size == (14, 14)
    assert square.tobytes() == photo.crop((10, 2, 24, 16)).tobytes()
    assert {Path(x["input"]).parent for x in seen["lines"]} == {Path("inputs")}


def test_cats_benchmark_draws_from_afhq_val(tmp_path: Path) -> None:
    from clipinvert.evaluation.benchmark import read_labelled, select

    afhq = _afhq(tmp_path / "afhq")
    items = read_labelled(afhq, split="test")
    assert sorted(i.name for i in items) == ["flickr_cat_000008.jpg", "pixabay_cat_0004.jpg"]
    assert all(not i.attributes and i.box is None for i in items)
    picked = select(items, "cats", per_target=5, seed=0, gendered=False)
    assert picked["short"]["mood:happy"] == 2  # only 500 in the real val/: every one lacks it
    assert {Path(e["input"]).parent for e in picked["edits"]} == {afhq / "val" / "cat"}


def test_eval_metrics_squares_an_edit_folders_inputs_as_the_run_did(tmp_path: Path) -> None:
    """A folder `invert`/`edit` made on a center-crop domain: its report names the policy, and
    `eval metrics` scores each output against the input squared that way (not squashed, and not
    refused as a different shape)."""
    from clipinvert.batch import PrepareOptions, RunOptions, run_folder
    from clipinvert.evaluation.pairs import read_pairs
    from clipinvert.evaluation.score import read_pair

    photos = tmp_path / "photos"
    _noise(photos / "wide.png", (30, 18), seed=1)
    _noise(photos / "square.png", (16, 16), seed=2)
    out = tmp_path / "out"

    def outputs_for(crop) -> list[Path]:
        return [out / f"{crop.rel}.png"]

    def process(crops, owners) -> list[list[Path]]:  # the identity "model": saves what it saw
        for crop in crops:
            crop.image.save(out / f"{crop.rel}.png")
        return [outputs_for(c) for c in crops]

    opts = RunOptions(output=out, quiet=True, prepare=PrepareOptions(resize="center-crop"))
    assert run_folder("invert", photos, opts, {}, outputs_for, process).exit_code == 0
    assert json.loads((out / "clipinvert-report.json").read_text())["resize"] == "center-crop"
    pairs = read_pairs(out)
    assert len(pairs) == 2 and {p.resize for p in pairs.pairs} == {"center-crop"}
    for pair in pairs.pairs:
        source, output = read_pair(pair)
        assert source.size == output.size and source.tobytes() == output.tobytes()
