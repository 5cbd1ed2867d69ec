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


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_identity_role_says_either_serves_and_how_to_name_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training a domain that names neither ArcFace nor MoCo: one line saying either serves
    and the exact line to add to the models.toml that defines the domain."""
    from clipinvert.training.build import locate_training_files

    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "cache"))
    for name in ("e.pt", "g.pt", "c.pt", "a.pt"):
        _write(tmp_path / "w" / name, "x")
    toml = _write(tmp_path / "w" / "models.toml",
                  '[domains.dogs]\nresolution = 256\ne4e = "e.pt"\nstylegan2 = "g.pt"\n'
                  'clip = "c.pt"\nlpips = "a.pt"\n')
    reg = Registry.load(toml)
    with pytest.raises(WeightsError) as err:
        locate_training_files(reg, reg.domain("dogs"))
    assert str(err.value) == (
        f"domain 'dogs' ({toml}) names no arcface or moco weights; add "
        'arcface = "/path/to/model_ir_se50.pth" or moco = "/path/to/moco_v2_800ep_pretrain.pth" '
        f"under [domains.dogs] in {toml}, or pass --models FILE")


def test_training_files_missing_say_download_all_and_never_offer_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train` has no --download: the message names `models download faces --all` (training
    files are not in the default set) and where files fetched by hand go."""
    from clipinvert.training.build import locate_training_files

    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("HF_HUB_OFFLINE")  # conftest's; offline messages differ
    reg = Registry.load()
    with pytest.raises(WeightsError) as err:
        locate_training_files(reg, reg.domain("faces"))
    msg = str(err.value)
    assert msg.startswith("5 weight files of domain 'faces' not found: e4e (e4e_ffhq_encode.pt), "
                          "stylegan2 (stylegan2-ffhq-config-f.pt), clip (ViT-B-32.pt), lpips "
                          "(alexnet-owt-7be5be79.pth), arcface (model_ir_se50.pth); looked in ")
    assert "get them all with `clipinvert models download faces --all`;" in msg
    assert f"files fetched by hand go in {tmp_path} under the names above" in msg
    assert str(tmp_path / "config" / "clipinvert" / "models.toml") in msg
    assert "--download" not in msg and "\n" not in msg
    # Editing offers --download (Editor sets the consent flag to False when not given).
    reg.download = False
    with pytest.raises(WeightsError) as err:
        reg.locate_all(reg.domain("faces"), ["e4e", "clipinverter"])
    assert "get them all with `clipinvert models download faces` (or pass --download)" in \
        str(err.value)


def test_failed_downloads_give_each_reason_and_never_advise_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edit --download` (consent given) on a domain whose files cannot be fetched: every
    file's reason in plain words, and no advice to pass --download again."""
    import socket

    monkeypatch.setenv("CLIPINVERT_HOME", str(tmp_path / "cache"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    toml = _write(tmp_path / "models.toml",
                  f'[domains.d]\nresolution = 32\ne4e = "we"\nclipinverter = "wc"\n'
                  f'[weights.we]\nfile = "e.pt"\nurls = ["{url}/e.pt"]\n'
                  f'[weights.wc]\nfile = "c.pt"\nurls = ["{url}/c.pt"]\n')
    monkeypatch.setattr("clipinvert.weights.download.DEFAULT_RETRIES", 0)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # conftest's: this test downloads (from 127.0.0.1)
    reg = Registry.load(toml)
    reg.download = True
    with pytest.raises(WeightsError) as err:
        reg.locate_all(reg.domain("d"), ["e4e", "clipinverter"])
    msg = str(err.value)
    assert msg.startswith("2 weight files of domain 'd' are missing: e4e weights for domain 'd': "
                          "could not download we weights (e.pt): connection refused by "
                          f"127.0.0.1:{port}; or download {url}/e.pt another way (a browser) "
                          f"and put it at {tmp_path / 'cache' / 'e.pt'}, or name your copy "
                          'with path = "/path/to/e.pt" in a [weights.we] table of '), msg
    assert " | clipinverter weights for domain 'd': could not download wc weights" in msg
    assert "--download" not in msg and "\n" not in msg


def test_set_domain_table_adds_replaces_and_keeps_everything_else(tmp_path: Path) -> None:
    from clipinvert.registry import set_domain_table

    user = tmp_path / "models.toml"
    assert set_domain_table(user, "demo", {"resolution": 32, "e4e": "/a/e.pt"}) is False
    assert Registry.load(user).domain("demo").weights["e4e"] == "/a/e.pt"
    text = ('# mine\n[domains.x]  # my domain\nresolution = 64\n\n[domains."demo"]\n'
            'resolution = 16\ne4e = "old"\n# a comment that goes with demo\n'
            '[weights.w]\nfile = "w.pt" # keep\n')
    user.write_text(text, encoding="utf-8")
    assert set_domain_table(user, "demo", {"resolution": 32, "e4e": 'C:\\w "q".pt'}) is True
    new = user.read_text(encoding="utf-8")
    assert new.startswith('# mine\n[domains.x]  # my domain\nresolution = 64\n\n'
                          '[weights.w]\nfile = "w.pt" # keep\n')
    reg = Registry.load(user)
    assert reg.domain("demo").weights["e4e"] == 'C:\\w "q".pt' and reg.domain("x")
    user.write_text("not = [toml", encoding="utf-8")
    with pytest.raises(UsageError, match="not valid TOML"):
        set_domain_table(user, "demo", {"resolution": 32})
    assert user.read_text(encoding="utf-8") == "not = [toml"
