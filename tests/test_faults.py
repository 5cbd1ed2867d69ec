"""Faults of a run rather than of an input: a full disk, a corrupt record of a killed run,
output names that are not folders, empty inputs, non-square inputs, how failures name inputs.

A full disk is made two ways: by injecting ENOSPC at the writer (always runs), and for real on a
small tmpfs (runs where this process may mount one, i.e. as root on Linux).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipinvert.batch import Crop, OutputWriter, Prepared, RunOptions, run_folder
from clipinvert.errors import DiskFullError, UsageError
from clipinvert.fileio import append_line, atomic_write, remove_stale_temps
from clipinvert.manifest import MANIFEST_NAME, Manifest
from clipinvert.naming import check_output_folder

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    return d


def _noise(seed: int, side: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))


class Job:
    """A folder job whose 'model' writes one PNG per input through the real writers."""

    def __init__(self, out: Path, threads: int = 0, side: int = 8) -> None:
        self.opts = RunOptions(output=out, batch_size=1, quiet=True,
                               writer=OutputWriter(threads))
        self.side, self.calls = side, 0

    def outputs_for(self, crop: Crop) -> list[Path]:
        return [self.opts.image_path(crop.rel)]

    def process(self, crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        self.calls += 1
        written = []
        for c in crops:
            p = self.opts.image_path(c.rel)
            image = c.image if self.side <= 8 else _noise(int(c.rel.name), self.side)
            self.opts.save(image, p)
            written.append([p])
        return written

    def run(self, inputs: Path):
        return run_folder("t", inputs, self.opts, {}, self.outputs_for, self.process)


def _state(out: Path) -> dict[str, tuple[int, int]]:
    """Every output image with its (inode, mtime_ns): what a rerun must not touch."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}


def _assert_whole(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    for png in out.rglob("*.png"):
        with Image.open(png) as im:
            im.load()


def _finish_and_check(out: Path, inputs: Path, before: dict[str, tuple[int, int]]) -> None:
    """The same command again: it finishes the rest and rewrites nothing finished."""
    rep = Job(out).run(inputs)
    assert rep.count("skipped") == len(before) and rep.count("done") == 6 - len(before)
    after = _state(out)
    assert len(after) == 6 and {k: after[k] for k in before} == before
    _assert_whole(out)


# ---------------------------------------------------------------------------------------------
# A full disk, injected at the writer
# ---------------------------------------------------------------------------------------------
def _no_room_for_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing a report's temporary file fails with ENOSPC (everything else still fits)."""
    real_write = Path.write_text

    def write_text(self: Path, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".clipinvert-report.json."):
            raise ENOSPC
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("threads", [0, 2])
def test_disk_full_writing_an_output_stops_the_run_and_a_rerun_finishes(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    real_save, real_write = Image.Image.save, Path.write_bytes

    def save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if Path(str(fp)).name.startswith(".2.png."):  # the temporary file of output 2
            real_write(Path(str(fp)), b"\x89PNG half")  # some bytes made it before the error
            raise ENOSPC
        real_save(self, fp, *args, **kwargs)

    def write_bytes(self: Path, data: bytes) -> int:  # fpng's PNG: its bytes, then the write
        if self.name.startswith(".2.png."):
            real_write(self, b"\x89PNG half")
            raise ENOSPC
        return real_write(self, data)

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "out"
    job = Job(out, threads)
    with pytest.raises(DiskFullError) as info:
        job.run(folder)
    done = len(_state(out))
    assert done in (2, 3)  # 0 and 1; with writer threads 3 may be written meanwhile
    assert str(info.value) == (
        f"disk full writing {out / '2.png'} (No space left on device): {done} of 6 inputs "
        "done; free space and run the same command again to finish the rest")
    assert info.value.exit_code == 1
    assert job.calls <= done + 1  # no model pass after the full disk was seen
    _assert_whole(out)
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["stopped"] == "disk full" and report["counts"]["done"] == done
    assert report["counts"]["failed"] == 0  # a full disk is no input's fault
    monkeypatch.undo()
    _finish_and_check(out, folder, _state(out))


def test_disk_full_writing_the_manifest_stops_before_the_model_pass(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open
    appends = []

    def open_(self: Path, mode: str = "r", *args: object, **kwargs: object):
        if self.name == MANIFEST_NAME and "a" in mode:
            appends.append(1)
            if len(appends) > 3:  # settings, output 0, output 1, then the disk is full
                raise OSError(errno.EDQUOT, "Disk quota exceeded", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    out = tmp_path / "out"
    job = Job(out)
    with pytest.raises(DiskFullError, match=r"disk full writing .*\.clipinvert-manifest\.jsonl "
                                            r"\(Disk quota exceeded\): 2 of 6 inputs done"):
        job.run(folder)
    assert job.calls == 2  # output 2 never went through the model: it could not be recorded
    monkeypatch.undo()
    _finish_and_check(out, folder, _state(out))


def test_disk_full_writing_the_report_is_one_line_and_a_rerun_writes_it(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_room_for_reports(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"clipinvert-report\.json \(No space left on "
                                            r"device\): 6 of 6 inputs done"):
        Job(out).run(folder)
    assert not (out / "clipinvert-report.json").exists()
    monkeypatch.undo()
    before = _state(out)
    rep = Job(out).run(folder)
    assert rep.count("skipped") == 6 and _state(out) == before
    assert json.loads((out / "clipinvert-report.json").read_text())["counts"]["skipped"] == 6


def test_torch_writer_losing_the_errno_is_still_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save reports a full disk as 'RuntimeError: … unexpected pos …'; the file system
    having no block left is what tells."""
    from clipinvert import fileio

    class Full:
        f_bavail = 0

    monkeypatch.setattr(fileio.os, "statvfs", lambda path: Full())

    def torch_like(tmp: Path) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    with pytest.raises(DiskFullError, match="disk full writing .*x.pt"):
        atomic_write(tmp_path / "x.pt", torch_like)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with space: not a full disk
        atomic_write(tmp_path / "x.pt", torch_like)


# ---------------------------------------------------------------------------------------------
# A full disk for real: a small tmpfs
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def test_real_full_disk_on_a_tmpfs(folder: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "1m") as disk:
        out = disk / "out"
        job = Job(out, side=300)  # ~270 kB of noise per PNG: three fit in 1 MiB
        with pytest.raises(DiskFullError, match=r"disk full writing .*\.png \(No space left "
                                                r"on device\): \d of 6 inputs done") as info:
            job.run(folder)
        before = _state(out)
        assert 1 <= len(before) < 6 and f"{len(before)} of 6" in str(info.value)
        _assert_whole(out)
        # A real torch.save on the full disk: the previous file stays whole, no temp is left.
        atomic_write(disk / "ckpt.pt", lambda tmp: torch.save({"x": torch.zeros(1)}, tmp))
        with pytest.raises(DiskFullError, match="ckpt.pt"):
            atomic_write(disk / "ckpt.pt",
                         lambda tmp: torch.save({"x": torch.randn(1_000_000)}, tmp))
        assert torch.load(disk / "ckpt.pt", weights_only=True)["x"].shape == (1,)
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        rep = Job(out, side=300).run(folder)
        assert rep.count("skipped") == len(before) and rep.count("done") == 6 - len(before)
        assert {k: _state(out)[k] for k in before} == before
        _assert_whole(out)


# ---------------------------------------------------------------------------------------------
# What a crash leaves: torn, garbage, non-UTF-8 records and temporary files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("junk", [
    b'{"fingerprint": "abc", "outp',  # torn by a crash
    b"\xff\xfe\x00garbage\n\x00\x00",  # not UTF-8
    b'[1, 2]\n"text"\n{"fingerprint": 3}\n{"fingerprint": "x", "outputs": "0.png"}\n'
    b'{"fingerprint": "x", "outputs": {"a": 1}, "settings": [1]}\n',  # wrong JSON types
])
def test_corrupt_manifest_is_read_as_far_as_it_goes(folder: Path, tmp_path: Path,
                                                    junk: bytes) -> None:
    out = tmp_path / "out"
    Job(out).run(folder)
    manifest = out / MANIFEST_NAME
    good = manifest.read_bytes()
    before = _state(out)
    manifest.write_bytes(good + junk)
    rep = Job(out).run(folder)  # the good records still hold: nothing redone, no traceback
    assert rep.count("skipped") == 6 and _state(out) == before
    # Junk alone: nothing is known to be ours, so the outputs are refused as foreign, in a line.
    manifest.write_bytes(junk)
    with pytest.raises(UsageError, match="6 output file.* already exist that this command "
                                         "did not make"):
        Job(out).run(folder)
    assert _state(out) == before


def test_an_append_after_a_torn_line_starts_a_new_line(tmp_path: Path) -> None:
    log = tmp_path / MANIFEST_NAME
    log.write_bytes(b'{"fingerprint": "a", "settings": {}}\n{"fingerprint": "a", "outp')
    append_line(log, json.dumps({"fingerprint": "a", "outputs": ["x.png"]}))
    assert Manifest.load(tmp_path).outputs == {"x.png": "a"}


def test_a_killed_runs_temporary_files_are_removed_and_never_read(folder: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    leftovers = [out / ".0.png.0a1b2c3d.partial.png", out / "sub" / ".x.pt.deadbeef.partial.pt",
                 out / ".clipinvert-report.json.00112233.partial.json"]
    mine = [out / ".notes.partial", out / "keep.png.partial", out / ".a.partial.png"]
    for p in leftovers + mine:
        p.write_bytes(b"half")
    rep = Job(out).run(folder)
    assert rep.count("done") == 6
    assert not any(p.exists() for p in leftovers)
    assert all(p.exists() for p in mine)  # not our temporary-file pattern: the user's
    assert remove_stale_temps(out) == []


# ---------------------------------------------------------------------------------------------
# Output folders: not a file name; none left behind by a run that wrote nothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["edited.png", "x/edited.JPG", "movie.webp"])
def test_output_named_like_an_image_is_refused(tmp_path: Path, name: str) -> None:
    out = tmp_path / name
    with pytest.raises(UsageError, match=r"-o is an output folder.*e\.g\. -o .*/ \(the result "
                                         r"is .*/<input stem>\.png\)"):
        check_output_folder(out)
    assert not out.exists() and not (tmp_path / "x").exists()
    (tmp_path / "existing.png").mkdir()  # an existing folder of that name is a folder
    check_output_folder(tmp_path / "existing.png")


def test_checks_create_nothing_and_a_run_without_output_leaves_no_folder(
        folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    check_output_folder(out)
    assert not (tmp_path / "a").exists()

    def broken(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        raise AssertionError("never reached")

    def setup(report: object) -> None:
        from clipinvert.errors import WeightsError

        raise WeightsError("missing weights (test)")

    opts = RunOptions(output=out, quiet=True)
    with pytest.raises(Exception, match="missing weights"):
        run_folder("t", folder, opts, {}, lambda c: [out / f"{c.rel}.png"], broken,
                   setup=setup)
    assert not (tmp_path / "a").exists()
    # A folder the user had stays, even empty; files of theirs are never touched.
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(Exception, match="missing weights"):
        run_folder("t", folder, RunOptions(output=mine, quiet=True), {},
                   lambda c: [mine / f"{c.rel}.png"], broken, setup=setup)
    assert mine.is_dir() and os.listdir(mine) == []


def test_no_images_is_a_usage_error_and_leaves_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"no image files found in {empty}: nothing to do"):
        Job(out).run(empty)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Lines the user reads: non-square inputs, failures named as given
# ---------------------------------------------------------------------------------------------
def test_non_square_inputs_are_named_once_each(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (8, 8)).save(inputs / "square.png")
    for i in range(7):
        Image.new("RGB", (40 + i, 30)).save(inputs / f"wide{i}.png")
    job = Job(tmp_path / "out")
    job.opts.prepare = type(job.opts.prepare)(size=256)
    rep = job.run(inputs)
    assert rep.count("done") == 8
    assert rep.warnings[0] == (f"{inputs / 'wide0.png'}: 40×30 is not square; it is resized to "
                               "256×256, which changes its aspect ratio (crop it square first "
                               "to avoid this)")
    assert len(rep.warnings) == 6 and rep.warnings[4].startswith(f"{inputs / 'wide4.png'}: 44×30")
    assert rep.warnings[5] == "2 more input(s) that are not square were resized to 256×256 too"


def test_failed_lines_name_the_input_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "good.png")
    monkeypatch.chdir(tmp_path)
    job = Job(Path("out"))
    rep = run_folder("t", Path("photos"), job.opts, {}, job.outputs_for, job.process,
                     console=Console(stderr=True, width=300))
    err = capsys.readouterr().err
    assert rep.count("failed") == 1
    assert "failed photos/bad.jpg: " in err and str(tmp_path) not in err
    (record,) = [r for r in rep.records if r["status"] == "failed"]
    assert record["input"] == str(tmp_path / "photos" / "bad.jpg")  # scripts get it absolute


# ---------------------------------------------------------------------------------------------
# A full disk in train and eval
# ---------------------------------------------------------------------------------------------
def test_disk_full_in_training_keeps_the_last_checkpoint_and_resume_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from clipinvert.cli import main
    from clipinvert.testing.training import write_caption_set, write_training_domain

    domain = write_training_domain(tmp_path / "domain")
    data = write_caption_set(tmp_path / "set", n=6)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "-o", str(run), "--models", str(domain), "--domain",
            "trainable", "--device", "cpu", "--workers", "0", "-b", "2", "--val-fraction",
            "0.34", "--log-every", "1", "--val-every", "100", "--save-every", "2",
            "--image-every", "100", "--quiet", "--max-steps", "4"]
    real_save = torch.save
    resume_saves = []

    def save(obj: object, f: object, *a: object, **k: object) -> None:
        if Path(str(f)).name.startswith(".resume.pt."):
            resume_saves.append(1)
            if len(resume_saves) == 2:  # step 4's state: the disk is full by now
                Path(str(f)).write_bytes(b"PK half a zip")
                raise ENOSPC
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"clipinvert: error: disk full writing {run / 'checkpoints' / 'resume.pt'} (No space "
        "left on device): training stopped at step 4; the checkpoints of step 2 are intact; "
        f"free space and continue with: clipinvert train -o {run} --resume"]
    assert not [p for p in run.rglob("*") if ".partial" in p.name]
    assert torch.load(run / "checkpoints" / "resume.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert torch.load(run / "checkpoints" / "resume.pt", weights_only=True)["step"] == 4


def test_disk_full_writing_an_eval_report_is_one_line(
        tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from clipinvert.cli import main

    for name in ("a", "b"):
        _noise(ord(name), 32).save(tmp_path / f"{name}.png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": str(tmp_path / "a.png"),
                                         "output": str(tmp_path / n)}) + "\n"
                             for n in ("a.png", "b.png")))
    _no_room_for_reports(monkeypatch)
    out = tmp_path / "scores"
    rc = main(["eval", "metrics", str(pairs), "-o", str(out), "--metrics", "mse", "--models",
               str(tiny_models), "--domain", "tiny", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines() == [
        f"clipinvert: error: disk full writing {out / 'clipinvert-report.json'} (No space left "
        "on device): the scores were not saved; free space and run the same command again"]
    assert not (out / "clipinvert-report.json").exists()
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
