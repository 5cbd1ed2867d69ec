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


@pytest.mark.slow  # 15-30 s of watched subprocesses; the stage's own tests are fast
def test_bench_train_e4e_stage_end_to_end(tmp_path: Path, capsys) -> None:
    """The e4e configuration at --quick size with tiny networks, through the watched
    subprocesses: plain and R1 steps at the full progressive stage and at stage 0, peak RSS,
    the recipe's days; the table and the JSON say the same."""
    import bench_train

    out = tmp_path / "train.json"
    assert bench_train.main(["--quick", "--tiny", "--stages", "e4e", "--device", "cpu",
                             "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["meta"]["tiny"] and figures["meta"]["recipe_steps"] == 200_000
    (row,) = figures["rows"]
    assert (row["stage"], row["resolution"], row["batch"], row["status"]) == ("e4e", 256, 2, "ok")
    assert row["d_reg_every"] == 16 and row["identity"] == "arcface"
    full, zero = row["phases"]
    assert (full["progressive_stage"], zero["progressive_stage"]) == (row["n_styles"] - 1, 0)
    for ph in (full, zero):
        assert ph["plain_s"] > 0 and ph["r1_s"] > 0 and ph["warmup_s"] > 0
        assert len(ph["step_times_s"]) == len(ph["step_cpu_s"]) == len(ph["r1_times_s"]) == 1
        assert ph["s_per_step"] == pytest.approx((15 * ph["plain_s"] + ph["r1_s"]) / 16)
        assert ph["peak_mib"] > 0
    assert row["s_per_step"] == full["s_per_step"] and row["memory"] == "rss"
    assert row["peak_mib"] == max(full["peak_mib"], zero["peak_mib"])
    days = (20_000 * zero["s_per_step"] + 180_000 * full["s_per_step"]) / 86400
    assert row["recipe_days"] == pytest.approx(days)
    table = capsys.readouterr().out
    assert f"e4e k={row['n_styles'] - 1}" in table and "e4e k=0" in table and "R1 s" in table
    assert "stage e4e, 256 px:" in table and "TINY" in table
    assert not (tmp_path / "w").exists()


def test_bench_train_stage_selection() -> None:
    import bench_train

    parse = bench_train.build_parser().parse_args
    assert parse([]).stages == (1, 2, "e4e")
    assert parse(["--stages", "e4e,1,e4e"]).stages == ("e4e", 1)
    with pytest.raises(SystemExit):
        parse(["--stages", "3"])


def test_bench_io_paper_rate_and_arguments() -> None:
    import argparse

    import bench_io

    # 16 cores over 2 + 6 core-ms: 2000 img/s, unless the main thread's 1 ms caps it at 1000
    assert bench_io.paper_rate(16, 2.0, 6.0, 0.5) == pytest.approx(2000.0)
    assert bench_io.paper_rate(16, 2.0, 6.0, 1.0) == pytest.approx(1000.0)
    assert bench_io.paper_rate(16, 0.0, 0.0, 0.0) == float("inf")
    assert bench_io.parse_formats("png, JXL") == ("png", "jxl")
    assert bench_io.parse_counts("1,2,4") == (1, 2, 4)
    for bad in ("gif", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_io.parse_formats(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        bench_io.parse_counts("0,2")
    # every row format writes a suffix the command offers
    from clipinvert.imaging import OUTPUT_EXTENSIONS

    assert {suffix for suffix, _, _ in bench_io.FORMATS.values()} <= set(OUTPUT_EXTENSIONS)


@pytest.mark.slow
def test_bench_io_runs_the_path_and_reports_every_figure(tmp_path: Path, capsys) -> None:
    import bench_io

    out = tmp_path / "io.json"
    assert bench_io.main(["--formats", "png,jxl", "--threads", "1,2", "--count", "6",
                          "--batch", "4", "--model-ms", "1", "--out-size", "128",
                          "--in-size", "64", "--workdir", str(tmp_path / "w"),
                          "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["threads"]) for r in rows] == [("png", 1), ("png", 2), ("jxl", 1),
                                                          ("jxl", 2)]
    for r in rows:
        assert r["images"] == 6 and r["images_per_s"] > 0 and r["mean_file_kib"] > 0
        assert r["reader_core_ms"] > 0 and r["writer_core_ms"] > 0 and r["main_ms"] >= 0
    assert "img/s on 16 cores (paper)" in capsys.readouterr().out
    assert not (tmp_path / "w").exists()


def test_bench_edit_reads_the_commands_timing_lines() -> None:
    import bench_edit

    err = ("note\nclipinvert timing: weight loads 12.0 ms\n"
           "clipinvert timing: totals: 64 images, main thread 0.40 ms/image, GPU idle between "
           "batches 7.5 %\n")
    lines = bench_edit.timing_lines(err)
    assert lines == ["weight loads 12.0 ms", "totals: 64 images, main thread 0.40 ms/image, "
                     "GPU idle between batches 7.5 %"]
    assert bench_edit.gpu_idle_percent(lines) == 7.5
    assert bench_edit.gpu_idle_percent(lines[:1]) is None
    assert bench_edit.build_parser().parse_args(["--cli", "--cli-timing"]).cli_timing


def test_device_checks_script_parses_and_every_command_it_runs_exists(tmp_path: Path) -> None:
    """benchmarks/device_checks.sh is for a session lent a GPU: here, it must parse (bash -n)
    and every option it passes must be one its benchmark or command has."""
    import shlex
    import shutil
    import subprocess

    import bench_edit
    import bench_train
    import typer.main

    from clipinvert.cli import app

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = BENCH / "device_checks.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    done = subprocess.run([bash, str(script), "--dry-run"], capture_output=True, text=True,
                          check=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "o")})
    steps = [ln for ln in done.stdout.splitlines() if ln.startswith("STEP ")]
    names = [ln.split()[1] for ln in steps]
    assert names == ["edit-png", "edit-jpg", "model-float16", "model-float32", "train-fp32",
                     "train-bf16", "demo", "ddp-train", "demo", "sync"]  # the order
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    click_app = typer.main.get_command(app)
    for line in steps:
        argv = shlex.split(line.split(": ", 1)[1])
        if argv[0] == "env":  # env NAME=value ... python ...
            argv = [a for a in argv[1:] if "=" not in a or a.startswith("-")]
        assert argv[0] == "python"
        if argv[1].startswith("benchmarks/"):
            module = {"bench_edit.py": bench_edit, "bench_train.py": bench_train}[
                Path(argv[1]).name]
            module.build_parser().parse_args(argv[2:])  # exits on an unknown option
            continue
        if argv[1:3] == ["-m", "torch.distributed.run"]:
            argv = ["python", *argv[argv.index("clipinvert") - 1:]]
        assert argv[1:3] == ["-m", "clipinvert"], line
        rest = argv[3:]
        command = click_app
        while rest and not rest[0].startswith("-") and hasattr(command, "commands"):
            command = command.commands[rest.pop(0)]  # type: ignore[attr-defined]
        known = {o for p in command.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]}
        assert {a for a in rest if a.startswith("--")} <= known, line
