"""``clipinvert models import``: NVlabs generators → rosinality layout, numerics equal NVlabs'.

Golden numbers.  The pickles here are hand-built by :mod:`clipinvert.testing.nvlabs` in NVlabs'
structure, without NVlabs' code.  The reference values were computed once, on a CPU, with
NVlabs' own networks: ``training/networks.py`` of NVlabs/stylegan2-ada-pytorch at commit
d72cc7d041b42ec8e806021a205ed9349f87c6a4 (and ``training/networks_stylegan2.py`` of
NVlabs/stylegan3 at c233a919a6faee6e36a316ddd4eddababad1adf9, giving the same numbers), unpatched
except stylegan3's ``pkg_resources`` import (→ ``packaging.version``) for a newer Python.  For
each spec: ``G = networks.Generator(**spec.init_kwargs())``, ``G.load_state_dict(
nvlabs_state_dict(spec, 0))``, ``z = torch.randn(2, w_dim, generator=manual_seed(7))``,
``ws = G.mapping(z, None)``, ``img = G.synthesis(ws, noise_mode='const')`` (truncation 1, float32,
their ops' reference CPU paths).  The same run checked that (a) our reader gives identical
tensors for a pickle written by NVlabs' own ``persistence`` module, (b) NVlabs'
``legacy.convert_tf_generator`` on :func:`write_tf_pickle`'s ``Gs`` reproduces ``img`` exactly,
(c) the converted file loads strictly in rosinality's ``Generator(64, 64, n_mlp=2,
channel_multiplier=2)`` (a 64 px spec with NVlabs' channel table; rosinality commit
bef283a1) and matches NVlabs' image to 7e-6.  The converted generator matched NVlabs to
<= 5e-6 everywhere (image max |x| ≈ 8).

* default spec (32 px, w_dim 64, 2 mapping layers, conv_clamp 256 — never reached here);
* ``conv_clamp=1.0``: the clamp triggers (without it the image differs by 6.2);
* StyleGAN3-repository layout, 3 mapping layers, ``lr_multiplier=0.1`` (the rescale path).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clipinvert.checkpoints import load_stylegan2
from clipinvert.cli import main
from clipinvert.testing.models import tiny_config, write_stylegan2
from clipinvert.testing.nvlabs import (
    NVSpec,
    _module_state,
    _Persistent,
    dump_nvlabs,
    generator_record,
    nvlabs_state_dict,
    write_snapshot,
    write_tf_pickle,
)

PIXELS = [(0, 0, 0, 0), (1, 2, 31, 17), (0, 1, 13, 5), (1, 0, 20, 30)]
W_INDEX = [(0, 0), (0, 5), (1, 63), (1, 17)]
GOLDEN = {
    "default": {"ws": [0.058882, 1.206166, 0.112951, -0.073936],
                "img": [0.366555, -1.094768, -1.054292, 0.17487], "mean": 0.478336},
    "clamp1": {"ws": [0.058882, 1.206166, 0.112951, -0.073936],
               "img": [0.2477, 0.033501, -0.81994, 0.62527], "mean": 0.128284},
    "sg3_lr01": {"ws": [-0.286975, -0.228589, 0.287427, -0.124597],
                 "img": [-0.263535, 1.221676, -0.33463, -2.294841], "mean": -1.03614},
}
SPECS = {"default": NVSpec(), "clamp1": NVSpec(conv_clamp=1.0),
         "sg3_lr01": NVSpec(stylegan3=True, mapping_layers=3, lr_multiplier=0.1)}


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for var in ("CLIPINVERT_OFFLINE", "HF_HUB_OFFLINE", "CLIPINVERT_MODELS"):
        monkeypatch.delenv(var, raising=False)


def run_import(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main(["models", "import", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def check_golden(out: Path, name: str) -> torch.nn.Module:
    g, avg = load_stylegan2(out)
    spec = SPECS[name]
    z = torch.randn(2, spec.w_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        w = g.mapping(z)
        img = g(w)
    gold = GOLDEN[name]
    got_w = [float(w[i, j]) for i, j in W_INDEX]
    np.testing.assert_allclose(got_w, gold["ws"], atol=2e-6)
    np.testing.assert_allclose([float(img[p]) for p in PIXELS], gold["img"], atol=2e-5)
    assert float(img.mean()) == pytest.approx(gold["mean"], abs=2e-5)
    torch.testing.assert_close(avg, nvlabs_state_dict(spec)["mapping.w_avg"])  # w_avg kept
    return g


@pytest.mark.parametrize("name", list(SPECS))
def test_snapshot_import_equals_nvlabs_forward(name: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = write_snapshot(tmp_path / "network-snapshot-000100.pkl", SPECS[name])
    out = tmp_path / "out" / "g.pt"
    rc, stdout, err = run_import(capsys, src, "-o", out)
    assert rc == 0, err
    assert stdout == f"{out}\n"  # the result on stdout, notes on stderr
    assert "32 px" in err and f"{SPECS[name].mapping_layers} mapping layers" in err
    g = check_golden(out, name)
    assert g.config.n_mlp == SPECS[name].mapping_layers
    ckpt = torch.load(out, weights_only=True)
    info = ckpt["clipinvert_import"]
    assert info["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert info["conversion"].startswith("clipinvert-nvlabs-to-rosinality")
    assert ckpt["conv_clamp"] == SPECS[name].conv_clamp
    assert info["format"] == ("StyleGAN3 repository (stylegan2 networks)"
                              if SPECS[name].stylegan3 else "StyleGAN2-ADA-PyTorch")


def test_clamp_is_what_makes_the_clamped_file_match(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.pt"
    src = write_snapshot(tmp_path / "s.pkl", SPECS["clamp1"])
    assert run_import(capsys, src, "-o", out)[0] == 0
    g, _ = load_stylegan2(out)
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        clamped = g(g.mapping(z))
        unclamped = g.set_conv_clamp(None)(g.mapping(z))
    assert (clamped - unclamped).abs().max() > 1.0
    assert float(clamped[PIXELS[1]]) == pytest.approx(GOLDEN["clamp1"]["img"][1], abs=2e-5)


def test_tensorflow_pickle_equals_nvlabs_legacy_conversion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NVlabs' legacy.py conversion of this TF pickle gave exactly the default golden image."""
    out = tmp_path / "tf.pt"
    rc, _, err = run_import(capsys, write_tf_pickle(tmp_path / "tf.pkl", NVSpec()), "-o", out)
    assert rc == 0, err
    assert "TensorFlow StyleGAN2-ADA" in err
    check_golden(out, "default")
    # the same weights through the PyTorch-pickle path give the same tensors
    pt = tmp_path / "pt.pt"
    assert run_import(capsys, write_snapshot(tmp_path / "s.pkl", NVSpec()), "-o", pt)[0] == 0
    a, b = torch.load(out, weights_only=True), torch.load(pt, weights_only=True)
    assert a["g_ema"].keys() == b["g_ema"].keys()
    for k in a["g_ema"]:
        torch.testing.assert_close(a["g_ema"][k], b["g_ema"][k], rtol=0, atol=0)


def test_tf_pickle_version_4_without_clamp(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tf4.pt"
    src = write_tf_pickle(tmp_path / "tf4.pkl", NVSpec(conv_clamp=None))
    rc, _, err = run_import(capsys, src, "-o", out)
    assert rc == 0, err
    ckpt = torch.load(out, weights_only=True)
    assert "conv_clamp" not in ckpt and ckpt["clipinvert_import"]["format"].endswith("StyleGAN2")
    check_golden(out, "default")  # 256 never triggers here: the same numbers


def test_rosinality_file_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_stylegan2(tmp_path / "r.pt", tiny_config())
    out = tmp_path / "copy.pt"
    rc, _, err = run_import(capsys, src, "-o", out)
    assert rc == 0, err
    a, b = torch.load(src, weights_only=True), torch.load(out, weights_only=True)
    for k, v in a["g_ema"].items():
        assert torch.equal(v, b["g_ema"][k])
    torch.testing.assert_close(a["latent_avg"], b["latent_avg"])
    assert b["clipinvert_import"]["format"] == "rosinality"


# ---- never running pickled code --------------------------------------------------------------

def test_embedded_module_source_is_never_run(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    evil = f"open({str(marker)!r}, 'w').write('ran')\nimport os\nos.system('touch {marker}')\n"
    src = write_snapshot(tmp_path / "evil.pkl", NVSpec(), module_src=evil)
    rc, _, err = run_import(capsys, src, "-o", tmp_path / "g.pt")
    assert rc == 0, err
    assert not marker.exists()
    check_golden(tmp_path / "g.pt", "default")


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("kind", ["system", "exec", "protocol0"])
def test_code_globals_are_refused_by_name(kind: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pkl"
    if kind == "protocol0":  # GLOBAL opcode, as hand-written exploits use
        src.write_bytes(b"\x80\x02cposix\nsystem\n(V" + f"touch {marker}".encode()
                        + b"\ntR.")
        name = "posix.system"
    else:
        payload = _System(marker) if kind == "system" else _Exec(marker)
        # inside a snapshot, next to a real G_ema record
        dump_nvlabs({"G_ema": generator_record(NVSpec(), nvlabs_state_dict(NVSpec())),
                     "augment_pipe": payload}, src)
        name = "posix.system" if kind == "system" else "builtins.exec"
    out = tmp_path / "g.pt"
    rc, stdout, err = run_import(capsys, src, "-o", out)
    assert rc == 3 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "refused" in lines[0], err
    assert not marker.exists() and not out.exists()


# ---- refusals ------------------------------------------------------------------------------

def _state(rec: _Persistent, *path: str) -> dict:
    for name in path:
        rec = rec.meta["state"]["_modules"][name]
    return rec.meta["state"]


def _conditional(rec: _Persistent) -> None:
    rec.meta["state"]["_init_kwargs"]["c_dim"] = 10


def _embed(rec: _Persistent) -> None:
    _state(rec, "mapping")["_modules"]["embed"] = _Persistent(
        "FullyConnectedLayer", _module_state({"weight": torch.ones(64, 10)}, {}, {}, {}, {}), "")


def _resnet(rec: _Persistent) -> None:
    _state(rec, "synthesis", "b8")["_modules"]["skip"] = _Persistent(
        "Conv2dLayer", _module_state({"weight": torch.ones(32, 32, 1, 1)}, {}, {}, {}, {}), "")


def _orig(rec: _Persistent) -> None:
    del _state(rec, "synthesis", "b8")["_modules"]["torgb"]


def _stylegan3(rec: _Persistent) -> None:
    _state(rec, "synthesis")["_modules"]["L0_36_512"] = _Persistent(
        "SynthesisLayer", _module_state({"weight": torch.ones(4, 4, 1, 1)}, {}, {}, {}, {}), "")


@pytest.mark.parametrize(("edit", "words"), [
    (_conditional, "conditional generator"), (_embed, "conditional generator"),
    (_resnet, "'resnet' architecture"), (_orig, "'orig' architecture"),
    (_stylegan3, "StyleGAN3-T/R")])
def test_unsupported_generators_are_refused(edit, words: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rec = generator_record(NVSpec(), nvlabs_state_dict(NVSpec()))
    edit(rec)
    src = write_snapshot(tmp_path / "s.pkl", NVSpec(), g_ema=rec)
    out = tmp_path / "g.pt"
    rc, stdout, err = run_import(capsys, src, "-o", out)
    lines = err.strip().splitlines()
    assert rc == 3 and stdout == "" and len(lines) == 1, err
    assert words in lines[0] and str(src) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"extra_synthesis": {"8x8/Skip/weight": np.ones((1, 1, 32, 32), np.float32)}},
     "'resnet' architecture"),
    ({"static_kwargs": {"label_size": 10}}, "conditional generator"),
    ({"static_kwargs": {"architecture": "orig"}}, "'orig' architecture")])
def test_unsupported_tf_generators_are_refused(kwargs: dict, words: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = write_tf_pickle(tmp_path / "tf.pkl", NVSpec(), **kwargs)
    rc, _, err = run_import(capsys, src, "-o", tmp_path / "g.pt")
    assert rc == 3 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "g.pt").exists()


def test_files_that_are_none_of_the_formats(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    only_g = dump_nvlabs({"G": generator_record(NVSpec(), nvlabs_state_dict(NVSpec()))},
                         tmp_path / "g_only.pkl")
    plain = tmp_path / "list.pkl"
    plain.write_bytes(pickle.dumps([1, 2, 3]))
    other = tmp_path / "sd.pt"
    torch.save({"state_dict": {"x": torch.ones(1)}}, other)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x04\x95garbage")
    for src, words in ((only_g, "no G_ema"), (plain, "not an NVlabs network snapshot"),
                       (other, "no 'g_ema'"), (junk, "truncated or corrupt"),
                       (tmp_path / "missing.pkl", "not found")):
        rc, _, err = run_import(capsys, src, "-o", tmp_path / "g.pt")
        assert rc == 3 and len(err.strip().splitlines()) == 1 and words in err, (src, err)
    assert not (tmp_path / "g.pt").exists()


# ---- registering the result --------------------------------------------------------------

def test_domain_new_in_models_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clipinvert.registry import Registry

    toml = tmp_path / "reg" / "models.toml"
    toml.parent.mkdir()
    toml.write_text("# mine\n[domains.other]\nresolution = 64\n", encoding="utf-8")
    out = tmp_path / "horses.pt"
    rc, _, err = run_import(capsys, write_snapshot(tmp_path / "s.pkl"), "-o", out,
                            "--domain", "horses", "--models", toml)
    assert rc == 0, err
    reg = Registry.load(toml)
    horses = reg.domain("horses")
    assert horses.resolution == 32 and horses.weights == {"stylegan2": str(out.resolve())}
    assert reg.domain("other").resolution == 64 and "# mine" in toml.read_text()
    g, _ = load_stylegan2(reg.locate(horses, "stylegan2"))
    assert g.size == 32


def test_domain_cats_keeps_the_packaged_table(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A table replaces the packaged one whole: every other role of cats survives."""
    from clipinvert.registry import PACKAGED_REGISTRY, Registry, user_registry

    packaged = Registry.load(PACKAGED_REGISTRY, user=False).domain("cats")
    out = tmp_path / "cats.pt"
    rc, _, err = run_import(capsys, write_snapshot(tmp_path / "s.pkl"), "-o", out,
                            "--domain", "cats")
    assert rc == 0, err
    assert user_registry().is_file()
    cats = Registry.load().domain("cats")
    assert cats.source == user_registry().resolve()
    assert cats.weights["stylegan2"] == str(out.resolve())
    assert cats.resolution == 32  # the imported file's size
    for role in ("clip", "moco", "lpips", "inception"):
        assert cats.weights[role] == packaged.weights[role]
    # plain relative paths of the packaged table now point where they did
    assert Path(cats.weights["e4e"]) == (packaged.base_dir / packaged.weights["e4e"]).resolve()
    assert cats.note == packaged.note and cats.clip_arch == packaged.clip_arch
    rc = main(["models", "list", "cats"])
    listing = capsys.readouterr().out
    row = next(ln for ln in listing.splitlines() if " stylegan2 " in ln)
    assert rc == 0 and "present" in row and str(out.resolve()) in row


def test_register_role_rejects_unknown_roles(tmp_path: Path) -> None:
    from clipinvert.errors import UsageError
    from clipinvert.registry import register_role

    with pytest.raises(UsageError, match="unknown role"):
        register_role(tmp_path / "m.toml", "x", "generator", "g.pt", resolution=32)
    with pytest.raises(UsageError, match="resolution must be given"):
        register_role(tmp_path / "m.toml", "x", "stylegan2", "g.pt")


# ---- models download converts -------------------------------------------------------------

def test_packaged_cats_names_the_nvlabs_pickle() -> None:
    from clipinvert.registry import Registry

    reg = Registry.load()
    entry = reg.weights[reg.domain("cats").weights["stylegan2"]]
    assert entry.convert == "nvlabs"
    assert entry.urls == ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/"
                          "afhqcat.pkl",)
    assert "birds" in reg.domains and "stylegan2" not in reg.domain("birds").weights


def test_download_converts_the_pickle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_snapshot(tmp_path / "afhqcat.pkl", NVSpec())
    toml = tmp_path / "m.toml"
    toml.write_text(f'[weights.stylegan2-afhqcat]\nfile = "stylegan2-afhqcat.pt"\n'
                    f'urls = ["{src.as_uri()}"]\nconvert = "nvlabs"\n', encoding="utf-8")
    rc = main(["models", "download", "stylegan2-afhqcat", "--models", str(toml), "--quiet"])
    cap = capsys.readouterr()
    final = tmp_path / "home" / "stylegan2-afhqcat.pt"
    assert rc == 0, cap.err
    assert cap.out == f"{final}\n"
    check_golden(final, "default")
    assert not list((tmp_path / "home").glob("*.pkl"))
    rc = main(["models", "verify", "stylegan2-afhqcat", "--models", str(toml), "--json"])
    checks = capsys.readouterr().out
    assert rc == 0 and '"status": "ok"' in checks  # the converted file's recorded checksum
    # a payload that is no generator is refused, and nothing is left behind
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"hello": 1}))
    toml.write_text(f'[weights.bad]\nfile = "bad.pt"\nurls = ["{bad.as_uri()}"]\n'
                    'convert = "nvlabs"\n', encoding="utf-8")
    rc = main(["models", "download", "bad", "--models", str(toml), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "cannot be converted" in err
    assert not (tmp_path / "home" / "bad.pt").exists()
    assert not (tmp_path / "home" / ".partial").exists()
