"""``clipinvert serve``'s request layer (clipinvert.serve.app) without a browser or gradio: the
same pixels as ``clipinvert edit``, the caps on uploads and prompts, errors as messages, and
the command itself (its missing-extra line, its safety warnings).  The page in a real browser:
tests/test_serve_browser.py."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipinvert.cli import SERVE_EXTRA, main
from clipinvert.serve.app import (
    AnimateRequest,
    EditRequest,
    Limits,
    RequestError,
    Service,
    Upload,
    read_settings,
)


@pytest.fixture(scope="module")
def service(tiny_models: Path):
    from clipinvert import Editor

    svc = Service(Editor("tiny", models=tiny_models, device="cpu"), models=tiny_models, keep=3)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory, face_crop: Image.Image) -> Path:
    """A small non-square JPEG (the tiny domain stretches it, as the CLI does, with a warning)."""
    path = tmp_path_factory.mktemp("serve") / "astronaut.jpg"
    face_crop.resize((48, 40)).save(path, quality=90)
    return path


def upload(path: Path) -> Upload:
    return Upload(path.name, path.read_bytes())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def cli_edit(photo: Path, out: Path, models: Path, *args: str) -> None:
    assert main(["edit", str(photo), *args, "-o", str(out), "--models", str(models),
                 "--domain", "tiny", "--device", "cpu", "--quiet"]) == 0


def test_a_request_gives_the_cli_pixels_and_carries_its_settings(
        service: Service, photo: Path, tiny_models: Path, tmp_path: Path, capsys) -> None:
    prompts = ["she has wavy blond hair", "he has a beard"]
    out = service.edit(EditRequest(upload(photo), "\n".join([prompts[0], "# a comment", "",
                                                             prompts[1]]), strength=0.7))
    assert [r.label for r in out.results] == prompts
    assert [p.name for p in out.strips] == ["astronaut-input-inversion-edits.png"]
    assert pixels(out.strips[0]).shape[1] == 4 * 32  # four 32 px tiles
    assert any("not square" in w and "astronaut.jpg" in w for w in out.warnings)
    assert not any(str(service.root) in w for w in out.warnings)  # no server path shown
    for prompt, result in zip(prompts, out.results, strict=True):
        cli_edit(photo, tmp_path / result.path.stem, tiny_models, prompt, "--strength", "0.7")
        capsys.readouterr()
        expected = tmp_path / result.path.stem / "astronaut.png"
        assert np.array_equal(pixels(result.path), pixels(expected))
        settings = read_settings(result.path)
        assert settings["prompt"] == prompt and settings["strength"] == 0.7
        assert settings["domain"] == "tiny"
        assert set(settings["models"]) == {"e4e", "clipinverter", "clip"}
        assert all(len(m["sha256"]) == 64 for m in settings["models"].values())
        assert settings["command"].startswith(f"clipinvert edit astronaut.jpg '{prompt}'")
    assert out.commands == [read_settings(r.path)["command"] for r in out.results]


def test_a_reference_image_is_a_condition(service: Service, photo: Path, face_crop,
                                          tmp_path: Path, tiny_models: Path, capsys) -> None:
    ref = tmp_path / "look.png"
    face_crop.rotate(90).resize((40, 40)).save(ref)
    out = service.edit(EditRequest(upload(photo), reference=upload(ref)))
    [result] = out.results
    assert result.label == "ref:reference.png"
    assert read_settings(result.path)["reference"] == "look.png"
    assert "--ref-image look.png" in out.commands[0]
    cli_edit(photo, tmp_path / "cli", tiny_models, "--ref-image", str(ref))
    capsys.readouterr()
    assert np.array_equal(pixels(result.path), pixels(tmp_path / "cli" / "astronaut.png"))


def test_bad_uploads_are_one_line_messages_and_the_next_request_works(
        service: Service, photo: Path, tmp_path: Path) -> None:
    text = Upload("notes.png", b"this is not an image\n")
    with pytest.raises(RequestError, match=r"photo notes.png: not an image file \(contents are "
                                           r"text\)"):
        service.edit(EditRequest(text, "blond hair"))
    with pytest.raises(RequestError, match="upload a photo"):
        service.edit(EditRequest(None, "blond hair"))
    with pytest.raises(RequestError, match="type a prompt"):
        service.edit(EditRequest(upload(photo), "  \n# only a comment"))
    broken = Upload("cut.jpg", photo.read_bytes()[:200])
    with pytest.raises(RequestError, match="truncated or corrupt"):
        service.edit(EditRequest(broken, "blond hair"))
    with pytest.raises(RequestError, match="reference image"):
        service.edit(EditRequest(upload(photo), reference=text))
    assert service.edit(EditRequest(upload(photo), "blond hair")).results


def test_the_caps(tiny_models: Path, photo: Path) -> None:
    from clipinvert import Editor

    small = Limits(max_bytes=2000, max_pixels=1000, max_prompts=2, max_prompt_chars=10,
                   max_steps=4)
    svc = Service(Editor("tiny", models=tiny_models, device="cpu"), limits=small)
    try:
        big = Upload("big.png", b"\x89PNG" + bytes(3000))
        with pytest.raises(RequestError, match=r"photo: 3.0 kB, the limit is 2.0 kB"):
            svc.edit(EditRequest(big, "x"))
        with pytest.raises(RequestError, match=r"image too large: 48x40 \(limit 1,000 pixels\)"):
            svc.edit(EditRequest(upload(photo), "x"))
        with pytest.raises(RequestError, match="3 prompts: at most 2"):
            svc.edit(EditRequest(upload(photo), "a\nb\nc"))
        with pytest.raises(RequestError, match="a prompt of 11 characters: at most 10"):
            svc.edit(EditRequest(upload(photo), "x" * 11))
        with pytest.raises(RequestError, match="steps: 2 to 4"):
            svc.animate(AnimateRequest(upload(photo), "x", steps=5))
        with pytest.raises(RequestError, match="animation format 'avi'"):
            svc.animate(AnimateRequest(upload(photo), "x", steps=3, formats=("avi",)))
    finally:
        svc.close()
    assert not svc.root.exists()


def test_no_name_from_the_client_becomes_a_path(service: Service, photo: Path) -> None:
    """A hostile file name is only ever a label: the upload is stored under a slug of it."""
    hostile = Upload("../../../../tmp/evil/compare.JPG", photo.read_bytes())
    out = service.edit(EditRequest(hostile, "blond hair"))
    [result] = out.results
    assert result.path.is_relative_to(service.root)
    assert result.path.name == "photo-blond-hair.png"  # "compare" is the job's own folder
    assert not Path("/tmp/evil").exists()


def test_paste_back_needs_an_aligning_domain(service: Service, photo: Path) -> None:
    with pytest.raises(Exception, match="--paste-back needs face alignment"):
        service.edit(EditRequest(upload(photo), "blond hair", paste_back=True))


def test_animation_frames_walk_from_the_inversion_to_the_edit(service: Service, photo: Path,
                                                              tmp_path: Path) -> None:
    out = service.animate(AnimateRequest(upload(photo), "a bearded man", steps=3,
                                         formats=("gif", "mp4"), strength=0.5))
    assert [r.label for r in out.results] == [f"a bearded man × {a:.2f}"
                                              for a in (0.0, 0.25, 0.5)]
    assert sorted(p.suffix for p in out.animations) == [".gif", ".mp4"]
    with Image.open(next(p for p in out.animations if p.suffix == ".gif")) as gif:
        assert gif.n_frames == 3
    edit = service.edit(EditRequest(upload(photo), "a bearded man", strength=0.5))
    assert np.array_equal(pixels(out.results[-1].path), pixels(edit.results[0].path))
    assert "clipinvert interpolate" in out.commands[0] and "--steps 3" in out.commands[0]
    with pytest.raises(RequestError, match="one prompt or one reference image, not 2"):
        service.animate(AnimateRequest(upload(photo), "a\nb"))


def test_old_requests_folders_go_and_close_removes_everything(tiny_models: Path,
                                                              photo: Path) -> None:
    from clipinvert import Editor

    svc = Service(Editor("tiny", models=tiny_models, device="cpu"), keep=2)
    paths = [svc.edit(EditRequest(upload(photo), "blond hair")).results[0].path
             for _ in range(3)]
    assert [p.exists() for p in paths] == [False, True, True]
    svc.close()
    assert not svc.root.exists()


def test_missing_weights_are_named_with_the_command_that_gets_them(tmp_path: Path,
                                                                   photo: Path) -> None:
    from clipinvert import Editor

    svc = Service(Editor("faces", device="cpu", offline=True))  # conftest: an empty cache
    try:
        status = svc.status()
        assert status.problem is not None and "clipinvert models download faces" in \
            status.problem
        assert status.files["e4e"] is None
        assert svc.preload() is not None  # the reason, not an exception
    finally:
        svc.close()


def test_the_status_names_the_domain_and_its_files(service: Service, tiny_models: Path) -> None:
    from clipinvert.serve.app import describe

    status = service.status()
    assert status.problem is None
    assert status.files["e4e"] == tiny_models.parent / "tiny-e4e.pt"
    lines = describe(status)
    assert lines[0].startswith("domain tiny (32 px, align none, cpu)")
    assert f"e4e: {tiny_models.parent / 'tiny-e4e.pt'}" in lines


def test_serve_without_the_extra_says_how_to_get_it(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    assert main(["serve", "--domain", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == SERVE_EXTRA
    assert SERVE_EXTRA == 'clipinvert serve needs the web extra: pip install "clipinvert[serve]"'


def test_the_page_builds_offline(service: Service, monkeypatch) -> None:
    """The gradio page over the service, built without serving it: no analytics, uploads in
    the service's folder, a bounded queue with one request at a time."""
    from clipinvert.serve import ui

    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # restored after the test
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "")
    ui.offline_environment(service)
    demo = ui.build(service, queue_size=3)
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert Path(os.environ["GRADIO_TEMP_DIR"]).is_relative_to(service.root)
    assert demo._queue.max_size == 3
    edit = next(f for f in demo.fns.values() if f.api_name == "edit")
    assert edit.concurrency_limit == 1 and edit.preprocess is False
    assert "IBM Plex" not in io.StringIO(str(ui.theme()._stylesheets)).getvalue()
