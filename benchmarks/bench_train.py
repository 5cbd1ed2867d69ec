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

The e4e stage (``--stages e4e``: the encoder's own training, docs/training.md#e4e-stage) times
:func:`clipinvert.training.e4e_step.e4e_step` with the recipe's settings (it trains at
batch 8; 256 px input, the generator's output pooled to 256, L2 + LPIPS-alex + identity — ArcFace or
MoCo as ``--identity`` says, weight 0.1 / 0.5 — the latent discriminator with R1 every 16 steps,
delta regularisation, w-pools of 50): the e4e file's encoder (IR-SE50, every style head) under
Ranger, the ``stylegan2`` role's generator frozen.  Two phases, each with its own warm-up step:
the fully progressive stage (every delta trains; step 52000+ at 18 styles) and stage 0 (w0
only).  Each times ``--steps`` plain steps and one R1 step (``step % 16 == 0``); the row's
s/step is the mean over 16 steps, ``(15 · plain + R1) / 16``.  For every stage the report also
gives the released recipe's time on the device: 200k steps × s/step, in days (e4e: its first
20k steps at stage 0's cost, the rest at the full stage's).

The weights are random, written in the released layouts at the released sizes (no download):

* e4e with the released IR-SE50 widths, and the matching rosinality ``g_ema`` (the stage-1
  decoder), at generator resolution 1024 (faces) and 256 (birds);
* for the e4e stage, e4e's latent discriminator (4-layer MLP, fresh) and the identity network
  of ``--identity`` (``domain``: ArcFace at 1024, MoCo-v2 ResNet-50 at 256 and 512);
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

    python benchmarks/bench_train.py                        # auto device, stages 1,2,e4e,
                                                            # 256 + 1024 px, B=2,8
    python benchmarks/bench_train.py --quick                # 256 px, B=2, 1 step: smoke test
    python benchmarks/bench_train.py --stages e4e --identity domain --sizes 256,1024
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
RECIPE_STEPS = 200_000  # the released recipes (stages 1, 2 and e4e's own): 200k steps of B 8
STAGES = (1, 2, "e4e")
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
    resolution; resolve the device.  Runs in a subprocess of its own.

    ``tiny``: narrow networks of the same architectures (the tiny IR-SE encoder, 32-channel
    generator with 64-d styles, the tiny ArcFace/MoCo; CLIP and AlexNet stay full size) under
    their own file names, for tests: the same code path in seconds."""

    from clipinvert.nets import GeneratorConfig
    from clipinvert.pipeline import resolve_device
    from clipinvert.testing.clip import write_random_clip
    from clipinvert.testing.models import (
        tiny_config,
        write_alexnet_trunk,
        write_arcface,
        write_clipinverter,
        write_e4e,
        write_moco,
        write_stylegan2,
    )

    device = resolve_device(spec["device"])
    workdir = Path(spec["workdir"])
    tiny = spec.get("tiny", False)
    tag = "-tiny" if tiny else ""
    encoder = "tiny" if tiny else "released"
    t0 = time.perf_counter()
    wrote = False

    def clip(tmp: Path) -> Path:
        staging = tmp.with_suffix(".dir")
        out = write_random_clip(staging, arch=CLIP_ARCH)
        os.replace(out, tmp)
        staging.rmdir()
        return tmp

    if {1, 2} & set(spec["stages"]):  # the e4e stage has no text
        wrote |= write_once(workdir / "clip.pt", clip)
    wrote |= write_once(workdir / "alexnet.pt", write_alexnet_trunk)
    kinds = {identity_for(spec["identity"], s) for s in spec["sizes"]}
    if "arcface" in kinds:
        wrote |= write_once(workdir / f"arcface{tag}.pt",
                             lambda p: write_arcface(p, tiny=tiny))
    if "moco" in kinds:
        wrote |= write_once(workdir / f"moco{tag}.pt", lambda p: write_moco(p, tiny=tiny))
    toml = []
    for size in spec["sizes"]:
        print(f"writing the {size} px checkpoints ...", file=sys.stderr, flush=True)
        # full width: the real channel counts, style_dim 512
        cfg = tiny_config(size) if tiny else GeneratorConfig(size=size)
        wrote |= write_once(workdir / f"e4e-{size}{tag}.pt",
                             lambda p, cfg=cfg: write_e4e(p, cfg, encoder=encoder))
        # = the e4e file's decoder (same seed), as the released stage-1 decoder is
        wrote |= write_once(workdir / f"stylegan2-{size}{tag}.pt",
                             lambda p, cfg=cfg: write_stylegan2(p, cfg, seed=1))
        if 2 in spec["stages"]:
            # What stage 1 leaves: the adapter and a decoder without remapper.
            wrote |= write_once(
                workdir / f"stage1-{size}{tag}.pt",
                lambda p, cfg=cfg: write_clipinverter(p, cfg, text_dim=TEXT_DIM, remapper=False,
                                                      encoder=encoder))
        ident = identity_for(spec["identity"], size)
        toml.append(f"[domains.bench-{size}]\nresolution = {size}\nalign = \"none\"\n"
                    f"clip_arch = \"{CLIP_ARCH}\"\nclip = \"clip.pt\"\n"
                    f"e4e = \"e4e-{size}{tag}.pt\"\nstylegan2 = \"stylegan2-{size}{tag}.pt\"\n"
                    f"lpips = \"alexnet.pt\"\n{ident} = \"{ident}{tag}.pt\"\n")
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


@dataclass
class Phase:
    """Steps timed together: ``warmup`` (the untimed first one), then the ``plain`` steps and
    the ``r1`` ones (the e4e stage's steps with R1, ``step % d_reg_every == 0``); each a step
    number that ``run(step)`` trains.  ``stage`` is e4e's progressive stage (None otherwise)."""

    run: Callable[[int], Any]
    warmup: int
    plain: list[int]
    r1: list[int] = field(default_factory=list)
    stage: int | None = None


@dataclass
class Built:
    phases: list[Phase]
    trainable_params: int
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific figures, into the JSON


def build_clipinverter(spec: dict[str, Any], device: Any, say: Callable[[str], None]) -> Built:
    """Stages 1 and 2: through the training loaders into a Trainer, whose train_step is timed
    (the CLIP text embedding, every loss term, backward, Ranger)."""
    from clipinvert.clip_encoder import ClipEncoder
    from clipinvert.registry import Registry
    from clipinvert.testing.training import CAPTIONS
    from clipinvert.training.build import build_criteria, build_model, locate_training_files
    from clipinvert.training.config import TrainConfig
    from clipinvert.training.loop import Trainer

    workdir = Path(spec["workdir"])
    stage, size, batch = spec["stage"], spec["size"], spec["batch"]
    registry = Registry.load(workdir / "models.toml", user=False)
    domain = registry.domain(f"bench-{size}")
    files = locate_training_files(registry, domain)
    tag = "-tiny" if spec.get("tiny") else ""
    cfg = TrainConfig.for_stage(
        stage, domain=domain.name, data=str(workdir), run_dir=str(workdir / "run"),
        batch_size=batch, init=str(workdir / f"stage1-{size}{tag}.pt") if stage == 2 else None,
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
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    step_batch = {"image": bench_input(batch, device), "caption": captions}

    def run(step: int) -> None:
        trainer.step = step
        trainer.train_step(step_batch)

    steps = list(range(1, 1 + spec["steps"]))
    return Built([Phase(run, 0, steps)], sum(p.numel() for p in trainer.params))


def bench_input(batch: int, device: Any) -> Any:
    """Random pixels at the encoder's 256 px, in [−1, 1] (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return (torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1).to(device)


def build_e4e(spec: dict[str, Any], device: Any, say: Callable[[str], None]) -> Built:
    """The e4e stage's step (:func:`clipinvert.training.e4e_step.e4e_step`) with the recipe's
    settings: the encoder (the e4e file's, released IR-SE50 widths, in train mode) under Ranger
    (lr 1e-4, one group per progressive stage), the frozen decoder of the ``stylegan2`` role,
    e4e's latent discriminator under Adam, both w-pools of 50, L2 + LPIPS-alex + identity on
    the output pooled to 256.  Timed at the fully progressive stage (every delta) and at
    stage 0, each with plain steps and one R1 step."""
    import contextlib

    import torch

    from clipinvert.checkpoints import load_e4e, load_stylegan2
    from clipinvert.losses import IdentityLoss, LPIPSLoss
    from clipinvert.nets import LatentDiscriminator
    from clipinvert.registry import Registry
    from clipinvert.training.build import _own, identity_role
    from clipinvert.training.e4e_step import (
        E4ECriteria,
        E4EParts,
        E4ESettings,
        E4EWeights,
        WPool,
        default_id_weight,
        e4e_step,
        ensure_groups,
        progressive_stage,
        progressive_steps,
    )
    from clipinvert.training.optim import make_optimizer

    workdir = Path(spec["workdir"])
    registry = Registry.load(workdir / "models.toml", user=False)
    domain = registry.domain(f"bench-{spec['size']}")
    role = identity_role(domain)
    files = registry.locate_all(domain, ["e4e", "stylegan2", "lpips", role])
    settings = E4ESettings(weights=E4EWeights(id=default_id_weight(role)))
    e4e = load_e4e(files["e4e"])
    encoder = _own(e4e.encoder).to(device).train().requires_grad_(True)  # loaders freeze
    decoder, _ = load_stylegan2(files["stylegan2"])
    decoder = decoder.to(device).eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        disc = LatentDiscriminator(encoder.style_dim).to(device)
    groups = encoder.progressive_groups()
    parts = E4EParts(encoder=encoder, decoder=decoder, latent_avg=e4e.latent_avg.to(device),
                     discriminator=disc, optimizer=make_optimizer(groups[0], 1e-4),
                     d_optimizer=torch.optim.Adam(disc.parameters(), lr=settings.d_lr),
                     real_pool=WPool(settings.w_pool_size),
                     fake_pool=WPool(settings.w_pool_size))
    criteria = E4ECriteria(identity=IdentityLoss.from_file(role, files[role]).to(device),
                           lpips=LPIPSLoss.from_file(files["lpips"]).to(device))
    x = bench_input(spec["batch"], device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["amp"] or "")

    def run(step: int) -> None:
        stage = progressive_stage(step, settings, encoder.n_styles)
        ensure_groups(parts.optimizer, groups, stage)
        # as the Trainer's autocast (the e4e step has no GradScaler: fp16 times the same kernels)
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            e4e_step(parts, x, step=step, seed=0, settings=settings, criteria=criteria,
                     stage=stage)

    every, n = settings.d_reg_every, spec["steps"]
    full = encoder.n_styles - 1
    # the first R1 step once every delta trains (52000 at 18 styles): warm-up, then plain steps
    first = -(-progressive_steps(settings.progressive_start, settings.progressive_step_every,
                                 encoder.n_styles)[-1] // every) * every
    phases = [Phase(run, first, list(range(first + 1, first + 1 + n)), [first + every], full),
              Phase(run, 0, list(range(1, 1 + n)), [every], 0)]
    assert n < every and progressive_stage(first, settings, encoder.n_styles) == full
    assert every < settings.progressive_start  # stage 0's steps stay at stage 0
    params = sum(p.numel() for p in encoder.parameters()) + \
        sum(p.numel() for p in disc.parameters())
    return Built(phases, params, {"identity": role, "n_styles": encoder.n_styles,
                                  "d_reg_every": every,
                                  "progressive_start": settings.progressive_start})


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Build through the training loaders, then time each phase: one untimed warm-up step, the
    plain steps (s/step: their median) and the R1 steps."""
    import statistics

    import torch

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
    build = build_e4e if stage == "e4e" else build_clipinverter
    built = build(spec, device, say)
    sync()
    result["build_s"] = time.perf_counter() - t0
    result["build_peak_rss_mib"] = _peak_rss_mib()
    result["trainable_params"] = built.trainable_params
    result.update(built.info)
    say(f"built in {result['build_s']:.1f} s ({built.trainable_params / 1e6:.2f} M "
        "trainable parameters)")
    torch.manual_seed(0)

    threads = torch.get_num_threads()
    phases: list[dict[str, Any]] = []
    result["phases"] = phases
    memory = "cuda" if cuda else "rss"

    def timed(step: int, phase: Phase, what: str) -> tuple[float, float]:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        phase.run(step)
        sync()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        where = "" if phase.stage is None else f"progressive stage {phase.stage}, "
        say(f"{where}{what} (step {step}) {seconds:.2f} s "
            f"(CPU use {cpu / seconds / threads:.0%} of {threads} threads)")
        return seconds, cpu

    try:
        for phase in built.phases:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            elif not _reset_peak_rss():
                memory = "rss-lifetime"
            row: dict[str, Any] = {"progressive_stage": phase.stage}
            phases.append(row)
            row["warmup_s"] = timed(phase.warmup, phase, "warm-up step")[0]
            plain = [timed(s, phase, "step") for s in phase.plain]
            r1 = [timed(s, phase, "R1 step") for s in phase.r1]
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                               else _peak_rss_mib())
            med = statistics.median(t for t, _ in plain)
            row.update(step_times_s=[t for t, _ in plain], s_per_step=med,
                       step_cpu_s=[c for _, c in plain],
                       # below ~90 % on the CPU: the step waited for CPUs another process held
                       cpu_use=sum(c for _, c in plain + r1) / sum(t for t, _ in plain + r1)
                       / threads)
            if r1:
                every = built.info["d_reg_every"]
                r1_s = statistics.median(t for t, _ in r1)
                row.update(r1_times_s=[t for t, _ in r1], plain_s=med, r1_s=r1_s,
                           # one step in d_reg_every has R1: the mean over a run
                           s_per_step=((every - 1) * med + r1_s) / every)
            row.update(steps_per_s=1 / row["s_per_step"],
                       images_per_s=batch / row["s_per_step"])
    except Exception as exc:  # noqa: BLE001 - reported per row, never a crash of the whole run
        if not _is_oom(exc):
            raise
        result["status"] = "oom"
        result["message"] = (str(exc) or type(exc).__name__).splitlines()[0][:200]
        if phases and "peak_mib" not in phases[-1]:
            phases[-1]["peak_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                                      else _peak_rss_mib())
            phases[-1]["status"] = "oom"
    result["memory"] = memory
    peaks = [p["peak_mib"] for p in phases if "peak_mib" in p]
    result["peak_mib"] = max(peaks) if peaks else _peak_rss_mib()
    if cuda:
        result["peak_rss_mib"] = _peak_rss_mib()
    say(f"peak {'CUDA memory' if cuda else 'RSS'} {gib(result['peak_mib'])} GiB")
    done = [p for p in phases if "s_per_step" in p]
    if done:
        # the row's headline: the first phase (stages 1, 2: the only one; e4e: every delta)
        result.update({k: done[0][k] for k in ("s_per_step", "steps_per_s", "images_per_s",
                                               "warmup_s", "cpu_use", "step_times_s",
                                               "step_cpu_s")})
        result["recipe_days"] = recipe_days(phases, built.info.get("progressive_start"))
    elif phases:
        result["warmup_s"] = phases[0].get("warmup_s")
    return result


def recipe_days(phases: list[dict[str, Any]], progressive_start: int | None) -> float | None:
    """The released recipe's :data:`RECIPE_STEPS` at this row's s/step, in days.  e4e: its
    first ``progressive_start`` steps at stage 0's cost, the rest at the full stage's (the
    stages in between train fewer heads: an upper bound)."""
    by_stage = {p["progressive_stage"]: p["s_per_step"] for p in phases if "s_per_step" in p}
    if progressive_start is None:
        return RECIPE_STEPS * by_stage[None] / 86400
    if len(by_stage) < 2:
        return None
    full, zero = by_stage[max(by_stage)], by_stage[0]
    start = min(progressive_start, RECIPE_STEPS)
    return (start * zero + (RECIPE_STEPS - start) * full) / 86400


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
    try:  # the child's progress goes to our stderr (its stdout too: ours carries the table)
        err: Any = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in without a descriptor (pytest)
        err = 2
    proc = subprocess.Popen(cmd, env=env, stdout=err, start_new_session=True)
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


def days(seconds_per_step: float) -> str:
    return f"{RECIPE_STEPS * seconds_per_step / 86400:.3g}"


def report(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    la = meta["loadavg_start"]
    la_end = meta["loadavg_end"]
    lines = [
        f"clipinvert training-step benchmark: device {meta['device']} ({meta['device_name']}), "
        f"torch {meta['torch']}, {meta['cpu_count']} CPUs ({meta['threads']} torch threads), "
        f"float32{' + amp ' + meta['amp'] if meta['amp'] else ''}, identity "
        f"{meta['identity']}, match_prob {meta['match_prob']:g}; 1 warm-up + "
        f"{meta['steps']} timed step(s), median"
        + ("; TINY networks (--tiny): not a measurement" if meta.get("tiny") else ""),
        f"load average (1, 5, 15 min) at start {la}, at end {la_end}; 'load 1 min': as each "
        "configuration started; 'CPU use': this process's CPU time over the timed steps / (wall "
        "time x torch threads) — well under 100 % on the CPU means another process held CPUs "
        "and the s/step is inflated",
        "e4e: 'k=N' is the progressive stage (N deltas trained: all of them, then stage 0); "
        "'plain s' a step without R1, 'R1 s' one with it (every 16th step), 's/step' their "
        f"mean over 16 steps; 'recipe days': {RECIPE_STEPS:,} steps at that s/step",
        "",
    ]
    mem = "peak CUDA GiB" if meta["device"].startswith("cuda") else "peak RSS GiB"
    header = ["stage", "resolution", "batch", "s/step", "plain s", "R1 s", "steps/s",
              "images/s", mem, "warm-up s", "CPU use", "load 1 min", "recipe days", "note"]
    table = []
    for r in rows:
        load = f"{r['loadavg_1min']:.2f}" if r.get("loadavg_1min") is not None else ""
        note = "" if r.get("memory") != "rss-lifetime" else "lifetime RSS peak"
        phases = r.get("phases") or [{}]
        for i, ph in enumerate(phases):
            stage = str(r["stage"])
            if ph.get("progressive_stage") is not None:
                stage += f" k={ph['progressive_stage']}"
            start = [stage, str(r["resolution"]), str(r["batch"])]
            if "s_per_step" in ph:
                table.append([*start, f"{ph['s_per_step']:.2f}",
                              f"{ph['plain_s']:.2f}" if "plain_s" in ph else "",
                              f"{ph['r1_s']:.2f}" if "r1_s" in ph else "",
                              f"{ph['steps_per_s']:.3g}", f"{ph['images_per_s']:.3g}",
                              gib(ph["peak_mib"]), f"{ph['warmup_s']:.1f}",
                              f"{ph['cpu_use']:.0%}", load if i == 0 else "",
                              days(ph["s_per_step"]), note])
            elif i == len(phases) - 1 or "warmup_s" in ph:
                peak = ph.get("peak_mib") or (r.get("peak_mib") if i == 0 else None)
                table.append([*start, "", "", "", "", "", gib(peak) if peak else "",
                              f"{ph['warmup_s']:.1f}" if ph.get("warmup_s") else "", "",
                              load if i == 0 else "", "", r.get("note", "")])
    lines.append(format_table(header, table, text_last=True))
    lines += ["", *recipe_lines(rows)]
    return "\n".join(lines)


def recipe_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the released recipe (200k steps of batch 8) takes on this device, per stage and
    resolution, from the largest batch measured (B = 8 is the recipe's)."""
    out = [f"the recipe ({RECIPE_STEPS:,} steps of batch 8) on this device:"]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("recipe_days") is not None:
            key = (str(r["stage"]), r["resolution"])
            if key not in best or r["batch"] > best[key]["batch"]:
                best[key] = r
    for (stage, size), r in best.items():
        how = "" if r["batch"] == 8 else \
            f" — at B={r['batch']}, not the recipe's 8 ({r['batch'] * RECIPE_STEPS:,} images)"
        extra = ""
        if stage == "e4e":
            extra = (f" ({r['progressive_start']:,} steps at stage 0, the rest at the full "
                     "stage's cost)")
        out.append(f"  stage {stage}, {size} px: {r['recipe_days']:.3g} days{extra}{how}")
    if not best:
        out.append("  nothing measured")
    return out


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


def stage_list(text: str) -> tuple[int | str, ...]:
    """``1,2,e4e`` → ``(1, 2, "e4e")``, in the order given, each once."""
    names = {str(s): s for s in STAGES}
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in names]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"each must be one of {', '.join(names)}: {text!r}")
    return tuple(names[v] for v in dict.fromkeys(values))


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
        description="Time a clipinvert training step (stages 1, 2 and e4e; random weights at "
                    "the released sizes) and print steps/s, peak memory and the recipe's days "
                    "per stage, resolution and batch size.  Each configuration runs in its own "
                    "watched subprocess.")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--stages", type=stage_list, default=(1, 2, "e4e"),
                   help="comma-separated training stages: 1, 2 (CLIPInverter) and e4e (the "
                        "encoder's own training) (default: 1,2,e4e)")
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
                   help="resolution 256, batch 2, 1 timed step (every stage): a smoke test")
    p.add_argument("--tiny", action="store_true",
                   help="narrow random networks of the same architectures (tiny IR-SE encoder, "
                        "32-channel generator, tiny ArcFace/MoCo; CLIP and AlexNet full size): "
                        "the whole code path in seconds, for tests — not a measurement")
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
            "stages": list(args.stages), "identity": args.identity, "tiny": args.tiny}
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
        "tiny": args.tiny,
        "recipe_steps": RECIPE_STEPS,
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
                          "match_prob": args.match_prob, "amp": args.amp,
                          "tiny": args.tiny}
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
