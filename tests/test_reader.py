"""One reader for every weight file: same checks and messages for every loader, safe CLIP
loading in both formats (TorchScript read without running its code), ``trust`` for CLIP."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before open_clip is imported

import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from clipinvert.checkpoints import load_clipinverter, load_e4e, load_stylegan2
from clipinvert.clip_encoder import ClipEncoder, load_clip_state_dict
from clipinvert.errors import EXIT_WEIGHTS, WeightsError
from clipinvert.testing.clip import FORMATS, write_tiny_clip
from clipinvert.weights.cache import cached_path
from clipinvert.weights.reader import CHECKPOINT, TORCHSCRIPT, read_weights
from clipinvert.weights.torchscript import read_state_dict

HTML = b"<!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny CLIP's config JSON ("config") and its weights in each format, by format name."""
    d = tmp_path_factory.mktemp("clip")
    files = {fmt: write_tiny_clip(d, fmt=fmt) for fmt in FORMATS}
    return {"config": files["openai"][0], **{fmt: w for fmt, (_, w) in files.items()}}


# ---- every loader, every bad file: the same code, the same line ---------------------------

class _Execs:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _alexnet_trunk(path: Path, *, trust: bool = False) -> dict:
    """A loader written the way reader.py's docstring says new ones are (LPIPS AlexNet)."""
    sd = read_weights(path, what="LPIPS AlexNet", trust=trust)
    trunk = {k: v for k, v in sd.items() if k.startswith("features.")}
    if not trunk:
        raise WeightsError(f"LPIPS AlexNet weights {path} hold no features.* keys")
    return trunk


LOADERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "e4e": ("e4e", load_e4e),
    "clipinverter": ("CLIPInverter", load_clipinverter),
    "stylegan2": ("StyleGAN2", load_stylegan2),
    "clip": ("CLIP", load_clip_state_dict),
    "alexnet": ("LPIPS AlexNet", _alexnet_trunk),
}


def _make_bad(kind: str, p: Path) -> str:
    """Write a broken file of ``kind`` at ``p``; return a phrase its message must contain."""
    good = {"state_dict": {"w": torch.randn(64, 64)}, "opts": {}}
    if kind == "missing":
        return "not found"
    if kind == "folder":
        p.mkdir()
        return "folder"
    if kind == "empty":
        p.write_bytes(b"")
        return "empty"
    if kind == "html":
        p.write_bytes(b"\n " + HTML)
        return "HTML page"
    if kind == "truncated":
        torch.save(good, p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        return "truncated"
    if kind == "bitrot":
        torch.save(good, p)
        data = bytearray(p.read_bytes())
        at = data.find(b"data/0") + 300  # inside the tensor's bytes
        data[at : at + 32] = bytes(32)
        p.write_bytes(bytes(data))
        return "corrupt"
    if kind == "random":
        p.write_bytes(b"\x13\x37" + os.urandom(4000))
        return "not a PyTorch checkpoint"
    if kind == "legacy_garbage":
        p.write_bytes(b"\x80" + os.urandom(4000))
        return str(p)
    if kind == "list":
        torch.save([torch.zeros(1)], p)
        return "not a dict"
    if kind == "code":
        torch.save({**good, "x": _Execs(p.with_name("pwned"))}, p)
        return "refused"
    raise AssertionError(kind)


BAD_KINDS = ["missing", "folder", "empty", "html", "truncated", "bitrot", "random",
             "legacy_garbage", "list", "code"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_reports_bad_files_through_the_reader(loader: str, kind: str,
                                                           tmp_path: Path) -> None:
    what, load = LOADERS[loader]
    p = tmp_path / "weights.pt"
    needle = _make_bad(kind, p)
    with pytest.raises(WeightsError) as got:
        load(p)
    with pytest.raises(WeightsError) as direct:
        read_weights(p, what=what)
    msg = str(got.value)
    assert msg == str(direct.value)  # the loader added nothing of its own: one code path
    assert "\n" not in msg and str(p) in msg and needle in msg and msg.startswith(what)
    assert got.value.exit_code == EXIT_WEIGHTS
    assert not p.with_name("pwned").exists()


def test_the_docstring_loader_is_a_few_lines(tmp_path: Path) -> None:
    p = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({"features.0.weight": torch.ones(2), "classifier.1.weight": torch.ones(1)}, p)
    assert list(_alexnet_trunk(p)) == ["features.0.weight"]
    torch.save({"fc.weight": torch.ones(1)}, p)
    with pytest.raises(WeightsError, match="no features"):
        _alexnet_trunk(p)


def test_formats_are_the_callers_choice(clip: dict[str, Path], tmp_path: Path) -> None:
    load_clip_state_dict(clip["openai"])  # now in the safetensors cache: it must not bypass
    assert cached_path(clip["openai"]) is not None  # the format the caller accepts
    with pytest.raises(WeightsError) as err:
        load_e4e(clip["openai"])
    assert "is a TorchScript archive; e4e weights are read from a torch.save checkpoint" \
        in str(err.value)
    with pytest.raises(WeightsError, match="is a torch.save checkpoint; .* TorchScript archive"):
        read_weights(clip["open_clip"], what="x", formats=(TORCHSCRIPT,), cache=False)
    both = (CHECKPOINT, TORCHSCRIPT)
    assert read_weights(clip["openai"], what="x", formats=both, cache=False).keys() \
        >= load_clip_state_dict(clip["open_clip"]).keys()


# ---- CLIP: the allow-list, and --trust-checkpoint ----------------------------------------

def _touch_and_return(marker: str, value: torch.Tensor) -> torch.Tensor:
    Path(marker).touch()
    return value


class _RunsCodeThenTensor:
    """Unpickles by calling a function of this module: code runs, then a real tensor results."""

    def __init__(self, marker: Path, value: torch.Tensor) -> None:
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        return (_touch_and_return, (self.marker, self.value))


def test_clip_pickle_that_runs_code_is_refused_and_loads_with_trust(
        clip: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    sd = load_clip_state_dict(clip["open_clip"])
    sd["logit_scale"] = _RunsCodeThenTensor(marker, sd["logit_scale"])  # type: ignore[assignment]
    evil = tmp_path / "clip-evil.pt"
    torch.save(sd, evil)
    for attempt in (lambda: load_clip_state_dict(evil),
                    lambda: ClipEncoder(str(clip["config"]), evil)):
        with pytest.raises(WeightsError) as err:
            attempt()
        msg = str(err.value)
        assert "_touch_and_return" in msg and "refused" in msg and "--trust-checkpoint" in msg
        assert str(evil) in msg and "\n" not in msg
        assert not marker.exists()
    capsys.readouterr()
    trusted = ClipEncoder(str(clip["config"]), evil, trust=True)
    assert marker.exists()  # the user vouched for it: its pickle ran
    assert "--trust-checkpoint" in capsys.readouterr().err
    clean = ClipEncoder(str(clip["config"]), clip["open_clip"])
    assert torch.equal(trusted.encode_text(["a face"]), clean.encode_text(["a face"]))


def _rewrite_data_pkl(src: Path, dst: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info, data)
    return dst


def test_torchscript_archive_that_would_run_code_is_refused(clip: dict[str, Path],
                                                            tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _rewrite_data_pkl(clip["openai"], tmp_path / "ViT-evil.pt",
                             pickle.dumps(_Execs(marker), protocol=2))
    with pytest.raises(WeightsError) as err:
        load_clip_state_dict(evil)
    msg = str(err.value)
    assert "__builtin__.exec" in msg and "refused" in msg and str(evil) in msg
    assert "\n" not in msg and not marker.exists()


def test_openai_archive_is_read_without_torch_jit(clip: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_jit(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    got = read_weights(clip["openai"], what="CLIP", formats=(TORCHSCRIPT,), cache=False)
    ref = load_clip_state_dict(clip["open_clip"])
    assert int(got["input_resolution"]) == 224
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ---- the TorchScript reader gives what torch.jit.load(...).state_dict() gives -------------

class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("steps", torch.arange(3))
        self.mask = torch.zeros(2, 2)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) + self.mask.sum()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _Block(), _Block()
        self.shared = self.a
        self.scale = nn.Parameter(torch.randn(2).half())
        self.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.a(x) + self.b(x) + self.shared(x))
        return y * self.scale.float().sum()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_reader_matches_torch_jit(how: str, tmp_path: Path) -> None:
    net, path = _Net(), tmp_path / f"{how}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "script":
            torch.jit.script(net).save(str(path))
        else:
            torch.jit.trace(net, torch.ones(1, 3)).save(str(path))
        ref = torch.jit.load(str(path)).state_dict()
    with zipfile.ZipFile(path) as zf:
        got = read_state_dict(zf)
    assert list(got) == list(ref)
    assert "a.mask" not in got
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v) and not got[k].requires_grad, k
