"""The CelebA attribute classifier of the AMA metric (docs/attribute-classifier.md): the network,
the CelebA reader and its 7:2:1 split, the trainer (learning, resuming, skipped images, output
protection) and the file it writes.

Training runs on a synthetic CelebA written by the tests — small images whose first three
attributes are colour cues (red, green, blue tint), every other attribute absent — with an eighth
of MobileNet's widths at 32 px, so a whole run takes well under a second on the CPU.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipinvert.checkpoints import load_attribute_classifier
from clipinvert.errors import UsageError, WeightsError
from clipinvert.evaluation import classifier as clf
from clipinvert.nets.attributes import (
    ATTRIBUTES_FORMAT,
    CELEBA_ATTRIBUTES,
    MOBILENET_WIDTHS,
    AttributeNet,
    mobilenet_widths,
)

TINY = mobilenet_widths(0.125)
CUES = 3  # attributes 0, 1, 2: red, green, blue tint


def write_celeba(root: Path, n: int = 60, *, seed: int = 0) -> Path:
    """A CelebA folder: ``img_align_celeba/`` (40×48 JPEGs) + ``list_attr_celeba.txt``.

    The list is written in *reverse* name order, so code that sorted file names instead of
    keeping the list's order would split differently.
    """
    rng = random.Random(seed)
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    lines = []
    for i in reversed(range(n)):
        cues = [rng.random() < 0.5 for _ in range(CUES)]
        base = [rng.randint(40, 90) for _ in range(3)]
        colour = tuple(b + (150 if cues[c] else 0) for c, b in enumerate(base))
        im = Image.new("RGB", (40, 48), colour)
        noise = Image.frombytes("L", (40, 48), rng.randbytes(40 * 48)).convert("RGB")
        Image.blend(im, noise, 0.1).save(images / f"{i + 1:06d}.jpg", quality=95)
        values = ["1" if c else "-1" for c in cues] + ["-1"] * (len(CELEBA_ATTRIBUTES) - CUES)
        lines.append(f"{i + 1:06d}.jpg " + " ".join(f"{v:>2}" for v in values))
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(lines) + "\n",
        encoding="utf-8")
    return root


def train(celeba: Path, output: Path, **kw):
    settings = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "seed": 0, "device": "cpu",
                "workers": 0, "progress": False, "input_size": 32, "widths": TINY,
                "log": lambda line: None}
    settings.update(kw)
    return clf.train_classifier(celeba, output, **settings)


@pytest.fixture
def celeba(tmp_path: Path) -> Path:
    return write_celeba(tmp_path / "celeba")


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


# ---- the network --------------------------------------------------------------------------
def test_network_at_the_real_size() -> None:
    torch.manual_seed(0)
    net = AttributeNet().eval()  # the real widths; one 224 px image on the CPU
    assert sum(p.numel() for p in net.parameters()) == 3_247_976  # MobileNet-v1 trunk + fc
    assert net.attributes == CELEBA_ATTRIBUTES and net.input_size == 224
    sd = net.state_dict()
    assert tuple(sd["features.0.0.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["features.1.0.weight"].shape) == (32, 1, 3, 3)  # depthwise
    assert tuple(sd["features.1.3.weight"].shape) == (64, 32, 1, 1)  # pointwise
    assert tuple(sd["features.13.3.weight"].shape) == (1024, 1024, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (40, 1024)
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        features = net.features(x)
        logits = net(x)
        p = net.probabilities(torch.nn.functional.interpolate(x, size=256))  # resized to 224
    assert tuple(features.shape) == (1, 1024, 7, 7)  # what the reference's AvgPool2d(7) sees
    assert tuple(logits.shape) == (1, 40)
    torch.testing.assert_close(logits, net.fc(features.mean((2, 3))))
    assert tuple(p.shape) == (1, 40) and bool(((p > 0) & (p < 1)).all())
    assert AttributeNet.from_state_dict(sd).widths == MOBILENET_WIDTHS


def test_widths_are_read_back_from_the_shapes() -> None:
    tiny = AttributeNet(TINY, 5)
    back = AttributeNet.from_state_dict(tiny.state_dict())
    assert back.widths == TINY and back.fc.out_features == 5
    with pytest.raises(KeyError):
        AttributeNet.from_state_dict({"fc.weight": torch.zeros(40, 8)})
    sd = dict(tiny.state_dict())
    sd["features.5.3.weight"] = torch.zeros(32, 7, 1, 1)
    with pytest.raises(ValueError, match="features.5.3.weight takes 7 channels"):
        AttributeNet.from_state_dict(sd)


# ---- the data -----------------------------------------------------------------------------
def test_split_is_7_2_1_by_position(tmp_path: Path) -> None:
    assert {k: (r.start, r.stop) for k, r in clf.split_indices(10).items()} == {
        "train": (0, 7), "val": (7, 9), "test": (9, 10)}
    assert [r.stop for r in clf.split_indices(202599).values()] == [141819, 182339, 202599]
    root = write_celeba(tmp_path / "c", n=20)
    listed = [ln.split()[0] for ln in
              (root / "list_attr_celeba.txt").read_text().splitlines()[2:]]
    (root / "img_align_celeba" / listed[14]).unlink()  # a missing val image moves nothing
    lines: list[str] = []
    data = clf.load_celeba(root, size=32, log=lines.append)
    files = data.dataset.files
    assert [files[r] for r in data.rows["train"]] == listed[:14]
    assert [files[r] for r in data.rows["val"]] == listed[15:18]
    assert [files[r] for r in data.rows["test"]] == listed[18:]
    assert data.names == CELEBA_ATTRIBUTES and data.missing == [listed[14]]
    assert lines == [f"skipped {root / 'img_align_celeba' / listed[14]}: file not found "
                     "(listed in list_attr_celeba.txt)"]
    item = data.dataset[data.rows["train"][0]]
    assert tuple(item["image"].shape) == (3, 32, 32) and item["image"].min() >= -1
    assert item["label"].tolist() == data.dataset.labels[data.rows["train"][0]].float().tolist()


def test_unusable_folders_and_lists_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist") as e:
        clf.load_celeba(tmp_path / "nowhere")
    one_line(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="list_attr_celeba.txt") as e:
        clf.load_celeba(tmp_path / "empty")
    one_line(e.value)
    root = write_celeba(tmp_path / "bad", n=12)
    listing = root / "list_attr_celeba.txt"
    lines = listing.read_text().splitlines()
    lines[3] = lines[3].replace(" 1", " 2", 1) if " 1" in lines[3] else lines[3] + " -1"
    listing.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match="line 4") as e:
        clf.load_celeba(root)
    assert str(listing) in one_line(e.value)
    for image in (root / "img_align_celeba").iterdir():
        image.unlink()
    listing.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(UsageError, match="none of the 11 images") as e:
        clf.load_celeba(root)
    one_line(e.value)


# ---- training -----------------------------------------------------------------------------
def test_classifier_learns_the_cues(celeba: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "attrs.pt"
    result = train(celeba, out, epochs=6, lr=3e-2, log=lines.append)
    first, last = result.history[0], result.history[-1]
    assert len(result.history) == 6
    assert last["loss"] < 0.5 * first["loss"], result.history
    assert last["train_accuracy"] > first["train_accuracy"]
    # The kept network, in eval mode (BatchNorm's running statistics, which lag behind a few
    # dozen fast steps), tells the colour cues apart far above chance (0.5) on every image.
    net = load_attribute_classifier(out)
    data = clf.load_celeba(celeba, size=32)
    batch = clf.collate([data.dataset[r] for r in range(len(data.dataset))])
    with torch.no_grad():
        pred = net(batch["image"]) > 0
    cue_accuracy = (pred[:, :CUES] == (batch["label"][:, :CUES] > 0.5)).float().mean().item()
    assert cue_accuracy >= 0.7, cue_accuracy
    assert result.accuracy["test"]["images"] == 6 and result.accuracy["val"]["images"] == 12
    assert set(result.test_accuracy) == set(CELEBA_ATTRIBUTES)
    # The table: a header, 40 attributes, the mean; also in the JSON beside the file.
    assert any(ln.startswith("attribute") and "majority" in ln for ln in lines)
    assert any(ln.startswith("mean ") for ln in lines)
    report = json.loads(clf.report_path_for(out).read_text())
    assert report["accuracy"]["test"]["per_attribute"] == pytest.approx(result.test_accuracy)
    assert report["format"] == ATTRIBUTES_FORMAT and report["training"]["epochs"] == 6
    assert not clf.state_path_for(out).exists()  # removed once the output is written


def _interrupt(*args: object, **kw: object) -> None:
    raise KeyboardInterrupt


def _same_weights(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)
    sb = torch.load(b, weights_only=True)
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    assert sa["accuracy"] == sb["accuracy"]
    assert sa["training"]["history"] == sb["training"]["history"]


def test_interrupted_run_resumes_bit_for_bit(celeba: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference.pt"
    train(celeba, reference, epochs=3)

    # Ctrl-C during the 7th step (epoch 2 of 3; 5 steps per epoch): the step finishes, the
    # state is saved with its position in the epoch, the run stops.
    out = tmp_path / "resumed.pt"
    real_step, calls = clf._step, []

    def step(*args):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(clf, "_step", step)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train(celeba, out, epochs=3, log=lines.append)
    assert not out.exists() and clf.state_path_for(out).exists()
    assert any(ln.startswith("stopped in epoch 2 after 16 images") for ln in lines)
    monkeypatch.setattr(clf, "_step", real_step)
    lines.clear()
    result = train(celeba, out, epochs=3, log=lines.append)
    assert any("resuming" in ln and "16 images into epoch 2" in ln for ln in lines)
    assert result.trained and not clf.state_path_for(out).exists()
    _same_weights(reference, out)


def test_stop_during_validation_resumes_at_the_epoch_end(celeba: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "reference.pt"
    train(celeba, reference, epochs=2)
    out = tmp_path / "resumed.pt"
    real = clf._evaluate
    monkeypatch.setattr(clf, "_evaluate", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(celeba, out, epochs=2)
    state = torch.load(clf.state_path_for(out), weights_only=True)
    assert (state["epoch"], state["position"], state["validated"]) == (1, 0, 0)
    monkeypatch.setattr(clf, "_evaluate", real)
    train(celeba, out, epochs=2)
    _same_weights(reference, out)


def test_missing_and_corrupt_images_are_one_line_each_and_counted(celeba: Path,
                                                                  tmp_path: Path) -> None:
    images = celeba / "img_align_celeba"
    (images / "000005.jpg").unlink()
    corrupt = images / "000009.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # cut short, as by a failed copy
    lines: list[str] = []
    result = train(celeba, tmp_path / "a.pt", epochs=2, log=lines.append)
    missing = [ln for ln in lines if "000005.jpg" in ln]
    broken = [ln for ln in lines if "000009.jpg" in ln]
    assert missing == [f"skipped {images / '000005.jpg'}: file not found (listed in "
                       "list_attr_celeba.txt)"]
    assert len(broken) == 1 and broken[0].startswith(f"skipped {corrupt}: ")
    assert "corrupt" in broken[0]  # decoded in both epochs, reported once
    assert result.images["missing"] == 1 and result.images["unreadable"] == 1
    assert result.images["listed"] == 60
    kinds = {s["file"]: s["kind"] for s in result.skipped}
    assert kinds == {"000005.jpg": "missing", "000009.jpg": "unreadable"}
    report = json.loads(result.report.read_text())
    assert report["training"]["images"]["unreadable"] == 1


def test_output_is_never_replaced_silently(celeba: Path, tmp_path: Path) -> None:
    out = tmp_path / "attrs.pt"
    out.write_text("someone else's file")
    with pytest.raises(UsageError, match="already exists") as e:
        train(celeba, out, epochs=1)
    assert str(out) in one_line(e.value)
    assert out.read_text() == "someone else's file"
    train(celeba, out, epochs=1, overwrite=True)
    lines: list[str] = []
    again = train(celeba, out, epochs=1, log=lines.append)  # the same run, already finished
    assert not again.trained and any("already trained" in ln for ln in lines)
    assert again.accuracy["test"]["images"] == 6
    with pytest.raises(UsageError, match="other settings") as e:
        train(celeba, out, epochs=1, seed=1)
    assert "seed" in one_line(e.value)


def test_resume_refuses_other_settings(celeba: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "attrs.pt"
    monkeypatch.setattr(clf, "_evaluate", _interrupt)  # stopped at the first val pass
    with pytest.raises(KeyboardInterrupt):
        train(celeba, out, epochs=1)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="batch_size 4") as e:
        train(celeba, out, epochs=1, batch_size=4)
    one_line(e.value)
    lines: list[str] = []
    train(celeba, out, epochs=1, batch_size=4, resume=False, log=lines.append)
    assert any(ln.startswith("starting over") for ln in lines)


# ---- the file -----------------------------------------------------------------------------
def test_file_loads_safely_and_wrong_files_are_refused(celeba: Path, tmp_path: Path) -> None:
    out = tmp_path / "attrs.pt"
    result = train(celeba, out, epochs=1)
    ckpt = torch.load(out, weights_only=True)  # plain types and tensors only
    assert ckpt["format"] == ATTRIBUTES_FORMAT and ckpt["attributes"] == list(CELEBA_ATTRIBUTES)
    assert ckpt["input_size"] == 32 and ckpt["normalize"] == [0.5, 0.5]
    assert ckpt["accuracy"] == result.accuracy
    net = load_attribute_classifier(out)
    assert not net.training and net.attributes == CELEBA_ATTRIBUTES and net.input_size == 32
    with torch.no_grad():
        p = net.probabilities(torch.zeros(2, 3, 48, 48))
    assert tuple(p.shape) == (2, 40)

    lace = tmp_path / "model_checkpoint.pth"  # LACE's own trainer's layout
    torch.save({"model_state_dict": ckpt["state_dict"], "optimizer_state_dict": {}}, lace)
    assert load_attribute_classifier(lace).input_size == 224

    wrong = {
        "other.pt": {"g_ema": {"x": torch.zeros(1)}},
        "format.pt": {**ckpt, "format": "something-else"},
        "names.pt": {**ckpt, "attributes": ckpt["attributes"][:39]},
        "shapes.pt": {**ckpt, "state_dict": {**ckpt["state_dict"],
                                             "fc.weight": torch.zeros(40, 3)}},
    }
    for name, content in wrong.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(WeightsError) as e:
            load_attribute_classifier(tmp_path / name)
        assert str(tmp_path / name) in one_line(e.value), name
    (tmp_path / "text.pt").write_text("<html>quota exceeded</html>")
    with pytest.raises(WeightsError) as e:
        load_attribute_classifier(tmp_path / "text.pt")
    one_line(e.value)


def test_random_test_classifier_writer(tmp_path: Path) -> None:
    from clipinvert.testing.models import write_attribute_classifier

    net = load_attribute_classifier(write_attribute_classifier(tmp_path / "a.pt"))
    assert net.widths == TINY and net.input_size == 32
