"""`clipinvert caption`: vocabularies, zero-shot labels and sentences, the three outputs (read
back by train's and the benchmark's own readers), resume, own captions, bad inputs."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipinvert.captioning import CaptionOutputs, caption_folder, chosen_labels, distribution
from clipinvert.cli import main
from clipinvert.errors import UsageError
from clipinvert.evaluation import protocol
from clipinvert.evaluation.benchmark import read_labelled
from clipinvert.fileio import read_toml
from clipinvert.training.data import ImageCaptionDataset
from clipinvert.vocabulary import (
    PACKAGED_DIR,
    join_phrases,
    load_vocabulary,
    parse_vocabulary,
)

CATS = load_vocabulary("cats")


def _png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
            for p in folder.rglob("*")}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- vocabularies ------------------------------------------------------------------------------
def test_the_packaged_vocabularies_are_the_protocols_single_source() -> None:
    birds = load_vocabulary("birds")
    assert sum(len(g.classes) for g in CATS.groups) == 30 and len(CATS.evaluated) == 30
    assert len(birds.evaluated) == 40
    assert protocol.CATS.categories == {g.name: g.classes for g in CATS.groups}
    assert protocol.CATS.captions("colour") == CATS.group("colour").prompts()
    assert protocol.BIRDS.evaluated == birds.evaluated
    assert protocol.BIRDS.prompt("bill_shape:cone") == "This bird has a cone shaped bill."


def test_sentences_name_the_labels_reproducibly() -> None:
    labels = {"breed": "Abyssinian", "colour": "grey", "mood": "happy"}
    first = CATS.sentences(labels, "a/1.png")
    assert first[0] == "This cat is an Abyssinian, has grey fur and looks happy."
    assert first == CATS.sentences(labels, "a/1.png")  # seeded by the name alone
    assert len(first) == len(set(first)) == CATS.captions_per_image
    phrases = {"is an Abyssinian", "has grey fur", "looks happy"}
    for sentence in first:  # every sentence names labels of this image only
        assert any(sentence.startswith(t.split("{")[0]) for t in CATS.templates)
        assert any(p in sentence for p in phrases)
        assert "young" not in sentence and "old" not in sentence
    # One label: only len(templates) different sentences exist; the draw stops there.
    assert sorted(CATS.sentences({"age": "old"}, "x")) == sorted(
        t.format(phrases="is old") for t in CATS.templates)
    assert CATS.sentences({}, "x") == []
    assert join_phrases(["a", "b", "c"]) == "a, b and c" and join_phrases(["a"]) == "a"


def test_thresholds_decide_which_labels_are_kept() -> None:
    scores = {"breed": ("Persian", 0.49), "colour": ("grey", 0.5), "mood": ("sad", 0.9),
              "age": ("old", 0.69)}
    assert chosen_labels(CATS, scores) == {"colour": "grey", "mood": "sad"}  # age needs 0.7


MALFORMED = [
    ('name = "x"\ntemplates = [', "not valid TOML"),
    ('templates = ["A {phrases}."]\n[groups.g]\nclasses = ["a", "b"]\nphrase = "is {}"\n',
     "[groups.g]: no prompt"),
    ('templates = ["A {phrases}."]\nthreshold = 2\n[groups.g]\nclasses = ["a", "b"]\n'
     'prompt = "{}"\nphrase = "{}"\n', "threshold: must be a number 0..1"),
    ('templates = ["A cat."]\n[groups.g]\nclasses = ["a", "b"]\nprompt = "{}"\nphrase = "{}"\n',
     'templates: \'A cat.\' must hold "{phrases}"'),
    ('templates = ["A {phrases}."]\n[groups.g]\nclasses = ["a", "b"]\nprompt = "{}"\n'
     'phrase = "{}"\ntreshold = 0.4\n', "unknown key 'treshold'"),
    ('templates = ["A {phrases}."]\n[groups.g]\nclasses = ["a", "a"]\nprompt = "{}"\n'
     'phrase = "{}"\n', "class 'a' is listed twice"),
    ('templates = ["A {phrases}."]\n[groups.g]\nclasses = ["a", "b"]\nprompt = "{}"\n'
     'phrase = "{}"\nevaluated = ["c"]\n', "evaluated names 'c'"),
]


@pytest.mark.parametrize(("text", "problem"), MALFORMED)
def test_a_malformed_vocabulary_is_one_usage_line(tmp_path: Path, capsys, text: str,
                                                  problem: str) -> None:
    vocab = tmp_path / "v.toml"
    vocab.write_text(text, encoding="utf-8")
    _png(tmp_path / "data" / "a.png", (1, 2, 3))
    rc = main(["caption", str(tmp_path / "data"), "--vocabulary", str(vocab),
               "-o", str(tmp_path / "out" / "c.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(f"clipinvert: error: vocabulary {vocab}")
    assert problem in err
    assert not (tmp_path / "out").exists()


def test_a_vocabulary_parses_from_a_mapping() -> None:
    vocab = parse_vocabulary({"templates": ["It {phrases}."], "groups": {
        "size": {"classes": ["big", "small"], "prompt": "a {} thing", "phrase": "is {}"}}})
    assert vocab.group("size").threshold == 0.5 and vocab.evaluated == ("size:big", "size:small")
    with pytest.raises(UsageError, match="vocabulary nope.toml: not found"):
        load_vocabulary("nope.toml")


# ---- labelling with a CLIP whose answers are known -------------------------------------------
class KnownClip:
    """Unit embeddings built so CLIP's answer is known: every prompt of the vocabulary is one
    axis, and an image (told apart by its red value) points at the prompts of its classes.
    ``spread`` classes share an image's weight equally (an unsure group)."""

    def __init__(self, vocabulary, images: dict[int, list[str]], fail_on_call: int = 0) -> None:
        self.axes = {p: i for i, p in enumerate(
            dict.fromkeys(p for g in vocabulary.groups for p in g.prompts()))}
        self.vocabulary = vocabulary
        self.images = images  # red value → ["group:class", …] (a group twice: unsure)
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.seen: list[int] = []

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        return torch.eye(len(self.axes))[[self.axes[t] for t in texts]]

    def image_embeddings(self, images) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-run
        rows = []
        for im in images:
            red = int(np.asarray(im)[0, 0, 0])
            self.seen.append(red)
            row = torch.zeros(len(self.axes))
            for name in self.images[red]:
                group, _, cls = name.partition(":")
                g = self.vocabulary.group(group)
                row[self.axes[g.prompt.format(cls)]] = 1.0
            rows.append(F.normalize(row, dim=0))
        return torch.stack(rows)


def test_zero_shot_labels_and_sentences_on_a_known_answer(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png(data / "one.png", (1, 0, 0))
    _png(data / "sub" / "two.png", (2, 0, 0), size=(64, 20))  # non-square: labelled all the same
    clip = KnownClip(CATS, {
        1: ["breed:Persian", "colour:grey", "mood:happy", "age:old"],
        2: ["breed:Siamese", "age:young", "age:old"],  # age unsure (0.5 each): left out
    })
    outputs = CaptionOutputs.beside(tmp_path / "out" / "captions.jsonl")
    run = caption_folder(data, outputs, CATS, lambda: clip, batch_size=8, quiet=True)
    assert run.exit_code == 0
    labels = {r["image"]: r for r in _jsonl(outputs.labels)}
    assert labels["../data/one.png"]["attributes"] == [
        "breed:Persian", "colour:grey", "mood:happy", "age:old"]
    two = labels["../data/sub/two.png"]
    assert two["attributes"][0] == "breed:Siamese" and "age" not in {
        a.split(":")[0] for a in two["attributes"]}
    assert two["scores"]["age"]["p"] == pytest.approx(0.5, abs=1e-3)
    captions = {r["image"]: r["captions"] for r in _jsonl(outputs.captions)}
    assert captions["../data/one.png"][0] == \
        "This cat is a Persian, has grey fur, looks happy and is old."
    assert all("young" not in c and "old" not in c for c in captions["../data/sub/two.png"])
    assert run.distribution["breed"]["Persian"] == run.distribution["breed"]["Siamese"] == 1
    assert run.distribution["age"] == {"young": 0, "old": 1, "(none)": 1}


def test_an_interrupted_run_resumes_without_duplicates(tmp_path: Path) -> None:
    data = tmp_path / "data"
    answers = {r: ["breed:Bengal", f"colour:{CATS.group('colour').classes[r % 7]}"]
               for r in range(1, 6)}
    for r in answers:
        _png(data / f"{r}.png", (r, 0, 0))
    outputs = CaptionOutputs.beside(tmp_path / "out" / "captions.jsonl")
    first = KnownClip(CATS, answers, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(data, outputs, CATS, lambda: first, batch_size=2, quiet=True)
    kept = _jsonl(outputs.labels)
    assert [r["image"] for r in kept] == ["../data/1.png", "../data/2.png"]  # the first batch
    again = KnownClip(CATS, answers)
    run = caption_folder(data, outputs, CATS, lambda: again, batch_size=2, quiet=True)
    assert sorted(again.seen) == [3, 4, 5]  # only what the first run had not finished
    images = [r["image"] for r in _jsonl(outputs.captions)]
    assert len(images) == len(set(images)) == 5
    assert len(_jsonl(outputs.labels)) == 5
    assert run.report.count("skipped") == 2 and run.report.count("done") == 3
    # Other settings (another threshold) would mix two labellings: refused, or --overwrite.
    stricter = parse_vocabulary({**_raw("cats"), "threshold": 0.9})
    with pytest.raises(UsageError, match="made with other settings"):
        caption_folder(data, outputs, stricter, lambda: again, quiet=True)
    fresh = KnownClip(CATS, answers)
    caption_folder(data, outputs, stricter, lambda: fresh, overwrite=True, quiet=True)
    assert sorted(fresh.seen) == [1, 2, 3, 4, 5]


def _raw(name: str) -> dict:
    return read_toml(PACKAGED_DIR / f"{name}.toml", "vocabulary")


def test_foreign_files_are_never_merged_into(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png(data / "a.png", (1, 0, 0))
    mine = tmp_path / "captions.jsonl"
    mine.write_text('{"image": "x.png", "captions": ["hand-written"]}\n', encoding="utf-8")
    clip = KnownClip(CATS, {1: ["breed:Bengal"]})
    with pytest.raises(UsageError, match="not made by clipinvert caption"):
        caption_folder(data, CaptionOutputs.beside(mine), CATS, lambda: clip, quiet=True)
    assert "hand-written" in mine.read_text(encoding="utf-8")
    with pytest.raises(UsageError, match="inside the data folder"):
        caption_folder(data, CaptionOutputs.beside(data / "c.jsonl"), CATS, lambda: clip)
    with pytest.raises(UsageError, match="must be a .jsonl file"):
        caption_folder(data, CaptionOutputs.beside(tmp_path / "c.txt"), CATS, lambda: clip)


def test_distribution_counts_every_class_and_the_unlabelled() -> None:
    counts = distribution(CATS, [{"attributes": ["breed:Bengal", "age:old"]},
                                 {"attributes": ["breed:Bengal"]}, {"attributes": []}])
    assert counts["breed"]["Bengal"] == 2 and counts["breed"]["(none)"] == 1
    assert counts["age"] == {"young": 0, "old": 1, "(none)": 2}
    assert sum(counts["colour"].values()) == 3


# ---- the command, with the tiny random-weight CLIP --------------------------------------------
def test_caption_command_end_to_end(tmp_path: Path, tiny_models: Path, capsys) -> None:
    data = tmp_path / "afhq"
    for i in range(4):
        _png(data / f"cat{i}.png", (40 * i, 90, 200 - 30 * i), size=(48 + 8 * i, 40))
    (data / "broken.png").write_text("not an image", encoding="utf-8")
    _png(data / "own.png", (9, 9, 9))
    (data / "own.txt").write_text("a cat with its own caption\n", encoding="utf-8")
    before = _snapshot(data)
    os.chmod(data, stat.S_IRUSR | stat.S_IXUSR)  # read-only (root writes anyway: see below)
    out = tmp_path / "work" / "captions.jsonl"
    # The user's vocabulary: the cats', every threshold 0 (the top class is always kept), so
    # a random CLIP labels every group of every image and each cat gets captions.
    vocab = tmp_path / "eager-cats.toml"
    vocab.write_text(re.sub(r"threshold = [0-9.]+", "threshold = 0.0",
                            (PACKAGED_DIR / "cats.toml").read_text(encoding="utf-8")),
                     encoding="utf-8")
    args = ["caption", str(data), "-o", str(out), "--domain", "tiny", "--vocabulary", str(vocab),
            "--models", str(tiny_models), "--device", "cpu", "--workers", "0", "-b", "2"]
    try:
        rc = main(args)
    finally:
        os.chmod(data, stat.S_IRWXU)
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # one bad image: reported, the others done
    assert captured.out == f"{out}\n"  # stdout carries the result only
    assert captured.err.count("failed") >= 1 and "broken.png" in captured.err
    assert "labels per class" in captured.err  # the distribution table, on stderr
    assert _snapshot(data) == before  # nothing written inside DATA, as root too
    # train's reader takes the manifest as it is: the 4 labelled cats, with sentences naming
    # their labels, and the image with its own caption, copied (not labelled).
    train = ImageCaptionDataset(out, "jsonl", check_images=True, min_samples=1)
    by_name = {s.path.name: s.captions for s in train.samples}
    assert sorted(by_name) == [*(f"cat{i}.png" for i in range(4)), "own.png"]
    assert by_name["own.png"] == ("a cat with its own caption",)
    labels_path = out.with_name("captions-labels.jsonl")
    labelled = read_labelled(labels_path)  # the benchmark's reader
    assert sorted(i.name for i in labelled) == [f"cat{i}.png" for i in range(4)]
    for item in labelled:
        assert item.path.is_file() and len(item.attributes) == 4
        assert item.attributes <= set(protocol.CATS.evaluated)
        labels = dict(a.split(":") for a in item.attributes)
        assert by_name[item.name][0] == CATS.sentences(labels, item.name)[0]
    report = json.loads(out.with_name("captions-report.json").read_text(encoding="utf-8"))
    assert report["counts"] == {"done": 4, "skipped": 1, "failed": 1}
    dist = report["caption"]["distribution"]
    assert set(dist) == {"breed", "colour", "mood", "age"}
    assert all(sum(classes.values()) == 4 for classes in dist.values())
    assert dist["breed"].keys() == {*CATS.group("breed").classes, "(none)"}
    # A second run has nothing left but the bad image: the rest is skipped, no line doubled.
    assert main(args + ["-q"]) == 1
    assert len(_jsonl(out)) == len({r["image"] for r in _jsonl(out)})
    assert len(_jsonl(labels_path)) == 4


def test_a_domain_without_a_vocabulary_needs_one(tmp_path: Path, tiny_models: Path,
                                                 capsys) -> None:
    _png(tmp_path / "d" / "a.png", (1, 2, 3))
    rc = main(["caption", str(tmp_path / "d"), "-o", str(tmp_path / "c.jsonl"),
               "--domain", "tiny", "--models", str(tiny_models)])
    err = capsys.readouterr().err
    assert rc == 2 and "has no packaged vocabulary" in err and "--vocabulary FILE" in err


def test_one_run_at_a_time_and_leftovers_of_a_killed_one_go(tmp_path: Path) -> None:
    from clipinvert.outlock import FolderBusyError, OutputLock

    data = tmp_path / "data"
    _png(data / "a.png", (1, 0, 0))
    out = tmp_path / "out"
    out.mkdir()
    outputs = CaptionOutputs.beside(out / "captions.jsonl")
    clip = KnownClip(CATS, {1: ["breed:Bengal"]})
    other = OutputLock(out)
    other.acquire()  # another live run writes there
    try:
        with pytest.raises(FolderBusyError):
            caption_folder(data, outputs, CATS, lambda: clip, quiet=True)
    finally:
        other.release()
    leftover = out / ".captions.jsonl.0123abcd.partial.jsonl"  # a kill -9 mid-write
    leftover.write_text("{", encoding="utf-8")
    keep = out / ".notes.0123abcd.partial.txt"  # not one of this run's files
    keep.write_text("x", encoding="utf-8")
    caption_folder(data, outputs, CATS, lambda: clip, quiet=True)
    assert not leftover.exists() and keep.exists()
    assert [r["attributes"] for r in _jsonl(outputs.labels)] == [["breed:Bengal"]]
    assert not (out / ".clipinvert-lock").exists()
