"""``clipinvert serve``'s request layer (clipinvert.serve.app) without a browser or gradio: the
same pixels as ``clipinvert edit``, the caps on uploads and prompts, errors as messages, and
the command itself (its missing-extra line, its safety warnings).  The page in a real browser:
tests/test_serve_browser.py."""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image
from torchrun_helpers import free_port

from clipinvert.cli import SERVE_EXTRA, main
from clipinvert.serve.app import (
    AnimateRequest,
    EditRequest,
    Limits,
    Outcome,
    RequestError,
    Service,
    Upload,
    read_settings,
)

#: Requests batched together: at most this far (grey levels) from the CLI's pixels.  Measured
#: (docs/serve.md#several-users): the encoder's convolutions are not batch-invariant, so a
#: batch's composition moves a few values by one level; a request alone is exactly the CLI's.
BATCHED_BOUND = 1


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
    this process's own temporary folder, a bounded queue with one request at a time."""
    import os
    import tempfile

    from clipinvert.serve import ui

    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # restored after the test
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "")
    ui.offline_environment()
    demo = ui.build(service, queue_size=3)

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    temp = Path(os.environ["GRADIO_TEMP_DIR"])
    assert temp == ui.gradio_temp_dir() and temp.is_dir()  # the same for every page
    assert temp.parent == Path(tempfile.gettempdir()) and temp.name.startswith("clipinvert-")
    assert demo._queue.max_size == 3
    edit = next(f for f in demo.fns.values() if f.api_name == "edit")
    animate = next(f for f in demo.fns.values() if f.api_name == "animate")
    # up to a batch of edits handed to the service at once; animations one at a time
    assert edit.concurrency_limit == service.max_batch == 8 and edit.preprocess is False
    assert animate.concurrency_limit == 1 and not edit.batch
    assert "IBM Plex" not in io.StringIO(str(ui.theme()._stylesheets)).getvalue()


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds (a deadline for a hung test, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_requests_of_several_users_go_through_the_model_together(
        service: Service, photo: Path, face_crop: Image.Image, tiny_models: Path,
        tmp_path: Path, monkeypatch, capsys) -> None:
    """Three users' requests as one batch: the bad upload is its user's one-line message, the
    two others get their results — one encoder call for both photos — within the measured
    bound of the CLI's pixels (and with the CLI's file names, strips and warnings)."""
    other = tmp_path / "portrait.png"
    face_crop.rotate(180).resize((40, 40)).save(other)
    editor = service.editor
    calls: dict[str, list[int]] = {"encode": [], "edit": []}
    encode, edit = editor.encode, editor.edit

    def counting_encode(images):
        calls["encode"].append(len(images))
        return encode(images)

    def counting_edit(images, condition, strength=1.0):
        calls["edit"].append(len(images))
        return edit(images, condition, strength=strength)

    monkeypatch.setattr(editor, "encode", counting_encode)
    monkeypatch.setattr(editor, "edit", counting_edit)
    requests = [EditRequest(upload(photo), "she has wavy blond hair\nhe has a beard",
                            strength=0.7),
                EditRequest(Upload("notes.png", b"this is not an image\n"), "blond hair"),
                EditRequest(upload(other), "a smiling person", strength=0.7)]
    first, bad, third = service.edit_many(requests)
    assert service.batch_sizes[-1] == 3
    assert isinstance(bad, RequestError)
    assert str(bad) == "photo notes.png: not an image file (contents are text)"
    assert isinstance(first, Outcome) and isinstance(third, Outcome)
    assert calls["encode"] == [2]  # both photos in one pass
    assert calls["edit"] == [3]  # three (photo, prompt) edits, one strength: one call
    assert [r.label for r in first.results] == ["she has wavy blond hair", "he has a beard"]
    assert [r.label for r in third.results] == ["a smiling person"]
    assert [p.name for p in first.strips] == ["astronaut-input-inversion-edits.png"]
    assert any("astronaut.jpg" in w and "not square" in w for w in first.warnings)
    assert not third.warnings
    for source, outcome in ((photo, first), (other, third)):
        for result in outcome.results:
            out = tmp_path / "cli" / result.path.stem
            cli_edit(source, out, tiny_models, result.label, "--strength", "0.7")
            capsys.readouterr()
            got = pixels(result.path).astype(int)
            want = pixels(out / f"{source.stem}.png").astype(int)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= BATCHED_BOUND, result.label
            settings = read_settings(result.path)
            assert settings["prompt"] == result.label and settings["strength"] == 0.7


def test_a_batch_edits_each_strength_in_its_own_call(service: Service, photo: Path,
                                                     tiny_models: Path, tmp_path: Path,
                                                     monkeypatch, capsys) -> None:
    """The model takes one strength a call: requests of two strengths are two edit calls
    after one encoder call, and each result is its own strength's."""
    editor = service.editor
    strengths: list[float] = []
    edit = editor.edit

    def counting_edit(images, condition, strength=1.0):
        strengths.append(strength)
        return edit(images, condition, strength=strength)

    monkeypatch.setattr(editor, "edit", counting_edit)
    weak, strong = service.edit_many([EditRequest(upload(photo), "grey hair", strength=0.3),
                                      EditRequest(upload(photo), "grey hair", strength=1.5)])
    assert sorted(strengths) == [0.3, 1.5]
    for outcome, strength in ((weak, 0.3), (strong, 1.5)):
        out = tmp_path / f"cli-{strength}"
        cli_edit(photo, out, tiny_models, "grey hair", "--strength", str(strength))
        capsys.readouterr()
        [result] = outcome.results
        diff = np.abs(pixels(result.path).astype(int) - pixels(out / "astronaut.png"))
        assert diff.max() <= BATCHED_BOUND
    assert not np.array_equal(pixels(weak.results[0].path), pixels(strong.results[0].path))


def test_a_request_alone_in_its_batch_is_the_cli_run(service: Service, photo: Path,
                                                     tiny_models: Path, tmp_path: Path,
                                                     capsys) -> None:
    [alone] = service.edit_many([EditRequest(upload(photo), "a bearded man")])
    assert service.batch_sizes[-1] == 1
    cli_edit(photo, tmp_path / "cli", tiny_models, "a bearded man")
    capsys.readouterr()
    assert np.array_equal(pixels(alone.results[0].path),
                          pixels(tmp_path / "cli" / "astronaut.png"))


def test_requests_that_wait_for_the_model_run_as_one_batch(service: Service,
                                                           photo: Path) -> None:
    """Callers on several threads (the page's handlers): while the model is busy their
    requests wait, then run together; each caller gets its own result, or its own error."""
    requests = [EditRequest(upload(photo), "blond hair"),
                EditRequest(Upload("cut.jpg", photo.read_bytes()[:200]), "blond hair"),
                EditRequest(upload(photo), "a beard")]
    got: dict[int, Outcome | Exception] = {}

    def call(k: int) -> None:
        try:
            got[k] = service.edit(requests[k])
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            got[k] = exc

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(requests))]
    with service.hold():
        for t in threads:
            t.start()
        wait_until(lambda: service.waiting() == len(requests), "three waiting requests")
    for t in threads:
        t.join()
    assert service.batch_sizes[-1] == 3
    assert isinstance(got[0], Outcome) and got[0].results[0].label == "blond hair"
    assert isinstance(got[1], RequestError) and "truncated or corrupt" in str(got[1])
    assert isinstance(got[2], Outcome) and got[2].results[0].label == "a beard"
    assert service.waiting() == 0


def test_a_batch_of_more_than_max_batch_waiting_requests_is_split(tiny_models: Path,
                                                                  photo: Path) -> None:
    from clipinvert import Editor

    svc = Service(Editor("tiny", models=tiny_models, device="cpu"), max_batch=2, keep=2)
    try:
        outs: list[Outcome] = []
        threads = [threading.Thread(target=lambda: outs.append(svc.edit(
            EditRequest(upload(photo), "blond hair")))) for _ in range(3)]
        with svc.hold():
            for t in threads:
                t.start()
            wait_until(lambda: svc.waiting() == 3, "three waiting requests")
        for t in threads:
            t.join()
        assert list(svc.batch_sizes) == [2, 1]
        # every result is still there: a batch never removes the previous batch's folders
        assert len(outs) == 3 and all(o.results[0].path.exists() for o in outs)
    finally:
        svc.close()


def test_a_full_queue_says_so(tiny_models: Path) -> None:
    """The page's queue is bounded: with the model busy, ``max_batch`` requests are with the
    service, ``queue_size`` wait in gradio's queue, and one more is refused as a full queue
    (the page shows gradio's "Queue is full" message)."""
    import json
    import os
    import urllib.error
    import urllib.request

    from clipinvert import Editor
    from clipinvert.serve.ui import launch

    svc = Service(Editor("tiny", models=tiny_models, device="cpu"), max_batch=2)
    with mock.patch.dict(os.environ):  # launch() sets gradio's variables: put back after
        demo, url = launch(svc, port=free_port(), queue_size=1)
        try:
            fn_index = next(k for k, f in demo.fns.items() if f.api_name == "edit")

            def join(k: int) -> int:
                body = {"data": [None, "blond hair", None, 1.0, False, False, False],
                        "fn_index": fn_index, "session_hash": f"user{k}", "event_data": None,
                        "trigger_id": None}
                req = urllib.request.Request(url.rstrip("/") + "/gradio_api/queue/join",
                                             json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310
                        return response.status
                except urllib.error.HTTPError as exc:
                    assert "Queue is full" in exc.read().decode()
                    return exc.code

            with svc.hold():
                for k in range(2):  # with the service, waiting for the model
                    assert join(k) == 200
                    wait_until(lambda k=k: svc.waiting() == k + 1, "a request with the service")
                assert join(2) == 200  # waits in gradio's queue
                assert join(3) == 503  # the queue is full
            wait_until(lambda: svc.waiting() == 0 and len(demo._queue) == 0, "the queue to drain")
        finally:
            demo.close(verbose=False)
            svc.close()


def test_a_batch_on_an_aligning_domain_pastes_back_and_edits_every_face(
        tiny_models: Path, cat_photo: Image.Image, tmp_path: Path, capsys) -> None:
    """Alignment, every face and paste-back in a batch: each request's photo is aligned by
    the CLI's code and its faces pasted back into it as the CLI does (within the batched
    bound), and a photo without a face is its own user's message."""
    from skimage import data

    from clipinvert import Editor

    models = tiny_models.with_name("serve-faces.toml")  # beside the files it names
    models.write_text(tiny_models.read_text().replace("[domains.tiny]", "[domains.tinyfaces]")
                      .replace('align = "none"', 'align = "ffhq"'))
    face = Image.fromarray(data.astronaut()).crop((120, 20, 330, 230))
    pair = Image.new("RGB", (520, 260), (200, 200, 200))
    pair.paste(face, (20, 25))
    pair.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((180, 180)), (300, 40))
    photos = {"astronaut.png": Image.fromarray(data.astronaut()), "pair.png": pair,
              "chelsea.jpg": cat_photo}
    for name, image in photos.items():
        image.save(tmp_path / name)
    svc = Service(Editor("tinyfaces", models=models, device="cpu"), models=models)
    try:
        pasted, faces, cat = svc.edit_many([
            EditRequest(upload(tmp_path / "astronaut.png"), "blond hair", paste_back=True),
            EditRequest(upload(tmp_path / "pair.png"), "blond hair", all_faces=True),
            EditRequest(upload(tmp_path / "chelsea.jpg"), "blond hair")])
        assert isinstance(cat, RequestError) and "no face found in chelsea.jpg" in str(cat)
        assert isinstance(pasted, Outcome) and isinstance(faces, Outcome)
        assert [r.path.name for r in faces.results] == ["pair_face0-blond-hair.png",
                                                        "pair_face1-blond-hair.png"]
        assert len(faces.strips) == 2
        assert pixels(pasted.results[0].path).shape == (512, 512, 3)  # the whole photo
        cases = [(pasted, "astronaut", ["--paste-back"], ["astronaut.png"]),
                 (faces, "pair", ["--all-faces"], ["pair_face0.png", "pair_face1.png"])]
        for outcome, stem, flags, names in cases:
            out = tmp_path / f"cli-{stem}"
            src = tmp_path / next(n for n in photos if n.startswith(stem))
            assert main(["edit", str(src), "blond hair", *flags, "-o", str(out), "--models",
                         str(models), "--domain", "tinyfaces", "--device", "cpu",
                         "--quiet"]) == 0
            capsys.readouterr()
            for result, name in zip(outcome.results, names, strict=True):
                got, want = pixels(result.path).astype(int), pixels(out / name).astype(int)
                assert got.shape == want.shape
                assert np.abs(got - want).max() <= BATCHED_BOUND
    finally:
        svc.close()


TWO_PAGES = """
import os, signal, sys, threading, time, urllib.request
from clipinvert import Editor
from clipinvert.cli import main
from clipinvert.serve.app import Service
from clipinvert.serve.ui import launch

models, first, second = sys.argv[1:]


def page_answers(url):
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=60) as page:
                return page.status == 200
        except OSError:
            assert time.monotonic() < deadline, "the page never answered"
            time.sleep(0.1)


def ctrl_c_when_served():  # as a person at the terminal would, once the command waits
    page_answers(f"http://127.0.0.1:{first}/")
    main_thread = threading.main_thread().ident
    while sys._current_frames()[main_thread].f_code.co_name != "serve":
        time.sleep(0.01)  # still inside launch(): its return, the URL line
    os.kill(os.getpid(), signal.SIGINT)


threading.Thread(target=ctrl_c_when_served, daemon=True).start()
print("serve:", main(["serve", "--models", models, "--domain", "tiny", "--device", "cpu",
                      "--port", first]), flush=True)
service = Service(Editor("tiny", models=models, device="cpu"))
demo, url = launch(service, port=int(second))  # a second page in the same process
assert page_answers(url)
demo.close(verbose=False)
service.close()
"""


def test_a_process_that_serves_two_pages_leaves_no_temporary_files(
        tiny_models: Path, tmp_path: Path) -> None:
    """``clipinvert serve`` stopped by Ctrl-C, then a second page in the same process (as a
    notebook or a test session starts several): gradio reads its temporary folder once per
    process, at its first import, and neither the command nor the second page may leave a
    folder behind.  Everything either page wrote is gone when the process ends."""
    import os
    import subprocess

    temp = tmp_path / "temp"
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADIO_")}
    env |= {"TMPDIR": str(temp), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TWO_PAGES, str(tiny_models),
                           str(free_port()), str(free_port())],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "serve: 130" in done.stdout  # Ctrl-C: the usual exit status of an interrupted command
    assert "server stopped" in done.stderr
    assert sorted(p.relative_to(temp) for p in temp.rglob("*")) == []
