"""`clipinvert models demo`: a random-weight domain, registered without losing the user's
registry, that `edit` then runs on (in-process CLI, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipinvert.cli import main

PHOTO = Path(__file__).parents[1] / "examples" / "astronaut.jpg"
USER_TEXT = '# my own registry — keep this comment\n[weights.mine]\nfile = "mine.pt"  # and this\n'


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private XDG config folder whose registry already has the user's own table."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    user = tmp_path / "config" / "clipinvert" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text(USER_TEXT, encoding="utf-8")
    return user


def test_demo_registers_a_domain_that_edit_runs_on(config: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    demo = tmp_path / "demo"
    assert main(["models", "demo", str(demo)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{demo.resolve() / 'models.toml'}\n"
    assert "random weights — for trying the commands, not real edits" in err
    text = config.read_text(encoding="utf-8")
    assert text.startswith(USER_TEXT)  # the user's lines, comments included, untouched
    assert "[domains.demo]" in text and str(demo.resolve() / "random-e4e.pt") in text
    assert sorted(p.name for p in (demo / "captions").glob("*.txt"))  # for `train --data`

    edited = tmp_path / "edited"
    assert main(["edit", str(PHOTO), "blond hair", "--domain", "demo", "-o", str(edited),
                 "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    assert (edited / "astronaut.png").is_file()
    assert capsys.readouterr().out == f"{edited / 'clipinvert-report.json'}\n"

    assert main(["models", "list", "demo"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 + 8  # header + one line per role (CLIP config aside)
    assert all(" present " in line for line in out.splitlines()[1:])
    assert "demo: random weights — for trying the commands, not real edits" in err


def test_demo_refuses_a_used_folder_and_no_register_leaves_the_registry(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "photo.jpg").write_bytes(b"x")
    assert main(["models", "demo", str(used)]) == 2
    err = capsys.readouterr().err
    assert "already holds 1 entries (photo.jpg)" in err and "--overwrite" in err
    assert main(["models", "demo", str(tmp_path / "x"), "--name", "faces"]) == 2
    assert "hide the packaged domain 'faces'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert main(["models", "demo", str(used), "--overwrite", "--no-register",
                 "--name", "try"]) == 0
    out, err = capsys.readouterr()
    toml = used.resolve() / "models.toml"
    assert out == f"{toml}\n" and (used / "photo.jpg").read_bytes() == b"x"
    assert f"--models {toml} --domain try" in err
    assert config.read_text(encoding="utf-8") == USER_TEXT
    assert "[domains.try]" in toml.read_text(encoding="utf-8")
