"""models.toml: schema, merging, relative paths, lookups and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipinvert.errors import UsageError, WeightsError
from clipinvert.registry import PACKAGED_REGISTRY, Registry, cache_dir


def test_packaged_registry_has_the_paper_domains() -> None:
    reg = Registry.load()
    assert {"faces", "cats", "birds"} <= set(reg.domains)
    faces = reg.domain("faces")
    assert faces.resolution == 1024 and faces.align == "ffhq"
    assert faces.clip_arch == "ViT-B-32-quickgelu"
    for role in ("clip", "e4e", "clipinverter"):
        entry = reg.weights[faces.weights[role]]
        assert entry.urls, role
    assert reg.weights["clipinverter-faces"].file == "pretrained_faces.pt"
    assert "train" in (reg.domain("cats").note or "")
    assert (Path(__file__).parents[1] / "models.toml").resolve() == PACKAGED_REGISTRY.resolve()


def test_missing_weights_say_where_and_how(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path))
    reg = Registry.load()
    with pytest.raises(WeightsError) as err:
        reg.locate(reg.domain("faces"), "e4e")
    msg = str(err.value)
    assert str(tmp_path / "e4e_ffhq_encode.pt") in msg and "drive.google.com" in msg
    (tmp_path / "e4e_ffhq_encode.pt").write_bytes(b"x")
    assert reg.locate(reg.domain("faces"), "e4e") == tmp_path / "e4e_ffhq_encode.pt"
    with pytest.raises(WeightsError, match="train"):
        reg.locate(reg.domain("cats"), "clipinverter")


def test_extra_registry_merges_and_paths_are_relative_to_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "mine"
    sub.mkdir()
    (sub / "e.pt").write_bytes(b"x")
    toml = sub / "models.toml"
    toml.write_text('[domains.dogs]\nresolution = 256\nalign = "none"\ne4e = "e.pt"\n'
                    '[domains.faces]\nresolution = 1024\nalign = "ffhq"\ne4e = "/abs/e4e.pt"\n')
    monkeypatch.chdir(tmp_path)
    reg = Registry.load(toml)
    assert reg.locate(reg.domain("dogs"), "e4e") == sub / "e.pt"
    assert reg.domain("faces").weights["e4e"] == "/abs/e4e.pt"  # overridden table
    assert "cats" in reg.domains  # packaged tables are kept
    monkeypatch.setenv("CLIPINVERT_MODELS", str(toml))
    assert "dogs" in Registry.load().domains


def test_user_config_registry_is_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "clipinvert").mkdir()
    (tmp_path / "clipinvert" / "models.toml").write_text(
        '[domains.horses]\nresolution = 256\nalign = "none"\n')
    reg = Registry.load()
    assert reg.domain("horses").source == (tmp_path / "clipinvert" / "models.toml").resolve()


@pytest.mark.parametrize("text", ['[domains.x]\nalign = "ffhq"\n',
                                  '[domains.x]\nresolution = 64\nalign = "dlib"\n',
                                  "this is = not toml [",
                                  "[weights.y]\nurls = []\n"])
def test_bad_registry_is_a_usage_error(text: str, tmp_path: Path) -> None:
    p = tmp_path / "models.toml"
    p.write_text(text)
    with pytest.raises(UsageError) as err:
        Registry.load(p)
    assert "\n" not in str(err.value).strip()


def test_unknown_domain_and_missing_file() -> None:
    with pytest.raises(UsageError, match="known: .*faces"):
        Registry.load().domain("unicorns")
    with pytest.raises(UsageError, match="not found"):
        Registry.load("/nonexistent/models.toml")


def test_cache_dir_honours_clipinvert_home(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("CLIPINVERT_HOME")
    assert cache_dir().name == "clipinvert"
