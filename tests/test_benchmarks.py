"""The benchmark scripts run end to end (on the CPU, small) and report what they claim to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the scripts import their shared module by its plain name, as `python benchmarks/x.py` does
    monkeypatch.syspath_prepend(str(BENCH))


def test_bench_generator_times_and_compares_formulations(tmp_path: Path, capsys) -> None:
    import bench_generator

    out = tmp_path / "gen.json"
    assert bench_generator.main(["--device", "cpu", "--size", "256", "--dtypes", "float32",
                                 "--forms", "fused,unfused", "--batch-sizes", "1",
                                 "--warmup", "0", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["form"], r["batch"]) for r in rows] == [("fused", 1), ("unfused", 1)]
    for r in rows:
        assert r["ms_per_batch"] > 0 and r["images_per_s"] > 0
        assert r["max_grey_diff"] <= 1 and r["psnr_db"] > 60  # the same picture
    table = capsys.readouterr().out
    assert "unfused" in table and "PSNR dB" in table
    with pytest.raises(SystemExit, match="unknown --forms"):
        bench_generator.main(["--device", "cpu", "--forms", "grouped"])


@pytest.mark.slow
def test_bench_edit_quick_with_the_command(tmp_path: Path) -> None:
    import bench_edit

    out = tmp_path / "edit.json"
    assert bench_edit.main(["--quick", "--device", "cpu", "--skip-loads", "--cli",
                            "--cli-counts", "1,2", "--cli-batch-sizes", "auto",
                            "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["stages"]) == {"1", "2"} and not figures["loads"]
    run = figures["cli"][0]
    walls = run["walls_s"]
    assert walls["1"] > 0 and walls["2"] > 0
    # the cost of one more edit is the slope between the counts (it can come out at or below 0
    # on a busy 2-core machine: start-up varies by seconds between processes)
    assert run["per_image_s"] == pytest.approx(walls["2"] - walls["1"])
    assert run["startup_s"] == pytest.approx(walls["1"] - run["per_image_s"])
    assert not (tmp_path / "w").exists()  # the run made the folder, so the run removed it


def test_busy_load_runs_its_processes_only_inside_the_block() -> None:
    from benchcommon import BusyLoad

    with BusyLoad(2) as load:
        assert load.running == 2
        procs = list(load._procs)
    assert all(p.poll() is not None for p in procs) and load.running == 0
    with pytest.raises(RuntimeError), BusyLoad(1) as load:
        procs = list(load._procs)
        raise RuntimeError("a failed timing")
    assert all(p.poll() is not None for p in procs)  # stopped on the way out of a failure too


@pytest.mark.slow
def test_bench_edit_threads_sweep_idle_and_loaded(tmp_path: Path, capsys) -> None:
    import bench_edit

    out = tmp_path / "threads.json"
    assert bench_edit.main(["--quick", "--device", "cpu", "--threads-sweep", "1,2", "--load",
                            "1", "--warmup", "0", "--workdir", str(tmp_path / "w"),
                            "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    rows = figures["threads_sweep"]
    assert [(r["threads"], r["load"]) for r in rows] == [(1, 0), (2, 0), (1, 1), (2, 1)]
    assert all(r["s_per_edit"] > 0 and len(r["times_s"]) == 1 for r in rows)
    assert not figures["stages"] and figures["meta"]["size"] == 256
    assert "busy processes" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_edit.main(["--threads-sweep", "1,auto"])
