"""Baseline throughput of a clipinvert edit, stage by stage, with random full-size weights.

Why this exists: later work (a safetensors weight cache, batching, lower precision, compiled
kernels) must be judged against a figure measured the same way on the same machine.  This script
is that figure.  It writes random-weight checkpoints in the *released* layouts (so the real
loaders and the real architectures run, at the real cost), builds an :class:`Editor` over them
with :meth:`Editor.from_files`, and times every stage of an edit separately and end to end:

=========  ================================================================================
decode     ``load_image`` of B JPEG files + ``to_tensor`` at the encoder's 256 px
encode     ``Editor.encode``: IR-SE50 body + e4e style heads (+ latent_avg)
adapter    ``Editor.residual``: CLIPAdapter + the e4e FPN/style heads (Δ)
generator  ``Editor.decode(ŵ, t)``: StyleGAN2 with the CLIPRemapper
save       ``to_pil`` + ``save_image`` of B PNGs
edit       all of the above end to end (text embedding cached, as in a batch run)
=========  ================================================================================

plus one-off costs: the first-use load of each weight file and one uncached text embedding.
Random weights give the same cost as trained ones (same shapes, same kernels); the pictures
are meaningless, which does not matter here.

Disk: everything the run writes (checkpoints, photos, outputs, and the safetensors copies the
loaders make) stays in one work folder, a fresh temporary one unless ``--workdir`` names one,
and ``CLIPINVERT_HOME`` points inside it before anything is loaded, so the user's weight cache
(``~/.cache/clipinvert``) is never touched.  At the end the folder is deleted (of a
``--workdir`` that already existed, only the entries this run added) unless ``--keep`` is given;
keep a folder and pass it again as ``--workdir`` to reuse its checkpoints and cached copies
(3.3 GB in all at 256 px, more at 1024 px).

Examples::

    python benchmarks/bench_edit.py                         # auto device, B=1,8, 1024 px
    python benchmarks/bench_edit.py --device cpu --json cpu.json
    python benchmarks/bench_edit.py --quick                 # 256 px, B=1,2: a CI smoke test
    python benchmarks/bench_edit.py --workdir ~/bench --keep   # reuse the files next time
    python benchmarks/bench_edit.py --device cpu --threads-sweep   # 1 and 2 threads, idle/loaded

Threads on a busy machine: ``--threads N`` runs PyTorch on N threads (and the timed command
with ``OMP_NUM_THREADS=N``), ``--load K`` keeps K busy-loop processes running for the whole
measurement (a machine whose cores other work also wants), and ``--threads-sweep 1,2`` times
only whole edits (B = 1) at each thread count, first idle and then beside ``--load`` busy
processes (default: one per CPU), and prints the seconds per edit of each.  Run it on a
machine that is otherwise quiet: the figures are only as idle as the machine is (the load
average at the start is printed with them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from benchcommon import (
    BusyLoad,
    Clock,
    add_workdir_arguments,
    clean_workdir,
    device_meta,
    format_table,
    open_workdir,
    positive_int,
    psnr_8bit,
    write_once,
)
from PIL import Image

from clipinvert import imaging
from clipinvert.errors import ClipInvertError
from clipinvert.nets import GeneratorConfig
from clipinvert.pipeline import DTYPES, RESIDUAL_SCALE, Editor, resolve_device, resolve_dtype
from clipinvert.runtime import tune_allocator
from clipinvert.testing.clip import write_random_clip
from clipinvert.testing.models import write_clipinverter, write_e4e

T = TypeVar("T")

# A built-in open_clip name, not OpenAI's "ViT-B/32": the released models need QuickGELU, and a
# built-in name is what ClipEncoder resolves without a config file.
CLIP_ARCH = "ViT-B-32-quickgelu"
PROMPT = "a face with wavy blond hair"
STAGES = ("decode", "encode", "adapter", "generator", "save")
WHOLE = "edit"
# Full-run and --quick defaults; an option given explicitly always wins over either.
DEFAULTS = {"size": 1024, "batch_sizes": (1, 8), "repeats": 2}
QUICK = {"size": 256, "batch_sizes": (1, 2), "repeats": 1}


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of one stage: CUDA bytes allocated, or the process's peak RSS on the CPU.

    ``ru_maxrss`` alone is a lifetime high-water mark and would charge every stage with the
    biggest earlier one, so on Linux the RSS peak (VmHWM) is reset per stage through
    ``/proc/self/clear_refs``; where that is impossible the lifetime figure is reported and
    :attr:`label` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._clear_refs()
        if self.cuda:
            self.label = "peak CUDA MiB"
        else:
            self.label = "peak RSS MiB" if self.resettable else "max RSS MiB (lifetime)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # 5 = reset the peak RSS to the current RSS (Linux >= 4.0)
            return Path("/proc/self/status").is_file()
        except OSError:
            return False

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_refs()

    def read_mib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.resettable:
            for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs kB


@dataclass
class StageResult:
    """Timings of one stage at one batch size; the median resists a stray slow repeat."""

    batch: int
    times_s: list[float]
    peak_mib: float
    median_s: float = field(init=False)
    images_per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_s = statistics.median(self.times_s)
        self.images_per_s = self.batch / self.median_s if self.median_s > 0 else float("inf")


def measure(clock: Clock, memory: PeakMemory, batch: int, warmup: int, repeats: int,
            fn: Callable[[], T]) -> tuple[StageResult, T]:
    """Run ``fn`` ``warmup`` times untimed (allocator, lazy init, cuDNN autotune), then
    ``repeats`` times timed; returns the timings and the last output for the next stage."""
    memory.reset()
    out = None
    for _ in range(warmup):
        out = fn()
    clock.sync()
    times = []
    for _ in range(repeats):
        seconds, out = clock.time(fn)
        times.append(seconds)
    return StageResult(batch, times, memory.read_mib()), out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Fixtures: random checkpoints and input photos
# --------------------------------------------------------------------------------------------


def write_checkpoints(workdir: Path, size: int) -> tuple[dict[str, Path], bool]:
    """Seeded random e4e, CLIPInverter and CLIP files in the released layouts (reused when
    present: the writers are deterministic, so an existing file is the same file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = GeneratorConfig(size=size)  # full width: the real channel counts and style_dim 512
    paths = {"e4e": workdir / f"e4e-{size}.pt", "clipinverter": workdir / f"clipinverter-{size}.pt",
             "clip": workdir / f"clip-{CLIP_ARCH}.pt"}
    wrote = write_once(paths["e4e"], lambda p: write_e4e(p, cfg))
    wrote |= write_once(paths["clipinverter"], lambda p: write_clipinverter(p, cfg, text_dim=512))

    def clip(tmp: Path) -> Path:
        staging = tmp.with_suffix(".dir")
        out = write_random_clip(staging, arch=CLIP_ARCH)
        os.replace(out, tmp)
        staging.rmdir()
        return tmp

    wrote |= write_once(paths["clip"], clip)
    return paths, wrote


def write_photos(directory: Path, count: int, size: int = 1024) -> list[Path]:
    """``count`` distinct 1024² JPEGs of skimage's astronaut portrait: realistic decode cost
    (a real photo, not flat noise that compresses oddly) without any download."""
    from skimage import data  # test dependency; imported here so --help works without it

    directory.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(data.astronaut()).resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(base)
    paths = []
    for i in range(count):
        path = directory / f"face-{size}-{i}.jpg"
        if not path.is_file():
            shifted = np.roll(arr, shift=7 * i, axis=1)  # different bytes, same content class
            imaging.save_image(Image.fromarray(shifted), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def file_mib(path: Path) -> float:
    return path.stat().st_size / 2**20


LOAD_MODES = ("pickle", "convert", "cached")


def time_loads(make_editor: Callable[[], Editor], paths: dict[str, Path],
               clock: Clock, workdir: Path) -> dict[str, dict[str, float]]:
    """First-use load of each weight file (read + build + move to device), three ways, each
    through a fresh :class:`Editor` and a fresh, private safetensors cache (a temporary folder
    in ``workdir``, deleted afterwards):

    * ``pickle``: ``CLIPINVERT_NO_SAFETENSORS_CACHE=1`` — reading the released pickle every
      time, what every load cost before the cache existed;
    * ``convert``: the first load with the cache on (hash + read + write the safetensors copy);
    * ``cached``: every later load (the memory-mapped copy, no pickle).
    """
    first_use: dict[str, Callable[[Editor], Any]] = {
        "e4e": lambda ed: ed.e4e,            # must come first: the inverter checks against it
        "clipinverter": lambda ed: ed.inverter,
        "clip": lambda ed: ed.clip,
    }
    out: dict[str, dict[str, float]] = {
        role: {"file_mib": file_mib(paths[role])} for role in first_use}
    saved = {k: os.environ.get(k) for k in ("CLIPINVERT_HOME", "CLIPINVERT_NO_SAFETENSORS_CACHE")}
    with tempfile.TemporaryDirectory(prefix="load-cache-", dir=workdir) as cache:
        os.environ["CLIPINVERT_HOME"] = cache
        try:
            for mode in LOAD_MODES:
                if mode == "pickle":
                    os.environ["CLIPINVERT_NO_SAFETENSORS_CACHE"] = "1"
                else:
                    os.environ.pop("CLIPINVERT_NO_SAFETENSORS_CACHE", None)
                editor = make_editor()
                for role, fn in first_use.items():
                    out[role][f"{mode}_s"], _ = clock.time(
                        lambda fn=fn, ed=editor: fn(ed))
                del editor
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def time_text(editor: Editor, clock: Clock, repeats: int) -> list[float]:
    """One prompt through CLIP per call: the text tower itself, past both of the editor's
    caches (in memory, and on disk — which a second benchmark run would otherwise answer)."""
    editor.clip.encode_text([f"{PROMPT} (warm-up)"])
    times = []
    for i in range(repeats):
        seconds, _ = clock.time(lambda i=i: editor.clip.encode_text([f"{PROMPT} ({i})"]))
        times.append(seconds)
    return times


def batch_io(editor: Editor, photos: Sequence[Path], out_dir: Path, batch: int
             ) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """The decode of ``batch`` photos and the save of their edits, as a batch run does them
    (the prompt's embedding is cached here, as in a batch run over many photos)."""
    files = list(photos[:batch])
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = [out_dir / f"b{batch}-{i}.png" for i in range(batch)]
    editor.embed_text([PROMPT])

    def decode() -> torch.Tensor:
        return imaging.to_tensor([imaging.load_image(p) for p in files], editor.input_size)

    def save(images: torch.Tensor) -> None:
        for image, path in zip(imaging.to_pil(images), outputs, strict=True):
            imaging.save_image(image, path)

    return decode, save


def run_batch(editor: Editor, photos: Sequence[Path], out_dir: Path, batch: int, clock: Clock,
              memory: PeakMemory, warmup: int, repeats: int) -> dict[str, StageResult]:
    """Every stage at one batch size, each fed the previous stage's real output."""
    decode, save = batch_io(editor, photos, out_dir, batch)
    res: dict[str, StageResult] = {}

    def stage(fn: Callable[[], T]) -> tuple[StageResult, T]:
        return measure(clock, memory, batch, warmup, repeats, fn)

    # Inputs are bound as default arguments so that the ``del`` below really frees them.
    res["decode"], x = stage(decode)
    res["encode"], enc = stage(lambda x=x: editor.encode(x))
    t = editor.embed_text([PROMPT] * batch)
    res["adapter"], delta = stage(lambda enc=enc: editor.residual(enc, t))
    w_hat = enc.w + RESIDUAL_SCALE * delta
    res["generator"], images = stage(lambda w=w_hat: editor.decode(w, t))
    res["save"], _ = stage(lambda im=images: save(im))
    del x, enc, delta, w_hat, images  # keep them out of the whole edit's memory peak

    def whole() -> None:
        save(editor.edit(decode(), PROMPT).images)

    res[WHOLE], _ = stage(whole)
    return res


def threads_sweep(editor: Editor, photos: Sequence[Path], out_dir: Path, clock: Clock,
                  memory: PeakMemory, threads: Sequence[int], loads: Sequence[int], warmup: int,
                  repeats: int) -> list[dict[str, Any]]:
    """Whole edits (B = 1) at each PyTorch thread count, beside each number of busy-loop
    processes: what a thread count costs when other processes want the cores too.  PyTorch's
    own thread count is restored at the end."""
    decode, save = batch_io(editor, photos, out_dir, 1)

    def whole() -> None:
        save(editor.edit(decode(), PROMPT).images)

    rows = []
    before = torch.get_num_threads()
    try:
        for busy in loads:
            with BusyLoad(busy) as load:
                for n in threads:
                    print(f"timing {n} thread(s) beside {busy} busy process(es) ...",
                          file=sys.stderr)
                    torch.set_num_threads(n)
                    result, _ = measure(clock, memory, 1, warmup, repeats, whole)
                    if load.running != busy:
                        raise RuntimeError("a busy-loop process stopped during the timing")
                    rows.append({"threads": n, "load": busy, "s_per_edit": result.median_s,
                                 "times_s": result.times_s})
    finally:
        torch.set_num_threads(before)
    return rows


def sweep_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    return "\n".join([
        f"whole edits, B=1, {meta['size']} px, {meta['device_name']}, {meta['cpu_count']} CPUs, "
        f"{meta['warmup']} warm-up + {meta['repeats']} timed, median; load average at start "
        f"{meta['loadavg_1min']}",
        "",
        format_table(["torch threads", "busy processes", "s per edit", "runs s"],
                     [[str(r["threads"]), str(r["load"]), f"{r['s_per_edit']:.3f}",
                       ", ".join(f"{t:.2f}" for t in r["times_s"])] for r in rows],
                     text_last=True)])


def precision_psnr(make_editor: Callable[[torch.dtype], Editor], dtype: torch.dtype,
                   size: int) -> dict[str, float]:
    """PSNR in dB of ``dtype``'s edits against float32's, per test photo (scikit-image's
    astronaut and chelsea): what lower precision costs in the saved 8-bit pictures."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "chelsea": data.chelsea()}
    images = [Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS)
              for a in photos.values()]
    pictures = {}
    for dt in (torch.float32, dtype):
        editor = make_editor(dt)
        result = editor.edit(images, PROMPT).images
        pictures[dt] = [np.asarray(im, dtype=np.float64) for im in imaging.to_pil(result)]
        del editor
    psnr = {}
    for name, ref, out in zip(photos, pictures[torch.float32], pictures[dtype], strict=True):
        psnr[name] = psnr_8bit(float(np.mean((ref - out) ** 2)))
    return psnr


# --------------------------------------------------------------------------------------------
# The command users run
# --------------------------------------------------------------------------------------------


def write_domain(workdir: Path, paths: dict[str, Path], size: int) -> Path:
    """A models.toml naming the random checkpoints as domain ``bench`` (inputs pre-aligned)."""
    toml = workdir / "models.toml"
    lines = ["[domains.bench]", f"resolution = {size}", 'align = "none"',
             f'clip_arch = "{CLIP_ARCH}"']
    lines += [f'{role} = "{path}"' for role, path in paths.items()]
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return toml


TIMING_PREFIX = "clipinvert timing:"


def timing_lines(stderr: str) -> list[str]:
    """The command's ``CLIPINVERT_TIMING=1`` lines (clipinvert.timing), without the prefix."""
    return [ln[len(TIMING_PREFIX):].strip() for ln in stderr.splitlines()
            if ln.startswith(TIMING_PREFIX)]


def gpu_idle_percent(lines: Sequence[str]) -> float | None:
    """The GPU's idle share between batches from a totals line, in %, when it was measured
    (CUDA runs: events around each batch's device work)."""
    for ln in lines:
        m = re.search(r"GPU idle between batches ([0-9.]+) %", ln)
        if m:
            return float(m.group(1))
    return None


def time_cli(command: Sequence[str], workdir: Path, photos: Sequence[Path], counts: Sequence[int],
             batch: str, device: torch.device, extra: Sequence[str], repeats: int,
             threads: int | None = None, timing: bool = False) -> dict[str, Any]:
    """Whole ``clipinvert edit`` processes on ``counts`` photos each (best of ``repeats``).

    The marginal cost of an edit is the slope between the smallest and the largest count, and
    start-up (interpreter, imports, loading the cached weights, the first batch's warm-up) is
    what the line leaves at zero photos.  With ``timing`` the command runs with
    ``CLIPINVERT_TIMING=1`` and the largest count's best run's phase lines are kept (start-up
    phases, per-image main-thread/reader/writer/model figures, the GPU's idle share).
    """
    import shutil
    import subprocess

    env = {**os.environ, "CLIPINVERT_HOME": str(workdir / "cache"),
           "CLIPINVERT_MODELS": str(workdir / "models.toml"),
           # the command's thread budget (clipinvert.runtime) takes PyTorch's share from it
           **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
           **({"CLIPINVERT_TIMING": "1"} if timing else {})}
    walls: dict[int, float] = {}
    phases: list[str] = []
    for n in counts:
        src = workdir / f"cli-in-{n}"
        src.mkdir(exist_ok=True)
        for p in photos[:n]:
            if not (src / p.name).exists():
                shutil.copyfile(p, src / p.name)
        best = math.inf
        for _ in range(repeats):
            out = workdir / f"cli-out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [*command, "edit", str(src), PROMPT, "--domain", "bench", "--aligned",
                    "--device", str(device), "--batch-size", batch, "-o", str(out), "--quiet",
                    *extra]
            t0 = time.perf_counter()
            # cwd: the work folder, so that `-m clipinvert` imports the installed package and
            # never a checkout that happens to be the current folder
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False,
                                  cwd=workdir)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                                   f"{done.stderr.strip()[-400:]}")
            if wall < best and n == max(counts):
                phases = timing_lines(done.stderr)
            best = min(best, wall)
        walls[n] = best
    lo, hi = min(counts), max(counts)
    per_image = (walls[hi] - walls[lo]) / (hi - lo)
    t0 = time.perf_counter()
    subprocess.run([*command, "--version"], env=env, capture_output=True, check=True,
                   cwd=workdir)
    version_s = time.perf_counter() - t0
    return {"command": " ".join(command), "batch": batch, "extra": list(extra),
            "walls_s": {str(n): w for n, w in walls.items()}, "per_image_s": per_image,
            "startup_s": walls[lo] - lo * per_image, "version_s": version_s,
            **({"timing": phases, "gpu_idle_percent": gpu_idle_percent(phases)}
               if timing else {})}


def cli_report(runs: list[dict[str, Any]], stage_sums: dict[int, float]) -> str:
    rows = []
    for r in runs:
        walls = ", ".join(f"{n}: {w:.1f}" for n, w in r["walls_s"].items())
        rows.append([r["command"] + (" " + " ".join(r["extra"]) if r["extra"] else ""),
                     r["batch"], walls, f"{r['per_image_s']:.3f}", f"{r['startup_s']:.1f}",
                     f"{r['version_s']:.2f}"])
    sums = ", ".join(f"B={b}: {s:.3f}" for b, s in stage_sums.items())
    return "\n".join([
        f"the command itself (clipinvert edit --aligned, whole processes, best run); the "
        f"benchmark's warm sum of stages per image: {sums}",
        "",
        format_table(["command", "--batch-size", "photos: wall s", "s per edit", "start-up s",
                      "--version s"], rows),
        *[f"CLIPINVERT_TIMING, --batch-size {r['batch']}, {max(map(int, r['walls_s']))} "
          f"photos: " + "; ".join(r["timing"]) for r in runs if r.get("timing")],
        *[f"GPU idle between batches, --batch-size {r['batch']}: {r['gpu_idle_percent']:.1f} %"
          for r in runs if r.get("gpu_idle_percent") is not None]])


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def report(meta: dict[str, Any], loads: dict[str, dict[str, float]], text_s: list[float],
           results: dict[int, dict[str, StageResult]], memory_label: str) -> str:
    parts = [
        f"clipinvert edit benchmark: device {meta['device']} ({meta['device_name']}), "
        f"dtype {meta['dtype']}, torch {meta['torch']}, {meta['cpu_count']} CPUs "
        f"({meta['threads']} torch threads), generator {meta['size']} px, "
        f"{meta['warmup']} warm-up + {meta['repeats']} timed repeat(s), median; "
        f"load average at start {meta['loadavg_1min']}",
        "",
        *([format_table(
            ["weights (first use)", "file MiB", "pickle s", "first (convert) s",
              "cached s"],
            [[role, f"{d['file_mib']:.0f}", *(f"{d[m + '_s']:.2f}" for m in LOAD_MODES)]
             for role, d in loads.items()]), ""] if loads else []),
        f"text embedding, 1 prompt uncached: {statistics.median(text_s):.3f} s",
        "",
    ]
    header = ["stage"]
    for b in results:
        header += [f"B={b} s/batch", f"B={b} img/s", f"B={b} {memory_label}"]
    rows = []
    for stage in (*STAGES, "sum of stages", WHOLE):
        row = [f"{stage} (whole)" if stage == WHOLE else stage]
        for b, res in results.items():
            if stage == "sum of stages":
                s = sum(res[k].median_s for k in STAGES)
                row += [f"{s:.3f}", f"{b / s:.3g}", ""]
            else:
                r = res[stage]
                row += [f"{r.median_s:.3f}", f"{r.images_per_s:.3g}", f"{r.peak_mib:.0f}"]
        rows.append(row)
    parts.append(format_table(header, rows))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_batch_sizes(text: str) -> tuple[int | str, ...]:
    """``1,8`` or ``1,auto``: ``auto`` is what ``--batch-size auto`` picks on the device."""
    try:
        sizes = tuple(s.strip() if s.strip() == "auto" else int(s)
                      for s in text.split(",") if s.strip())
    except ValueError:
        msg = f"not a comma-separated list of integers (or auto): {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not sizes or any(isinstance(s, int) and s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return sizes


def counts(text: str) -> tuple[int, ...]:
    sizes = parse_batch_sizes(text)
    if any(not isinstance(s, int) for s in sizes) or len(sizes) < 2:
        raise argparse.ArgumentTypeError(f"give two or more photo counts: {text!r}")
    return tuple(int(s) for s in sizes)


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time each stage of a clipinvert edit (random weights, released layouts) "
                    "and print images/s per stage and batch size.",
)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="weights/activations dtype; float16 is CUDA only (default: float32)")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=None,
                   help="comma-separated batch sizes, `auto` for what --batch-size auto picks "
                        "(default: 1,8, and auto on CUDA; 1,2 with --quick)")
    p.add_argument("--size", type=int, choices=(256, 512, 1024), default=None,
                   help="generator resolution (default: 1024; 256 with --quick)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed repeats per stage after the warm-up (default: 2; 1 with --quick)")
    p.add_argument("--warmup", type=count, default=1,
                   help="untimed runs before each stage (default: 1)")
    add_workdir_arguments(p, "random checkpoints, photos, outputs")
    p.add_argument("--quick", action="store_true",
                   help="size 256, batch sizes 1,2, 1 repeat: a smoke test for CI")
    p.add_argument("--skip-loads", action="store_true",
                   help="skip the first-use load timings (three loads of every file; they do "
                        "not depend on --dtype or the batch)")
    p.add_argument("--compare-float32", action="store_true",
                   help="with a --dtype below float32: also edit the test photos in both "
                        "and print the PSNR of --dtype's pictures against float32's")
    p.add_argument("--cli", action="store_true",
                   help="also time the real command, `clipinvert edit`, as whole processes on "
                        "the --cli-counts photo counts, at --cli-batch-sizes: per-edit cost "
                        "and start-up beside the stage figures")
    p.add_argument("--cli-only", action="store_true",
                   help="time only the command (skips the stage figures)")
    p.add_argument("--cli-counts", type=counts, default=(2, 10),
                   help="photo counts of the timed command runs (default: 2,10)")
    p.add_argument("--cli-batch-sizes", default="auto,1,8",
                   help="--batch-size values of the timed command runs (default: auto,1,8)")
    p.add_argument("--cli-repeats", type=positive_int, default=1,
                   help="runs per count; the best is kept (default: 1)")
    p.add_argument("--cli-timing", action="store_true",
                   help="run the timed command with CLIPINVERT_TIMING=1 and print its phase "
                        "lines (start-up phases, main-thread/reader/writer/model ms per image, "
                        "on CUDA the GPU's idle %% between batches)")
    p.add_argument("--clipinvert", default=None,
                   help="the command to time (default: this Python's `-m clipinvert`); e.g. "
                        "another checkout's `.venv/bin/python -m clipinvert` for a before/after")
    p.add_argument("--cli-args", default="",
                   help="extra arguments for every timed command, e.g. '--workers 0'")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="PyTorch threads for the run (torch.set_num_threads), and "
                        "OMP_NUM_THREADS for the timed command (default: PyTorch's own)")
    p.add_argument("--load", type=count, default=None,
                   help="busy-loop processes kept running while the figures are measured: a "
                        "machine other work also uses (default: none; with --threads-sweep, "
                        "the loaded half uses this many, default one per CPU)")
    p.add_argument("--threads-sweep", type=thread_counts, nargs="?", const=(1, 2), default=None,
                   metavar="N,N",
                   help="time only whole edits (B=1) at each thread count (default 1,2), idle "
                        "and beside --load busy processes, and print the seconds per edit")
    return p


def thread_counts(text: str) -> tuple[int, ...]:
    sizes = parse_batch_sizes(text)
    if any(not isinstance(s, int) for s in sizes):
        raise argparse.ArgumentTypeError(f"thread counts are integers: {text!r}")
    return tuple(int(s) for s in sizes)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        workdir, before = open_workdir(args.workdir)
    except (ClipInvertError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    # As the CLI does: large freed blocks stay in the process (clipinvert.runtime).
    allocator_tuned = tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Set before anything is loaded: the loaders' safetensors copies land in the work folder,
    # never in the user's own cache.
    saved_home = os.environ.get("CLIPINVERT_HOME")
    os.environ["CLIPINVERT_HOME"] = str(workdir / "cache")
    try:
        # the sweep starts its own busy loops, idle first
        with BusyLoad(0 if args.threads_sweep else args.load or 0):
            benchmark(args, device, dtype, workdir, allocator_tuned)
    finally:
        if saved_home is None:
            os.environ.pop("CLIPINVERT_HOME", None)
        else:
            os.environ["CLIPINVERT_HOME"] = saved_home
        if args.keep:
            print(f"kept the work folder {workdir}", file=sys.stderr)
        else:
            clean_workdir(workdir, before)
    return 0


def benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
              workdir: Path, allocator_tuned: bool = False) -> None:
    """The measured run; every file it writes goes under ``workdir``."""
    preset = QUICK if args.quick else DEFAULTS
    size = args.size or preset["size"]
    asked = args.batch_sizes or (*preset["batch_sizes"], *(
        ("auto",) if device.type == "cuda" and not args.quick else ()))
    repeats = args.repeats or preset["repeats"]
    warmup: int = args.warmup

    # Another busy process skews every figure; recorded so a reader can discount a noisy run.
    loadavg = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    paths, wrote = write_checkpoints(workdir, size)
    print(f"{'wrote' if wrote else 'reused'} random checkpoints in {workdir} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    clock = Clock(device)
    memory = PeakMemory(device)
    def make_editor(at: torch.dtype = dtype) -> Editor:
        return Editor.from_files(e4e=paths["e4e"], clipinverter=paths["clipinverter"],
                                 clip=paths["clip"], clip_arch=CLIP_ARCH, device=device,
                                 dtype=at)

    results: dict[int, dict[str, StageResult]] = {}
    loads: dict[str, dict[str, float]] = {}
    text_s: list[float] = []
    batch_sizes: list[int] = []
    sweep: list[dict[str, Any]] = []
    if args.threads_sweep:
        busy = args.load if args.load is not None else os.cpu_count() or 1
        sweep = threads_sweep(make_editor(), write_photos(workdir / "photos", 1),
                              workdir / "out", clock, memory, args.threads_sweep,
                              list(dict.fromkeys((0, busy))), warmup, repeats)
    elif not args.cli_only:
        if not args.skip_loads:
            loads = time_loads(make_editor, paths, clock, workdir)
        editor = make_editor()
        auto = editor.auto_batch_size() if "auto" in asked else None
        batch_sizes = list(dict.fromkeys(auto if b == "auto" else b for b in asked))
        if auto is not None:
            print(f"--batch-size auto picks {auto} here", file=sys.stderr)
        photos = write_photos(workdir / "photos", max(batch_sizes))
        text_s = time_text(editor, clock, repeats)
        for b in batch_sizes:
            print(f"timing B={b} ...", file=sys.stderr)
            results[b] = run_batch(editor, photos, workdir / "out", b, clock, memory, warmup,
                                   repeats)
        del editor
    psnr: dict[str, float] = {}
    if args.compare_float32 and dtype != torch.float32:
        psnr = precision_psnr(make_editor, dtype, size)
    cli_runs: list[dict[str, Any]] = []
    if args.cli or args.cli_only:
        write_domain(workdir, paths, size)
        command = shlex.split(args.clipinvert) if args.clipinvert else [
            sys.executable, "-m", "clipinvert"]
        cli_photos = write_photos(workdir / "photos", max(args.cli_counts))
        for b in args.cli_batch_sizes.split(","):
            print(f"timing the command at --batch-size {b} ...", file=sys.stderr)
            cli_runs.append(time_cli(command, workdir, cli_photos, args.cli_counts, b.strip(),
                                     device, shlex.split(args.cli_args), args.cli_repeats,
                                     args.threads, timing=args.cli_timing))

    meta = {
        **device_meta(device),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "size": size,
        "batch_sizes": list(batch_sizes),
        "warmup": warmup,
        "repeats": repeats,
        "memory": memory.label,
        "clip_arch": CLIP_ARCH,
        "loadavg_1min": loadavg,
        "allocator_tuned": allocator_tuned,
        "load_processes": 0 if args.threads_sweep else args.load or 0,
    }
    if sweep:
        print(sweep_report(sweep, meta))
    if results:
        print(report(meta, loads, text_s, results, memory.label))
    if psnr:
        print(f"\n{meta['dtype']} against float32, edits of the test photos: " + ", ".join(
            f"{name} {db:.1f} dB" for name, db in psnr.items()))
    if cli_runs:
        sums = {b: sum(res[k].median_s for k in STAGES) / b for b, res in results.items()}
        print(("\n" if results else "") + cli_report(cli_runs, sums))
    if args.json:
        figures = {
            "meta": meta,
            "loads": loads,
            "text_s": text_s,
            "stages": {str(b): {k: vars(r) for k, r in res.items()} for b, res in results.items()},
            "cli": cli_runs,
            "psnr_vs_float32_db": psnr,
            "threads_sweep": sweep,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
