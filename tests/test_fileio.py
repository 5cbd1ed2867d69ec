"""The shared helpers: atomic text/JSON writes and the first line of an error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipinvert import imaging
from clipinvert.errors import first_line
from clipinvert.fileio import atomic_write, atomic_write_json, atomic_write_text


def test_one_atomic_write_for_everyone() -> None:
    assert imaging.atomic_write is atomic_write


def test_text_and_json_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "sub" / "checksums.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text(encoding="utf-8") == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    atomic_write_text(tmp_path / "key", "abc", encoding="ascii")
    assert (tmp_path / "key").read_bytes() == b"abc"

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        atomic_write_json(target, {"c": 3})
    monkeypatch.undo()
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2], "b": 1}
    assert sorted(os.listdir(target.parent)) == ["checksums.json"]


def test_first_line() -> None:
    assert first_line(RuntimeError("\n  torch says this\nand much more\n")) == "torch says this"
    assert first_line(KeyError()) == "KeyError"
    long = first_line(ValueError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")


def test_ctrl_c_right_after_the_temporary_file_is_made_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal lands between bytecodes: even one arriving the instant the temporary file
    exists, before any write, must not leave a .partial file behind (seen once in the Ctrl-C
    test of a real run)."""
    from clipinvert import fileio

    real_close = os.close
    calls = {"n": 0}

    def close(fd: int) -> None:
        real_close(fd)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "close", close)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write(tmp_path / "out.png", lambda tmp: tmp.write_bytes(b"x"))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
