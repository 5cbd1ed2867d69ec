"""The folder runner on its own: retries, isolation of failures, order, interrupts, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipinvert.batch import (
    Crop,
    Prepared,
    PrepareOptions,
    RunOptions,
    prepared_stream,
    run_folder,
    slugify,
    unique_slugs,
)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "nested").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / ("nested" if i % 2 else ".") / f"{i}.png")
    return d


def _outputs(out: Path):
    return lambda crop: [out / f"{crop.rel}.txt"]


def _writer(out: Path, seen: list[int], fail_if=lambda crops: False):
    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        seen.append(len(crops))
        if fail_if(crops):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
        written = []
        for c in crops:
            p = out / f"{c.rel}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(str(c.image.getpixel((0, 0))))
            written.append([p])
        return written
    return process


def test_failed_batch_is_retried_one_by_one(folder: Path, tmp_path: Path) -> None:
    out, seen = tmp_path / "out", []
    opts = RunOptions(output=out, batch_size=4, quiet=True)
    rep = run_folder("t", folder, opts, {}, _outputs(out),
                     _writer(out, seen, fail_if=lambda crops: len(crops) > 1))
    assert rep.count("done") == 5 and rep.exit_code == 0
    assert seen == [4, 1, 1, 1, 1, 1]  # the batch of 4 failed, then singles; last batch of 1


def test_one_bad_image_fails_alone(folder: Path, tmp_path: Path) -> None:
    out, seen = tmp_path / "out", []
    bad = lambda crops: any(c.rel.name == "3" for c in crops)  # noqa: E731
    rep = run_folder("t", folder, RunOptions(output=out, batch_size=5, quiet=True), {},
                     _outputs(out), _writer(out, seen, fail_if=bad))
    assert rep.count("done") == 4 and rep.exit_code == 1
    (failed,) = [r for r in rep.records if r["status"] == "failed"]
    assert failed["input"].endswith("3.png")
    assert failed["reason"] == ("processing failed (RuntimeError: CUDA out of memory. "
                                "Tried to allocate 2 GiB)")
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": 4, "skipped": 0, "failed": 1}


def test_worker_pool_keeps_sorted_order(folder: Path) -> None:
    from clipinvert.imaging import list_inputs

    sources = [(s, r.with_suffix("")) for s, r in list_inputs(folder)]
    inline = [p.rel for p in prepared_stream(sources, PrepareOptions(), workers=0, window=2)]
    pooled = [p.rel for p in prepared_stream(sources, PrepareOptions(), workers=2, window=2)]
    assert inline == pooled == [Path("0"), Path("2"), Path("4"), Path("nested/1"),
                                Path("nested/3")]


def test_interrupt_writes_report_and_leaves_finished_outputs(folder: Path,
                                                             tmp_path: Path) -> None:
    out, calls = tmp_path / "out", []

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _writer(out, [])(crops, owners)

    with pytest.raises(KeyboardInterrupt):
        run_folder("t", folder, RunOptions(output=out, batch_size=2, quiet=True), {},
                   _outputs(out), process)
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["interrupted"] is True and report["counts"]["done"] == 2
    # rerun: the two finished inputs are skipped, the rest done
    rep = run_folder("t", folder, RunOptions(output=out, batch_size=2, quiet=True), {},
                     _outputs(out), _writer(out, []))
    assert rep.count("skipped") == 2 and rep.count("done") == 3


def test_slugs() -> None:
    assert slugify("She has WAVY blond hair!") == "she-has-wavy-blond-hair"
    assert slugify("!!!") == "prompt"
    assert unique_slugs(["a b", "A-B", "c"]) == ["a-b", "a-b-2", "c"]


def test_auto_batch_halves_on_out_of_memory_and_says_so(folder: Path, tmp_path: Path,
                                                         capsys) -> None:
    """--batch-size auto: an injected out-of-memory at more than 2 images halves the batch for
    the rest of the run (one warning), instead of falling back to single images."""
    import torch

    out, seen = tmp_path / "out", []

    def oom(crops: list[Crop]) -> bool:
        if len(crops) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return False

    opts = RunOptions(output=out, batch_size=None, quiet=True)
    rep = run_folder("t", folder, opts, {}, _outputs(out), _writer(out, seen, fail_if=oom),
                     auto_batch=lambda: 4)
    assert rep.count("done") == 5 and rep.exit_code == 0
    assert seen == [4, 2, 2, 1]  # 4 failed → its halves; then batches of 2; the last one
    assert rep.meta["batch_size"] == {"asked": "auto", "start": 4, "used": 2}
    assert rep.warnings == ["a batch of 4 ran out of memory: going on with batches of 2"]
    # A fixed --batch-size is what the user asked: an OOM falls back to single images, as
    # before, and the batch is not changed for the rest.
    out2, seen2 = tmp_path / "out2", []
    rep = run_folder("t", folder, RunOptions(output=out2, batch_size=4, quiet=True), {},
                     _outputs(out2), _writer(out2, seen2, fail_if=oom))
    assert seen2 == [4, 1, 1, 1, 1, 1] and rep.meta["batch_size"]["used"] == 4


def test_threaded_writes_finish_before_done_and_a_failed_write_fails_its_input(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With writer threads the model goes on while PNGs are written; an input is reported done
    only once its files are on disk, and a write that fails fails that input alone (a full
    disk instead stops the run: tests/test_faults.py)."""
    import threading

    from clipinvert import imaging
    from clipinvert.batch import OutputWriter

    real_save = imaging.save_image
    threads: set[str] = set()

    def save(image: Image.Image, path: Path, **kwargs: object) -> None:
        threads.add(threading.current_thread().name)
        if path.stem == "3":
            raise OSError(5, "Input/output error")
        real_save(image, path, **kwargs)

    monkeypatch.setattr(imaging, "save_image", save)
    out = tmp_path / "out"
    opts = RunOptions(output=out, batch_size=2, quiet=True, writer=OutputWriter(2))

    def process(crops: list[Crop], owners: list[Prepared]) -> list[list[Path]]:
        paths = [opts.image_path(c.rel) for c in crops]
        for c, p in zip(crops, paths, strict=True):
            opts.save(c.image, p)
        return [[p] for p in paths]

    rep = run_folder("t", folder, opts, {}, lambda c: [opts.image_path(c.rel)], process)
    assert rep.count("done") == 4 and rep.count("failed") == 1
    (failed,) = [r for r in rep.records if r["status"] == "failed"]
    assert failed["input"].endswith("3.png") and "Input/output error" in failed["reason"]
    for r in rep.records:
        if r["status"] == "done":
            assert all(Path(p).is_file() for p in r["outputs"])
    assert threads and all(t.startswith("clipinvert-write") for t in threads)
