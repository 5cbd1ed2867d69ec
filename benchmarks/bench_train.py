"""Throughput and peak memory of one clipinvert training step, with random full-size weights.

What a training run costs per step, measured the way training runs it: for every (stage,
resolution, batch) configuration this script builds the model and the loss networks through the
training code's own loaders (:func:`clipinvert.training.build.build_model` and
:func:`~clipinvert.training.build.build_criteria` over a registry, as ``clipinvert train`` does),
wraps them in a :class:`~clipinvert.training.loop.Trainer` and times
:meth:`Trainer.train_step <clipinvert.training.loop.Trainer.train_step>`: the CLIP text
embedding of the captions, :func:`~clipinvert.training.step.training_step` (real pass + cycle
pass, every loss term), the backward pass and the Ranger step of
:func:`~clipinvert.training.optim.make_optimizer`.  One step is run untimed first (allocator,
lazy init, the optimizer's state), then ``--steps`` steps are timed; s/step is their median.

The weights are random, written in the released layouts at the released sizes (no download):

* e4e with the released IR-SE50 widths, and the matching rosinality ``g_ema`` (the stage-1
  decoder), at generator resolution 1024 (faces) and 256 (birds);
* stage 2's ``--init``: a stage-1 result (adapter + decoder without remapper; the remapper is
  initialised afresh, as training does);
* CLIP ViT-B/32 (``ViT-B-32-quickgelu``) at its real size;
* the identity network: ArcFace IR-SE50 at its real size (``--identity``: or MoCo-v2 ResNet-50,
  what the non-face domains train with, or ``domain``: ArcFace at 1024, MoCo at 256 and 512);
* the LPIPS AlexNet trunk.

Random weights cost what trained ones cost (same shapes, same kernels).  The input batch is
random pixels at the encoder's 256 px (data loading is not timed: training does it in worker
processes).  By default every step edits with mismatched captions (``--match-prob 0``), the
dearer case that 3 of 4 released steps take (the directional CLIP term runs in both passes).

Memory safety: every configuration runs in a subprocess of its own.  This process watches the
subprocess's resident memory and kills it once it exceeds ``--max-rss-gib`` (default 16 GiB);
that row then reads "out of memory (> 16 GiB)".  On CUDA the subprocess catches
``torch.cuda.OutOfMemoryError`` and reports it the same way, with the CUDA peak it reached.  A
configuration that runs past ``--timeout`` seconds (default 900, building included) is killed
and reported as "timed out".  When a batch size runs out of memory (or time), the larger batch
sizes of the same stage and resolution are skipped.

Peak memory: on the CPU the subprocess's peak RSS while stepping (``VmHWM``, reset after the
build, so it counts every resident model plus the step's activations and gradients); on CUDA
``torch.cuda.max_memory_allocated`` over the steps.  The build's own peak RSS (loading, the
first-use safetensors conversion) is in the JSON.

Disk: like ``bench_edit.py``, everything (random checkpoints, ``models.toml``, the loaders'
safetensors copies: ``CLIPINVERT_HOME`` points inside it) stays in one work folder, a fresh
temporary one unless ``--workdir`` names one, deleted at the end unless ``--keep`` is given
(6.6 GB with both resolutions).

Examples::

    python benchmarks/bench_train.py                        # auto device, 256 + 1024, B=2,8
    python benchmarks/bench_train.py --quick                # 256 px, B=2, 1 step: smoke test
    python benchmarks/bench_train.py --device cpu --sizes 256 --json cpu-256.json
    python benchmarks/bench_train.py --workdir ~/bench-train --keep   # reuse the files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchcommon import (
    add_workdir_arguments,
    clean_workdir,
    device_meta,
    format_table,
    open_workdir,
    positive_int,
    write_once,
)

# This process only orchestrates: torch and clipinvert are imported in the subprocesses, so the
# parent stays small while a configuration runs.

CLIP_ARCH = "ViT-B-32-quickgelu"  # as bench_edit.py: the released models need QuickGELU
TEXT_DIM = 512
IDENTITIES = ("arcface", "moco", "domain")
# Full-run and --quick defaults; an option given explicitly always wins over either.
DEFAULTS = {"sizes": (256, 1024), "batch_sizes": (2, 8), "steps": 3}
QUICK = {"sizes": (256,), "batch_sizes": (2,), "steps": 1}
POLL_S = 0.05  # RSS sampling period of the watcher: fast enough to stop a runaway step


# --------------------------------------------------------------------------------------------
# Small helpers (torch-free: used by the watching parent)
# --------------------------------------------------------------------------------------------


def gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` (VmRSS), or None once it is gone."""
    try:
        import psutil  # optional
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def identity_for(identity: str, size: int) -> str:
    """The identity network of a resolution: as asked, or as the packaged domains do."""
    if identity != "domain":
        return identity
    return "arcface" if size == 1024 else "moco"  # faces | cats (512), birds (256)


# --------------------------------------------------------------------------------------------
# Subprocess 1: the random checkpoints and the registry naming them
# --------------------------------------------------------------------------------------------


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Write every file the configurations need (reusing those present: the writers are
    seeded, so an existing file is the same file) and ``models.toml`` with one domain per
    resolution; resolve the device.  Runs in a subprocess of its own."""

    from clipinvert.nets import GeneratorConfig
    from clipinvert.pipeline import resolve_device
    from clipinvert.testing.clip import write_random_clip
    from clipinvert.testing.models import (
        write_alexnet_trunk,
        write_arcface,
        write_clipinverter,
        write_e4e,
        write_moco,
        write_stylegan2,
    )

    device = resolve_device(spec["device"])
    workdir = Path(spec["workdir"])
    t0 = time.perf_counter()
    wrote = False

    def clip(tmp: Path) -> Path:
        staging = tmp.with_suffix(".dir")
        out = write_random_clip(staging, arch=CLIP_ARCH)
        os.replace(out, tmp)
        staging.rmdir()
        return tmp

    wrote |= write_once(workdir / "clip.pt", clip)
    wrote |= write_once(workdir / "alexnet.pt", write_alexnet_trunk)
    kinds = {identity_for(spec["identity"], s) for s in spec["sizes"]}
    if "arcface" in kinds:
        wrote |= write_once(workdir / "arcface.pt", lambda p: write_arcface(p, tiny=False))
    if "moco" in kinds:
        wrote |= write_once(workdir / "moco.pt", lambda p: write_moco(p, tiny=False))
    toml = []
    for size in spec["sizes"]:
        print(f"writing the {size} px checkpoints ...", file=sys.stderr, flush=True)
        cfg = GeneratorConfig(size=size)  # full width: the real channel counts, style_dim 512
        wrote |= write_once(workdir / f"e4e-{size}.pt",
                             lambda p, cfg=cfg: write_e4e(p, cfg, encoder="released"))
        # = the e4e file's decoder (same seed), as the released stage-1 decoder is
        wrote |= write_once(workdir / f"stylegan2-{size}.pt",
                             lambda p, cfg=cfg: write_stylegan2(p, cfg, seed=1))
        if 2 in spec["stages"]:
            # What stage 1 leaves: the adapter and a decoder without remapper.
            wrote |= write_once(
                workdir / f"stage1-{size}.pt",
                lambda p, cfg=cfg: write_clipinverter(p, cfg, text_dim=TEXT_DIM, remapper=False,
                                                      encoder="released"))
        ident = identity_for(spec["identity"], size)
        toml.append(f"[domains.bench-{size}]\nresolution = {size}\nalign = \"none\"\n"
                    f"clip_arch = \"{CLIP_ARCH}\"\nclip = \"clip.pt\"\n"
                    f"e4e = \"e4e-{size}.pt\"\nstylegan2 = \"stylegan2-{size}.pt\"\n"
                    f"lpips = \"alexnet.pt\"\n{ident} = \"{ident}.pt\"\n")
    (workdir / "models.toml").write_text("\n".join(toml), encoding="utf-8")
    return {
        **device_meta(device),
        "wrote": wrote,
        "prepare_s": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------
# Subprocess 2: one (stage, resolution, batch) configuration
# --------------------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError | MemoryError) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in text
        or "out of memory" in text.lower())


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Build through the training loaders, warm up, time ``steps`` Trainer steps."""
    import statistics

    import torch

    from clipinvert.clip_encoder import ClipEncoder
    from clipinvert.registry import Registry
    from clipinvert.testing.training import CAPTIONS
    from clipinvert.training.build import build_criteria, build_model, locate_training_files
    from clipinvert.training.config import TrainConfig
    from clipinvert.training.loop import Trainer

    workdir = Path(spec["workdir"])
    device = torch.device(spec["device"])
    stage, size, batch = spec["stage"], spec["size"], spec["batch"]
    cuda = device.type == "cuda"
    result: dict[str, Any] = {"status": "ok"}

    def say(msg: str) -> None:
        print(f"  [stage {stage}, {size} px, B={batch}] {msg}", file=sys.stderr, flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    registry = Registry.load(workdir / "models.toml", user=False)
    domain = registry.domain(f"bench-{size}")
    files = locate_training_files(registry, domain)
    cfg = TrainConfig.for_stage(
        stage, domain=domain.name, data=str(workdir), run_dir=str(workdir / "run"),
        batch_size=batch, init=str(workdir / f"stage1-{size}.pt") if stage == 2 else None,
        match_prob=spec["match_prob"], amp=spec["amp"], device=str(device),
        models=str(workdir / "models.toml"))
    # What training.build.build does, minus the data sets.
    clip = ClipEncoder(domain.clip_arch, files["clip"], device=device, base_dir=domain.base_dir)
    model = build_model(files, cfg, clip.embed_dim).to(device)
    criteria = build_criteria(files, domain, clip, cfg, device)
    trainer = Trainer(cfg, model, lambda caps: clip.encode_text(caps), criteria, None, None,
                      device=device, log=say)
    if cfg.amp and not hasattr(trainer, "autocast"):
        raise RuntimeError(f"--amp {cfg.amp}: this version's Trainer has no mixed precision")
    sync()
    result["build_s"] = time.perf_counter() - t0
    result["build_peak_rss_mib"] = _peak_rss_mib()
    result["trainable_params"] = sum(p.numel() for p in trainer.params)
    say(f"built in {result['build_s']:.1f} s ({result['trainable_params'] / 1e6:.2f} M "
        "trainable parameters)")

    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1).to(device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    step_batch = {"image": x, "caption": captions}
    torch.manual_seed(0)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result["memory"] = "cuda" if cuda else ("rss" if _reset_peak_rss() else "rss-lifetime")
    times: list[float] = []
    cpu_times: list[float] = []
    threads = torch.get_num_threads()
    try:
        for i in range(1 + spec["steps"]):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.train_step(step_batch)
            sync()
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            trainer.step += 1
            use = f"CPU use {cpu / seconds / threads:.0%} of {threads} threads"
            if i == 0:
                result["warmup_s"] = seconds
                say(f"warm-up step {seconds:.2f} s ({use})")
            else:
                times.append(seconds)
                cpu_times.append(cpu)
                say(f"step {i}/{spec['steps']} {seconds:.2f} s ({use})")
    except Exception as exc:  # noqa: BLE001 - reported per row, never a crash of the whole run
        if not _is_oom(exc):
            raise
        result["status"] = "oom"
        result["message"] = (str(exc) or type(exc).__name__).splitlines()[0][:200]
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_rss_mib"] = _peak_rss_mib()
    else:
        result["peak_mib"] = _peak_rss_mib()
    say(f"peak {'CUDA memory' if cuda else 'RSS'} {gib(result['peak_mib'])} GiB")
    if times:
        med = statistics.median(times)
        result.update(step_times_s=times, s_per_step=med, steps_per_s=1 / med,
                      images_per_s=batch / med, step_cpu_s=cpu_times,
                      # below ~90 % on the CPU: the step waited for CPUs another process held
                      cpu_use=sum(cpu_times) / sum(times) / threads)
    return result


# --------------------------------------------------------------------------------------------
# The watching parent
# --------------------------------------------------------------------------------------------


def run_child(mode: str, spec: dict[str, Any], env: dict[str, str], max_rss_mib: float,
              timeout_s: float, out: Path) -> tuple[str, dict[str, Any], float]:
    """Run this script in ``mode`` in a subprocess, watching its RSS and its time.

    Returns ``(status, result, max sampled RSS MiB)``; status "ok" (result: the child's JSON),
    "oom" (killed over the limit), "timeout", or "error" (result["message"]).
    """
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--_{mode}", json.dumps(spec),
           "--_out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr, start_new_session=True)
    start = time.monotonic()
    peak = 0.0
    killed = None
    try:
        while proc.poll() is None:
            rss = rss_mib(proc.pid)
            if rss is not None:
                peak = max(peak, rss)
                if rss > max_rss_mib:
                    killed = "oom"
            if killed is None and time.monotonic() - start > timeout_s:
                killed = "timeout"
            if killed:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(POLL_S)
    except BaseException:  # Ctrl-C: never leave a 16 GiB child behind
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        raise
    if killed:
        return killed, {}, peak
    if proc.returncode == 0 and out.is_file():
        return "ok", json.loads(out.read_text(encoding="utf-8")), peak
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        hint = " (the kernel's OOM killer?)" if proc.returncode == -signal.SIGKILL else ""
        return "error", {"message": f"killed by {name}{hint}"}, peak
    return "error", {"message": f"exit status {proc.returncode} (its traceback is above)"}, peak


def describe_failure(status: str, args: argparse.Namespace, result: dict[str, Any]) -> str:
    if status == "oom":
        return f"out of memory (> {args.max_rss_gib:g} GiB)"
    if status == "timeout":
        return f"timed out (> {args.timeout:g} s)"
    if status == "cuda-oom":
        return f"CUDA out of memory (peak {gib(result.get('peak_mib', 0))} GiB)"
    if status == "skipped":
        return result["message"]
    return f"error: {result.get('message', '?')}"


def report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    la = meta["loadavg_start"]
    la_end = meta["loadavg_end"]
    lines = [
        f"clipinvert training-step benchmark: device {meta['device']} ({meta['device_name']}), "
        f"torch {meta['torch']}, {meta['cpu_count']} CPUs ({meta['threads']} torch threads), "
        f"float32{' + amp ' + meta['amp'] if meta['amp'] else ''}, identity "
        f"{meta['identity']}, match_prob {meta['match_prob']:g}; 1 warm-up + "
        f"{meta['steps']} timed step(s), median",
        f"load average (1, 5, 15 min) at start {la}, at end {la_end}; 'load 1 min': as each "
        "configuration started; 'CPU use': this process's CPU time over the timed steps / (wall "
        "time x torch threads) — well under 100 % on the CPU means another process held CPUs "
        "and the s/step is inflated",
        "",
    ]
    mem = "peak CUDA GiB" if meta["device"].startswith("cuda") else "peak RSS GiB"
    header = ["stage", "resolution", "batch", "s/step", "steps/s", "images/s", mem,
              "warm-up s", "CPU use", "load 1 min", "note"]
    table = []
    for r in rows:
        start = [str(r["stage"]), str(r["resolution"]), str(r["batch"])]
        load = f"{r['loadavg_1min']:.2f}" if r.get("loadavg_1min") is not None else ""
        if r["status"] == "ok":
            table.append([*start, f"{r['s_per_step']:.2f}", f"{r['steps_per_s']:.3g}",
                          f"{r['images_per_s']:.3g}", gib(r["peak_mib"]),
                          f"{r['warmup_s']:.1f}", f"{r['cpu_use']:.0%}", load,
                          "" if r["memory"] != "rss-lifetime" else "lifetime RSS peak"])
        else:
            table.append([*start, "", "", "", gib(r["peak_mib"]) if r.get("peak_mib") else "",
                          f"{r['warmup_s']:.1f}" if r.get("warmup_s") else "", "", load,
                          r["note"]])
    lines.append(format_table(header, table, text_last=True))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def int_list(allowed: Sequence[int] | None = None):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of integers: {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"must be positive integers: {text!r}")
        if allowed and any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"each must be one of {list(allowed)}: {text!r}")
        return values

    return parse


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time a clipinvert training step (stage 1 and 2; random weights at the "
                    "released sizes) and print steps/s and peak memory per stage, resolution "
                    "and batch size.  Each configuration runs in its own watched subprocess.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--stages", type=int_list((1, 2)), default=(1, 2),
                   help="comma-separated training stages (default: 1,2)")
    p.add_argument("--sizes", type=int_list((256, 512, 1024)), default=None,
                   help="comma-separated generator resolutions (default: 256,1024 — birds and "
                        "faces; 256 with --quick)")
    p.add_argument("--batch-sizes", type=int_list(), default=None,
                   help="comma-separated batch sizes, at least 2 (default: 2,8; 2 with --quick)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="timed steps after the one warm-up step (default: 3; 1 with --quick)")
    p.add_argument("--identity", choices=IDENTITIES, default="arcface",
                   help="identity network: ArcFace IR-SE50 (default), MoCo-v2 ResNet-50, or "
                        "'domain': ArcFace at 1024 (faces), MoCo at 256/512 (birds, cats)")
    p.add_argument("--match-prob", type=probability, default=0.0,
                   help="probability of the true captions in a step (default 0: every step "
                        "mismatched, the dearer case with the directional CLIP term; the "
                        "released recipe trains with 0.25)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision, CUDA only (default: float32)")
    p.add_argument("--max-rss-gib", type=positive_float, default=16.0,
                   help="kill a configuration whose resident memory exceeds this (default: 16)")
    p.add_argument("--timeout", type=positive_float, default=900.0,
                   help="kill a configuration running longer than this many seconds, building "
                        "included (default: 900)")
    add_workdir_arguments(p, "random checkpoints, models.toml")
    p.add_argument("--quick", action="store_true",
                   help="resolution 256, batch 2, 1 timed step (both stages): a smoke test")
    # Internal: the subprocesses.
    p.add_argument("--_prepare", help=argparse.SUPPRESS)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def child_main(args: argparse.Namespace) -> int:
    spec = json.loads(args._prepare or args._worker)
    result = prepare(spec) if args._prepare else run_config(spec)
    args._out.write_text(json.dumps(result), encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._prepare or args._worker:
        return child_main(args)
    preset = QUICK if args.quick else DEFAULTS
    sizes = args.sizes or preset["sizes"]
    batch_sizes = args.batch_sizes or preset["batch_sizes"]
    steps = args.steps or preset["steps"]
    if min(batch_sizes) < 2:
        parser.error("--batch-sizes: training needs at least 2 images per batch")
    if args.amp and args.device == "cpu":
        parser.error("--amp needs a CUDA device")
    try:
        workdir, before = open_workdir(args.workdir, "clipinvert-bench-train-")
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The subprocesses' loaders put their safetensors copies in the work folder, never in the
    # user's own cache, and read only this run's registry.
    env = dict(os.environ, CLIPINVERT_HOME=str(workdir / "cache"), PYTHONUNBUFFERED="1")
    env.pop("CLIPINVERT_MODELS", None)
    # SIGTERM stops the run as Ctrl-C does: the running configuration's subprocess is killed
    # (run_child) and the work folder cleaned, rather than a 16 GiB orphan left behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return benchmark(args, workdir, env, sizes, batch_sizes, steps)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            print(f"kept the work folder {workdir}", file=sys.stderr)
        else:
            clean_workdir(workdir, before)


def benchmark(args: argparse.Namespace, workdir: Path, env: dict[str, str],
              sizes: Sequence[int], batch_sizes: Sequence[int], steps: int) -> int:
    max_rss_mib = args.max_rss_gib * 1024
    la_start = loadavg()
    out = workdir / "result.json"
    spec = {"workdir": str(workdir), "device": args.device, "sizes": list(sizes),
            "stages": list(args.stages), "identity": args.identity}
    t0 = time.perf_counter()
    status, info, _ = run_child("prepare", spec, env, max_rss_mib, args.timeout, out)
    if status != "ok":
        print(f"error: writing the checkpoints failed: {describe_failure(status, args, info)}",
              file=sys.stderr)
        return 1
    print(f"{'wrote' if info['wrote'] else 'reused'} random checkpoints in {workdir} "
          f"({time.perf_counter() - t0:.1f} s); device {info['device']}", file=sys.stderr)
    if args.amp and not info["device"].startswith("cuda"):
        print(f"error: --amp needs a CUDA device, not {info['device']}", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    try:
        run_all(args, workdir, env, info, rows, sizes, batch_sizes, steps, max_rss_mib, out)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: report what was measured, then stop
        if rows and "status" not in rows[-1]:
            rows[-1].update(status="interrupted", note="interrupted")
        interrupted = True
    else:
        interrupted = False

    meta = {
        **{k: info[k] for k in ("device", "device_name", "torch", "threads")},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "steps": steps,
        "warmup": 1,
        "identity": args.identity,
        "match_prob": args.match_prob,
        "amp": args.amp,
        "clip_arch": CLIP_ARCH,
        "max_rss_gib": args.max_rss_gib,
        "timeout_s": args.timeout,
        "loadavg_start": la_start,
        "loadavg_end": loadavg(),
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    print(report(meta, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n",
                             encoding="utf-8")
    if interrupted:
        raise KeyboardInterrupt
    return 0


def run_all(args: argparse.Namespace, workdir: Path, env: dict[str, str], info: dict[str, Any],
            rows: list[dict[str, Any]], sizes: Sequence[int], batch_sizes: Sequence[int],
            steps: int, max_rss_mib: float, out: Path) -> None:
    """Every configuration in turn, each in a watched subprocess; appends to ``rows``."""
    for size in sizes:
        for stage in args.stages:
            failed_at: int | None = None
            for batch in sorted(batch_sizes):
                row: dict[str, Any] = {"stage": stage, "resolution": size, "batch": batch,
                                       "identity": identity_for(args.identity, size)}
                rows.append(row)
                if failed_at is not None:
                    row.update(status="skipped",
                               note=f"skipped (B={failed_at} did not fit)")
                    continue
                la = loadavg()
                row["loadavg_1min"] = la[0] if la else None  # others' work skews the figures
                print(f"stage {stage}, {size} px, B={batch} ... (load average {la})",
                      file=sys.stderr, flush=True)
                worker = {"workdir": str(workdir), "device": info["device"], "stage": stage,
                          "size": size, "batch": batch, "steps": steps,
                          "match_prob": args.match_prob, "amp": args.amp}
                started = time.perf_counter()
                status, result, sampled = run_child("worker", worker, env, max_rss_mib,
                                                    args.timeout, out)
                row["wall_s"] = round(time.perf_counter() - started, 1)
                row["sampled_max_rss_mib"] = round(sampled, 1)
                if status == "ok":
                    row.update(result)
                    status = result["status"]
                    if status == "oom":
                        status = "cuda-oom" if info["device"].startswith("cuda") else "oom"
                row["status"] = status
                if status != "ok":
                    row["note"] = describe_failure(status, args, row if status != "error"
                                                   else result)
                    if status in ("oom", "cuda-oom", "timeout"):
                        failed_at = batch
                    print(f"  -> {row['note']}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
