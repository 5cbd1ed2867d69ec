"""``clipinvert train`` as a function a notebook can call: :func:`train`.

Run folder (docs/training.md#run-folder)::

    RUN_DIR/config.json              every setting (what --resume continues with)
    RUN_DIR/checkpoints/latest.pt    released layout: clipinvert edit and the official infer.py
    RUN_DIR/checkpoints/best.pt      the same, lowest validation loss so far
    RUN_DIR/checkpoints/resume.pt    optimizer, step, sampler position, RNG states
    RUN_DIR/metrics.jsonl            one line per logged step (train and val)
    RUN_DIR/images/step_*.png        input | edit | cycle for fixed validation samples
    RUN_DIR/tensorboard/             when tensorboard is installed
    RUN_DIR/models.toml              a domain table that makes `clipinvert edit` use best.pt

Under torchrun (``WORLD_SIZE`` > 1; docs/training-ddp.md) every process runs :func:`train`: it
joins the process group (NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the CPU),
trains its shard of the data, and leaves the group at the end, errors included.  Rank 0 alone
writes the run folder and prints.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ..errors import ClipInvertError, UsageError, first_line
from ..fileio import atomic_write_text
from ..registry import Domain, Registry
from .config import TrainConfig


def check_run_dir(run_dir: Path | str, resume: bool) -> TrainConfig | None:
    """A new run never reuses a folder holding a run; ``--resume`` continues the saved one
    (whose settings are returned)."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if not resume:
        if saved.exists() or (run_dir / "checkpoints").exists():
            raise UsageError(f"{run_dir} already holds a training run: pass --resume to "
                             "continue it, or choose another -o")
        return None
    if not saved.exists():
        raise UsageError(f"--resume: {run_dir} holds no training run (no config.json)")
    return TrainConfig.load(saved)


# How a run is carried out, not what it trains: --resume may change these (another machine,
# other cores); every other flag given again must agree with config.json.
RESUME_MAY_CHANGE = ("device", "workers", "models")


def resolve_resume(saved: TrainConfig, given: dict[str, object],
                   defaults: dict[str, object]) -> TrainConfig:
    """The saved settings for ``--resume``.

    ``given`` holds every flag of the command (loss weights by their own names); one left at
    its default counts as not given.  ``--max-steps`` may be raised and :data:`RESUME_MAY_CHANGE`
    changed; any other flag given again must agree with the saved value, or the run would
    silently go on with settings the user did not ask for.
    """
    import dataclasses

    d = saved.to_dict()
    changed, updates = [], {}
    for key, value in given.items():
        if value == defaults.get(key):
            continue
        was = d["weights"][key] if key in d["weights"] else d.get(key)
        if key == "max_steps":
            if int(value) < saved.max_steps:  # type: ignore[call-overload]
                changed.append(f"--max-steps {value} is below the run's {saved.max_steps}")
            else:
                updates[key] = int(value)  # type: ignore[call-overload]
        elif key in RESUME_MAY_CHANGE:
            updates[key] = value
        elif value != was:
            flag = "--" + key.replace("_", "-")
            changed.append(f"{flag} {value!r} (the run has {was!r})")
    if changed:
        raise UsageError("--resume continues the run's saved settings (config.json); these "
                         "differ: " + "; ".join(changed))
    return dataclasses.replace(saved, **updates)


def run_registry(run_dir: Path, domain: Domain, files: dict[str, Path], checkpoint: Path,
                 registry: Registry) -> str:
    """A complete domain table named after the run folder, absolute paths throughout."""
    name = Path(run_dir).resolve().name
    roles = dict(files)
    roles["clipinverter"] = Path(checkpoint).resolve()
    lines = [f"# Written by clipinvert train: clipinvert edit --models {run_dir}/models.toml "
             f"--domain {name} …", f"[domains.{name}]",
             f'description = "trained with clipinvert train from domain {domain.name}"',
             f"resolution = {domain.resolution}", f'align = "{domain.align}"']
    arch = domain.clip_arch
    if (domain.base_dir / arch).is_file():
        arch = str((domain.base_dir / arch).resolve())
    lines.append(f'clip_arch = "{arch}"')
    for role in ("clip", "e4e", "clipinverter", "stylegan2", "lpips", "arcface", "moco"):
        if role in roles:
            lines.append(f'{role} = "{Path(roles[role]).resolve()}"')
    if "landmarks" in domain.weights:
        lines.append(f'landmarks = "{registry.locate(domain, "landmarks").resolve()}"')
    return "\n".join(lines) + "\n"


# ---- torchrun ------------------------------------------------------------------------------
TIMEOUT_ENV = "CLIPINVERT_DIST_TIMEOUT"  # seconds a process waits for the others (default 1800)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch: rank 0 of 1 without one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(env: Mapping[str, str] = os.environ) -> Launch:
    """Read torchrun's variables (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); without ``WORLD_SIZE`` > 1 this is a single process."""
    try:
        world = int(env.get("WORLD_SIZE") or 1)
        if world <= 1:
            return Launch()
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                   if not env.get(k)]
        if missing:
            raise UsageError(f"WORLD_SIZE is {world} but {', '.join(missing)} not set: start "
                             "distributed training with torchrun (docs/training-ddp.md)")
        launch = Launch(int(env["RANK"]), world, int(env["LOCAL_RANK"]))
    except ValueError as exc:
        raise UsageError(f"torchrun's environment is not usable: {exc}") from None
    if not 0 <= launch.rank < world or launch.local_rank < 0:
        raise UsageError(f"RANK {launch.rank} / LOCAL_RANK {launch.local_rank} do not fit "
                         f"WORLD_SIZE {world}")
    return launch


def _timeout() -> timedelta:
    value = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV}={value!r}: give a number of seconds above 0")
    return timedelta(seconds=seconds)


def process_device(launch: Launch, device: torch.device) -> torch.device:
    """The device of this process: under torchrun, ``cuda:LOCAL_RANK`` on CUDA."""
    if not launch.distributed:
        return device
    if device.type == "cuda":
        if device.index is not None and device.index != launch.local_rank:
            raise UsageError(f"--device {device}: under torchrun each process uses the GPU "
                             f"cuda:LOCAL_RANK (here cuda:{launch.local_rank}); pass --device "
                             "cuda or auto")
        if launch.local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {launch.local_rank}, but this machine shows "
                             f"{torch.cuda.device_count()} CUDA device(s): start at most that "
                             "many processes per node")
        return torch.device("cuda", launch.local_rank)
    if device.type != "cpu":
        raise UsageError(f"distributed training runs on CUDA (NCCL) or the CPU (gloo), "
                         f"not {device.type}")
    return device


# gloo raises plain RuntimeErrors ("[…/gloo/transport/tcp/pair.cc:561] Connection closed by
# peer …", "[…/gloo/…] Timed out waiting 5000ms for recv …"); the store and NCCL raise DistError.
_COMM = re.compile(r"gloo|nccl|c10d|processgroup|connection (closed|reset) by peer",
                   re.IGNORECASE)


def _communication_error(exc: BaseException) -> bool:
    """A collective or the rendezvous failed (another process is gone or does not answer)."""
    import torch.distributed as dist

    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and bool(_COMM.search(str(exc))))


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[None]:
    """Joined to the process group for the block (NCCL on CUDA, gloo on the CPU), and out of
    it afterwards, errors included; nothing without torchrun.  A failed collective (another
    process died, or did not answer within ``CLIPINVERT_DIST_TIMEOUT``) ends as one line."""
    if not launch.distributed:
        yield
        return
    import warnings

    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this PyTorch build has no torch.distributed: it cannot run under "
                         "torchrun")
    nccl = device.type == "cuda"
    with contextlib.ExitStack() as stack:
        if not launch.is_main:  # rank 0 shows the same warnings
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
        try:
            if nccl:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if nccl else "gloo", timeout=_timeout(),
                                    device_id=device if nccl else None)
            yield
        except RuntimeError as exc:
            if not _communication_error(exc):
                raise
            # gloo's messages start with a source location and go on with advice: keep the gist.
            detail = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc, 400)).split(". ")[0]
            raise ClipInvertError(
                f"rank {launch.rank} of {launch.world_size}: lost contact with the other "
                f"training processes ({detail}); one of them failed or was stopped — its "
                "own message says why") from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def barrier(launch: Launch, device: torch.device) -> None:
    if launch.distributed:
        import torch.distributed as dist

        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def train(cfg: TrainConfig, *, resume: bool = False, registry: Registry | None = None,
          trust: bool = False, log: Callable[[str], None] = print) -> Path | None:
    """Run (or continue) one training stage; returns the run's ``models.toml``.

    Under torchrun every process calls this; rank 0 writes the run folder, logs and returns the
    ``models.toml``, the other ranks train silently and return None.
    """
    from ..pipeline import resolve_device

    launch = launch_from_env()
    device = resolve_device(cfg.device)
    if cfg.amp and device.type != "cuda":
        raise UsageError(f"--amp {cfg.amp} needs a CUDA device (this run is on {device.type})")
    device = process_device(launch, device)
    if not launch.is_main:
        log = _silent
    with process_group(launch, device):
        return _train(cfg, resume=resume, registry=registry, trust=trust, log=log,
                      launch=launch, device=device)


def _silent(line: str) -> None:
    pass


def _train(cfg: TrainConfig, *, resume: bool, registry: Registry | None, trust: bool,
           log: Callable[[str], None], launch: Launch, device: torch.device) -> Path | None:
    from .build import build
    from .loop import Trainer, truncate_metrics

    registry = registry or Registry.load(cfg.models)
    run_dir = Path(cfg.run_dir)
    parts = build(cfg, registry, device, warn=log, trust=trust)
    # Every process has checked the run folder (the CLI does, before this) and built its parts
    # before rank 0 writes anything: no rank can find a folder another rank just started.
    barrier(launch, device)
    if launch.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    trainer = Trainer(cfg, parts.model, lambda caps: parts.clip.encode_text(caps),
                      parts.criteria, parts.train_set, parts.val_set, device=device, log=log,
                      rank=launch.rank, world_size=launch.world_size)
    if resume and (run_dir / "checkpoints" / "resume.pt").exists():
        trainer.resume()  # every rank reads rank 0's files: RUN_DIR must be shared by the nodes
        if launch.is_main:
            truncate_metrics(run_dir, trainer.step)
        log(f"resuming at step {trainer.step} of {cfg.max_steps}")
    if not resume:
        torch.manual_seed(cfg.seed)
    trainer.fit()
    if not launch.is_main:
        return None
    best = run_dir / "checkpoints" / "best.pt"
    chosen = best if best.exists() else run_dir / "checkpoints" / "latest.pt"
    domain = registry.domain(cfg.domain)
    toml = run_dir / "models.toml"
    atomic_write_text(toml, run_registry(run_dir, domain, parts.files, chosen, registry))
    return toml
