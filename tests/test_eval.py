"""`clipinvert eval`: pairs, the protocol, and metrics against hand computations."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipinvert.errors import UsageError
from clipinvert.evaluation.metrics import EvalOptions
from clipinvert.evaluation.pairs import Pair, PairSet, read_pairs
from clipinvert.evaluation.protocol import (
    CATS,
    FACE_ATTRIBUTES,
    FACE_COMBINATIONS,
    choose_inputs,
    face_prompt,
)
from clipinvert.evaluation.score import parse_metrics, score_pairs


def _png(path: Path, rgb: tuple[int, int, int] | np.ndarray, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rgb if isinstance(rgb, np.ndarray) else np.full((size, size, 3), rgb, np.uint8)
    Image.fromarray(arr).save(path)
    return path


# ---- pairs --------------------------------------------------------------------------------
def test_manifest_pairs_by_line_with_bad_lines_counted(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (0, 0, 0))
    lines = [
        {"input": "a.png", "output": "out/a.png", "prompt": "blond hair",
         "attributes": ["Blond_Hair"]},
        {"input": str(tmp_path / "a.png"), "output": "out/b.png"},  # a reconstruction
        "not json",
        {"input": "a.png", "output": "x.png", "prompt": "  "},
        {"input": "a.png", "prompt": "p"},
        {"input": "a.png", "output": "y.png", "attributes": ["Smiling"]},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln)
                                  for ln in lines) + "\n\n")
    got = read_pairs(manifest)
    assert got.pairs == [
        Pair(tmp_path / "a.png", tmp_path / "out/a.png", "blond hair", ("Blond_Hair",)),
        Pair(tmp_path / "a.png", tmp_path / "out/b.png", None),
    ]
    assert [w for w, _ in got.skipped] == ["pairs.jsonl:3", "pairs.jsonl:4", "pairs.jsonl:5",
                                          "pairs.jsonl:6"]
    assert "not JSON" in got.skipped[0][1] and "empty 'prompt'" in got.skipped[1][1]
    assert "no 'output'" in got.skipped[2][1] and "without a 'prompt'" in got.skipped[3][1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{}\n")
    with pytest.raises(UsageError, match="no usable line"):
        read_pairs(empty)


def test_pairs_from_an_edit_folder_follow_the_prompt_folders(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = {
        "command": "edit", "params": {"output": str(out)},
        "conditions": [{"condition": "blond hair", "slug": "blond-hair", "tokens": 4},
                       {"condition": "look.jpg", "slug": "look"},
                       {"condition": "a beard", "slug": "a-beard", "tokens": 4}],
        "inputs": [
            {"input": "/photos/x.jpg", "status": "done", "outputs": [
                str(out / "blond-hair/sub/x.png"), str(out / "look/sub/x.png"),
                str(out / "a-beard/sub/x.png"), str(out / "compare/sub/x.png"),
                str(out / "sub/x.json")]},
            {"input": "/photos/y.jpg", "status": "failed", "reason": "no face found"},
        ]}
    out.mkdir()
    (out / "clipinvert-report.json").write_text(json.dumps(report))
    got = read_pairs(out)
    assert [(p.output.relative_to(out).as_posix(), p.prompt) for p in got.pairs] == [
        ("blond-hair/sub/x.png", "blond hair"), ("a-beard/sub/x.png", "a beard")]
    assert all(p.transform == out / "sub/x.json" for p in got.pairs)
    assert {w for w, _ in got.skipped} == {str(out / "look/sub/x.png"), "/photos/y.jpg"}
    moved = out.rename(tmp_path / "moved")  # a folder moved (or copied) since: found there
    again = read_pairs(moved)
    assert [p.output for p in again.pairs] == [moved / "blond-hair/sub/x.png",
                                               moved / "a-beard/sub/x.png"]
    assert all(p.transform == moved / "sub/x.json" for p in again.pairs)
    out = moved
    (out / "clipinvert-report.json").write_text(json.dumps({**report, "command": "align"}))
    with pytest.raises(UsageError, match="clipinvert align"):
        read_pairs(out)


def test_metric_names_default_to_what_the_pairs_allow() -> None:
    assert parse_metrics("all", has_prompts=True) == [
        "fid", "cmp", "ama_single", "ama_multiple", "id", "lpips", "mse"]
    assert parse_metrics(None, has_prompts=False) == ["fid", "id", "lpips", "mse"]
    assert parse_metrics("mse, cmp", has_prompts=True) == ["cmp", "mse"]
    with pytest.raises(UsageError, match="unknown fidd"):
        parse_metrics("fidd,cmp", has_prompts=True)


# ---- protocol -------------------------------------------------------------------------------
def test_face_prompts_and_combinations() -> None:
    assert len(FACE_ATTRIBUTES) == 15 and len(FACE_COMBINATIONS) == 7
    assert all(2 <= len(c) <= 3 and set(c) <= set(FACE_ATTRIBUTES) for c in FACE_COMBINATIONS)
    assert face_prompt(["Blond_Hair"]) == "This person has blond hair."
    assert face_prompt(["Male"]) == "This is a male."
    assert face_prompt(["Smiling"], male=True, gendered=True) == "He is smiling."
    assert face_prompt(["Smiling"], male=False, gendered=True) == "She is smiling."
    assert face_prompt(["Goatee"], male=False, gendered=True) == "He has a goatee."
    assert face_prompt(["Wearing_Lipstick"], male=True, gendered=True) == \
        "She is wearing lipstick."
    assert face_prompt(["Blond_Hair", "Smiling", "Mouth_Slightly_Open"]) == \
        "This person has blond hair, is smiling and has mouth slightly open."


def test_zero_shot_sets_cover_their_categories() -> None:
    assert sum(len(v) for v in CATS.categories.values()) == 30
    assert len(CATS.evaluated) == 30
    from clipinvert.evaluation.protocol import BIRDS

    assert len(BIRDS.evaluated) == 40
    a = BIRDS.attribute("wing_color:blue")
    assert BIRDS.captions(a.category)[0] == "a photo of a bird with blue wings"
    assert len(BIRDS.captions(a.category)) == 15
    assert BIRDS.prompt("wing_color:blue") == "This bird has blue wings."
    with pytest.raises(ValueError, match="not a cats attribute"):
        CATS.attribute("breed:Tabby")


def test_inputs_are_chosen_reproducibly_per_target() -> None:
    cands = {"A": [f"{i}.jpg" for i in range(100)], "B": ["1.jpg", "2.jpg"]}
    a, b = choose_inputs(cands, 50, seed=3), choose_inputs(dict(reversed(cands.items())), 50, 3)
    assert a == b and len(a["A"]) == 50 and a["B"] == ["1.jpg", "2.jpg"]
    assert choose_inputs(cands, 50, seed=4)["A"] != a["A"]



def _celebahq(root: Path, labels: dict[str, list[str]], folder: str = "CelebA-HQ-img") -> Path:
    """A CelebA-HQ root with the CelebAMask-HQ download's folder name and annotation file."""
    names = ["Blond_Hair", "Male", "Smiling"]
    (root / folder).mkdir(parents=True)
    lines = [str(len(labels)), " ".join(names)]
    for name, has in labels.items():
        _png(root / folder / name, (9, 9, 9), size=8)
        lines.append(name + " " + " ".join("1" if n in has else "-1" for n in names))
    (root / "CelebAMask-HQ-attribute-anno.txt").write_text("\n".join(lines) + "\n")
    return root


def test_celebahq_with_a_multimodal_test_pickle(tmp_path: Path) -> None:
    import pickle

    from clipinvert.evaluation.benchmark import read_labelled, select

    root = _celebahq(tmp_path / "hq", {"0.jpg": ["Male"], "1.jpg": ["Blond_Hair"],
                                       "2.jpg": [], "3.jpg": ["Smiling", "Male"]})
    every = read_labelled(root)
    assert [i.path for i in every] == [root / "CelebA-HQ-img" / f"{i}.jpg" for i in range(4)]
    assert [i.male for i in every] == [True, False, False, True]
    # Multi-Modal CelebA-HQ's test/filenames.pickle: a Python 2 pickle of names without extension
    test = tmp_path / "filenames.pickle"
    test.write_bytes(pickle.dumps(["1", "3"], protocol=2))
    chosen = read_labelled(root, test_list=test)
    assert [i.name for i in chosen] == ["1.jpg", "3.jpg"]
    (tmp_path / "test.txt").write_text("3.jpg\n\n0\n")
    assert [i.name for i in read_labelled(root, test_list=tmp_path / "test.txt")] == ["0.jpg",
                                                                                      "3.jpg"]
    picked = select(chosen, "faces", per_target=5, seed=0, gendered=True)
    blond = [e for e in picked["edits"] if e["target"] == "Blond_Hair"]
    assert [(Path(e["input"]).name, e["prompt"]) for e in blond] == [
        ("3.jpg", "He has blond hair.")]  # 1.jpg is blond already: never an input for it
    assert picked["short"]["Blond_Hair"] == 1
    # A pickle that names any class is refused before it can run anything.
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(UsageError, match="cannot read the test list .*not a list of image"):
        read_labelled(root, test_list=evil)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UsageError, match="names no image"):
        read_labelled(root, test_list=tmp_path / "empty.txt")


def test_benchmark_with_relative_paths_scores_what_it_edits(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--data, -o and --edits relative to the current folder: the manifest and the selection
    name images the way `eval metrics` reads them (relative to their own folder, or absolute),
    so every edit is scored, and the output folder can move with its edits."""
    from clipinvert.cli import main

    work = tmp_path / "work"
    _png(work / "set" / "img" / "a.png", (200, 40, 40))
    _png(work / "set" / "img" / "b.png", (40, 200, 40))
    monkeypatch.chdir(work)
    (work / "set" / "labels.jsonl").write_text("".join(
        json.dumps({"image": f"img/{n}.png", "attributes": attrs}) + "\n"
        for n, attrs in (("a", ["Smiling"]), ("b", []))))
    common = ["--per-target", "1", "--metrics", "mse", "--models", str(tiny_models),
              "--domain", "tiny", "--device", "cpu", "--quiet", "--no-summary"]
    assert main(["eval", "benchmark", "--data", "set/labels.jsonl", "-o", "bench",
                 *common]) == 0
    report = json.loads((work / "bench" / "clipinvert-report.json").read_text())
    pairs = report["counts"]["pairs"]
    assert pairs == 22 == report["counts"]["scored"]  # 15 attributes + 7 combinations, 1 each
    lines = [json.loads(ln) for ln in (work / "bench" / "pairs.jsonl").read_text().splitlines()]
    assert {Path(ln["input"]) for ln in lines} == {work / "set" / "img" / "a.png",
                                                  work / "set" / "img" / "b.png"}
    assert all(ln["output"].startswith("edits/") for ln in lines)  # inside OUT: relative to it
    selection = json.loads((work / "bench" / "selection.json").read_text())
    assert all(Path(e["input"]).is_absolute() for e in selection["edits"])
    # the folder moves with its edits, and `eval metrics` scores it from anywhere
    (work / "bench").rename(work / "moved")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "metrics", "work/moved/pairs.jsonl", "-o", "work/scored",
                 *common[2:]]) == 0
    scored = json.loads((work / "scored" / "clipinvert-report.json").read_text())
    assert scored["metrics"]["mse"] == pytest.approx(report["metrics"]["mse"])
    # edits made elsewhere, named relative to the current folder
    monkeypatch.chdir(work)
    assert main(["eval", "benchmark", "--data", "set/labels.jsonl", "-o", "theirs",
                 "--edits", "moved/edits", *common]) == 0
    given = json.loads((work / "theirs" / "clipinvert-report.json").read_text())
    assert given["counts"]["scored"] == pairs
    assert given["benchmark"]["folder"] == str(work / "moved" / "edits")

# ---- metrics by hand ----------------------------------------------------------------------
class _Classifier:
    """A stand-in attribute classifier that reads colour: the probability of attribute k is the
    mean of channel k (0..1), so every answer below can be worked out by hand."""

    attributes = ("Blond_Hair", "Smiling", "Eyeglasses")
    input_size = 8

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).mean(dim=(2, 3))


def _stub() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), attributes=_Classifier(),
                           domain=SimpleNamespace(name="faces", weights={}))


def test_ama_against_a_classifier_with_known_outputs(tmp_path: Path) -> None:
    src = _png(tmp_path / "in.png", (0, 0, 0))
    cases = [  # (colour of the output, target attributes)
        ((200, 0, 0), ("Blond_Hair",)),  # 0.78 > 0.5: hit
        ((100, 0, 0), ("Blond_Hair",)),  # 0.39: miss
        ((0, 255, 0), ("Smiling",)),  # hit
        ((240, 240, 0), ("Blond_Hair", "Smiling")),  # 0.94, 0.94 > 0.9: hit
        ((240, 200, 0), ("Blond_Hair", "Smiling")),  # 0.78 for Smiling: miss
        ((0, 0, 250), ("Eyeglasses", "Smiling")),  # miss
        ((255, 255, 255), ("Bald",)),  # the classifier knows no Bald: left out, said
    ]
    pairs = [Pair(src, _png(tmp_path / f"o{i}.png", rgb), "p", attrs)
             for i, (rgb, attrs) in enumerate(cases)]
    scores = score_pairs(PairSet(pairs, "test"), ["ama_single", "ama_multiple"], _stub(),
                         options=EvalOptions(), batch_size=4, log=lambda line: None)
    single, multiple = scores.results["ama_single"], scores.results["ama_multiple"]
    assert single.per_attribute == {"Blond_Hair": 0.5, "Smiling": 1.0}
    assert single.value == pytest.approx(0.75) and single.count == 3
    assert single.details["unknown_attributes"] == {"Bald": [str(tmp_path / "o6.png")]}
    assert any("name 'Bald', which the CelebA attribute classifier does not know" in n
               for n in scores.notes)
    assert multiple.per_attribute == {"Blond_Hair+Smiling": 0.5, "Eyeglasses+Smiling": 0.0}
    assert multiple.value == pytest.approx(0.25) and multiple.details["threshold"] == 0.9
    looser = score_pairs(PairSet(pairs, "test"), ["ama_multiple"], _stub(),
                         options=EvalOptions(ama_multiple_threshold=0.7), log=lambda ln: None)
    assert looser.results["ama_multiple"].per_attribute["Blond_Hair+Smiling"] == 1.0


def test_reconstruction_mse_by_hand_and_unreadable_pairs_skipped(tmp_path: Path) -> None:
    src = _png(tmp_path / "in.png", (0, 0, 0), size=256)
    out = _png(tmp_path / "out.png", (255, 255, 255), size=512)  # other size, same shape
    wide = _png(tmp_path / "wide.png", np.zeros((32, 64, 3), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    lines: list[str] = []
    grey = _png(tmp_path / "grey.png", (255, 255, 255), size=256)
    pairs = [Pair(src, out, "p", ("Smiling",)), Pair(src, wide), Pair(src, broken),
             Pair(src, out, "p", ("Smiling",)), Pair(src, grey, "q", ("Male",)),
             Pair(src, src)]
    scores = score_pairs(PairSet(pairs, "test"), ["mse"], _stub(), log=lines.append)
    mse = scores.results["mse"]
    assert mse.value == pytest.approx(3.0) and mse.count == 4  # (1 − (−1))² = 4 three times, 0
    assert mse.per_attribute == {"Male": pytest.approx(4.0), "Smiling": pytest.approx(4.0)}
    assert scores.scored == [True, False, False, True, True, True]
    assert len(scores.skipped) == 2 and "differ in shape" in scores.skipped[0][1]
    assert any(ln.startswith(f"skipped {broken}") for ln in lines)
    # the same shape at another size is compared after resizing, and said once
    assert scores.resized == [f"{out}: input 256×256, output 512×512"] * 2
    assert sum("2 pair(s) have an input and output of different sizes" in ln
               for ln in lines) == 1


def test_cmp_equals_a_hand_computation(tiny_models: Path, tmp_path: Path) -> None:
    """sim: CLIP's reference pipeline (open_clip's own preprocessing of the saved file, through
    ClipEncoder.encode_image); diff: mean |x − y| of both images resized to 256 (PIL bilinear)
    in [−1, 1] units, computed here with numpy."""
    from clipinvert.clip_encoder import ClipEncoder
    from clipinvert.evaluation.networks import Networks
    from clipinvert.registry import Registry

    registry = Registry.load(tiny_models)
    domain = registry.domain("tiny")
    files = registry.locate_all(domain, ["clip"])
    rng = np.random.default_rng(0)
    src = _png(tmp_path / "in.png", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    clip = ClipEncoder(domain.clip_arch, files["clip"], base_dir=domain.base_dir)
    size = clip.image_size  # the output at CLIP's own size: its preprocessing resizes nothing
    out = _png(tmp_path / "out.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    prompt = "This person has blond hair."
    img = torch.nn.functional.normalize(clip.encode_image([Image.open(out)]), dim=1)
    txt = torch.nn.functional.normalize(clip.encode_text([prompt]), dim=1)
    sim = float((img * txt).sum())

    def at256(p: Path) -> np.ndarray:
        im = Image.open(p).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
        return np.asarray(im, np.float64) / 127.5 - 1

    diff = float(np.abs(at256(src) - at256(out)).mean())
    nets = Networks(files, domain)
    for diff_range, d in (("pm1", diff), ("01", diff / 2)):
        scores = score_pairs(PairSet([Pair(src, out, prompt)], "t"), ["cmp"], nets,
                             options=EvalOptions(diff_range=diff_range), log=lambda ln: None)
        cmp = scores.results["cmp"]
        assert cmp.value == pytest.approx(sim * (1 - d), abs=1e-5)
        assert cmp.details["sim"] == pytest.approx(sim, abs=1e-5)
        assert cmp.details["diff"] == pytest.approx(d, abs=1e-6)


def test_zero_shot_ama_picks_the_caption_clip_prefers(tmp_path: Path) -> None:
    """Cats: the stub's CLIP embeds each output on one caption of the colour category, so
    whether the edit's own class wins is known in advance."""
    from clipinvert.evaluation.protocol import CATS

    colours = list(CATS.categories["colour"])
    captions = CATS.captions("colour")
    wins = {0: "orange", 1: "black", 2: "orange"}  # the class each output's embedding points at

    def text_embeddings(texts: list[str]) -> torch.Tensor:
        return torch.eye(len(colours))[[captions.index(t) for t in texts]]

    def image_embeddings(images: list) -> torch.Tensor:
        return torch.stack([torch.eye(len(colours))[colours.index(
            wins[int(np.asarray(im)[0, 0, 0])])] for im in images])

    stub = SimpleNamespace(device=torch.device("cpu"), domain=SimpleNamespace(
        name="cats", weights={}), text_embeddings=text_embeddings,
        image_embeddings=image_embeddings)
    src = _png(tmp_path / "in.png", (9, 9, 9))
    pairs = [Pair(src, _png(tmp_path / f"o{i}.png", (i, 0, 0)), "p", ("colour:orange",))
             for i in range(3)]
    res = score_pairs(PairSet(pairs, "t"), ["ama_single"], stub,
                      log=lambda ln: None).results["ama_single"]
    assert res.per_attribute == {"colour:orange": pytest.approx(2 / 3)}
    assert res.details["classifier"] == "CLIP zero-shot"


def test_dlib_identity_tells_a_mirror_from_another_face() -> None:
    """--identity dlib on FFHQ-aligned 256 px crops of real photos: the astronaut against her
    mirror image scores high, against the cameraman (scikit-image's other face) low."""
    from skimage import data

    from clipinvert import imaging
    from clipinvert.align.ffhq import align_image
    from clipinvert.align.landmarks import FaceDetector, default_predictor_path
    from clipinvert.losses import IdentityNet

    detector = FaceDetector(default_predictor_path())
    astronaut = align_image(Image.fromarray(data.astronaut()), detector)[0].image
    camera = Image.fromarray(data.camera()).convert("RGB")
    # The cameraman's face is too small for dlib's detector at 512 px: look at it ×3.
    cameraman = align_image(camera.resize((1536, 1536), Image.Resampling.BICUBIC),
                            detector)[0].image
    mirror = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    net = IdentityNet.dlib()
    a, m, c = net.embed(imaging.to_tensor([astronaut, mirror, cameraman], 256))
    same, other = 100 * float(a @ m), 100 * float(a @ c)
    assert same > 95 and other < 90 and same - other > 8, (same, other)
