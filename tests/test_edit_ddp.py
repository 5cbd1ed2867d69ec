"""`torchrun -m clipinvert edit|invert`: inputs sharded across real processes (gloo, CPU), one
merged report, resume per rank, and the same pixels as one process."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchrun_helpers import free_port, launch_env, no_clipinvert_traceback, run_all

from clipinvert.cli import main
from clipinvert.imaging import list_inputs


@pytest.fixture()
def faces(tmp_path: Path, face_crop: Image.Image) -> Path:
    """Seven small inputs (an odd count: the shards differ in size) and one bad file."""
    d = tmp_path / "faces"
    (d / "sub").mkdir(parents=True)
    for i in range(7):
        face_crop.rotate(10 * i).save(d / ("sub" if i % 3 == 0 else ".") / f"f{i}.png")
    (d / "zz_broken.png").write_bytes(b"not a png")
    return d


def _edit(models: Path, src: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "clipinvert", "edit", str(src), "blond hair", "-o", str(out), "--models",
            str(models), "--domain", "tiny", "--device", "cpu", "--aligned", "-b", "2", *extra]


def test_two_processes_share_the_inputs_and_merge_one_report(
        torchrun: list[str], tiny_models: Path, faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    [(rc, _, err)] = run_all([[*torchrun, "--standalone", "--nproc-per-node", "2",
                               *_edit(tiny_models, faces, out)]], tmp_path, launch_env())
    assert rc == 1, err  # torchrun: the bad input failed on its rank
    # torchrun's failure report names the interpreter, in CI's layout …/clipinvert/.venv/…,
    # and the package's own frames are still told from it
    assert torchrun[0] in err and f"clipinvert{os.sep}.venv{os.sep}bin" in torchrun[0], err
    assert no_clipinvert_traceback(err), err
    assert sum("zz_broken.png" in ln for ln in err.splitlines()) == 1, err  # one line, once
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": 7, "skipped": 0, "failed": 1}
    ranks = {Path(r["input"]).name: r["rank"] for r in report["inputs"]}
    assert set(ranks.values()) == {0, 1}
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    # one manifest, folded: no per-rank parts left behind
    assert not list(out.glob(".clipinvert-manifest.rank*.jsonl"))
    assert (out / ".clipinvert-manifest.jsonl").is_file()
    # the same pictures as one process (batch-mates and thread counts differ: float rounding
    # may move a value by one grey level)
    single = tmp_path / "single"
    assert main(_edit(tiny_models, faces, single, "--quiet")[2:]) == 1
    alone = json.loads((single / "clipinvert-report.json").read_text())
    assert sorted(r["input"] for r in report["inputs"]) == sorted(
        r["input"] for r in alone["inputs"])
    # the merged report lists the inputs in the order they were found (sorted)
    assert [r["input"] for r in report["inputs"]] == [str(src) for src, _ in list_inputs(faces)]
    for p in sorted(single.rglob("*.png")):
        other = out / p.relative_to(single)
        a = np.asarray(Image.open(p), dtype=np.int16)
        assert np.abs(a - np.asarray(Image.open(other), dtype=np.int16)).max() <= 1, p
    # resume: a lost output is made again by whichever rank owns it; the rest is skipped
    victim = sorted(out.rglob("f*.png"))[0]
    victim.unlink()
    [(rc, _, err)] = run_all([[*torchrun, "--standalone", "--nproc-per-node", "2",
                               *_edit(tiny_models, faces, out)]], tmp_path, launch_env())
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": 1, "skipped": 6, "failed": 1} and victim.exists()


@pytest.mark.slow  # another 2-process launch (~12 s); the one above is in the default suite
def test_invert_under_torchrun_with_more_processes_than_inputs(
        torchrun: list[str], tiny_models: Path, faces: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(faces / "f1.png", one / "f1.png")
    out = tmp_path / "inv"
    cmd = [*torchrun, "--standalone", "--nproc-per-node", "2", "-m", "clipinvert", "invert",
           str(one), "-o", str(out), "--models", str(tiny_models), "--domain", "tiny",
           "--device", "cpu", "--aligned"]
    [(rc, _, err)] = run_all([cmd], tmp_path, launch_env())
    assert rc == 0, err
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert (out / "f1.png").exists() and (out / "f1.pt").exists()
    assert report["inputs"][0]["rank"] == 0 and len(report["ranks"]) == 2


@pytest.mark.slow  # two launchers rendezvous over c10d, as two machines would: ~15 s
def test_two_nodes_over_a_shared_output_folder(torchrun: list[str], tiny_models: Path,
                                               faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    port = free_port()
    launch = [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"e{port}"]
    results = run_all([[*launch, *_edit(tiny_models, faces, out)]] * 2, tmp_path, launch_env())
    assert [rc for rc, _, _ in results] == [1, 1]  # the bad input fails on its node's rank
    report = json.loads((out / "clipinvert-report.json").read_text())
    assert report["counts"] == {"done": 7, "skipped": 0, "failed": 1}
    assert {r["rank"] for r in report["inputs"]} == {0, 1}
    assert len(list(out.rglob("f*.png"))) == 7
    assert not list(out.glob(".clipinvert-manifest.rank*.jsonl"))
