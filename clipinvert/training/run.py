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

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..distributed import Launch, barrier, launch_from_env, process_device, process_group
from ..errors import DiskFullError, UsageError
from ..fileio import atomic_write_text
from ..registry import Domain, Registry
from .config import TrainConfig

if TYPE_CHECKING:
    from .loop import Loop


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
        saved_e4e = d.get("e4e") or {}  # the e4e stage's own settings
        was = d["weights"][key] if key in d["weights"] else \
            saved_e4e[key] if key in saved_e4e else d.get(key)
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
                 registry: Registry, role: str = "clipinverter") -> str:
    """A complete domain table named after the run folder, the run's checkpoint as ``role``
    (the e4e stage's: ``e4e``).

    The domain's whole merged table is the start (``registry.domain_table``: its resize policy,
    the eval roles inception and attributes, captions…, relative paths made absolute), so
    editing and scoring with the run's domain see what training saw; the files training
    loaded are pinned by absolute path.  An e4e run leaves out the domain's ``clipinverter``:
    it was trained on another encoder's features.
    """
    from ..registry import domain_table, toml_table

    name = Path(run_dir).resolve().name
    toml = Path(run_dir) / "models.toml"
    table = domain_table(domain, registry, toml)
    table.pop("note", None)  # the source domain's note ("nothing was released…") is not ours
    table["description"] = f"trained with clipinvert train from domain {domain.name}"
    for each, path in files.items():
        table[each] = str(Path(path).resolve())
    if role == "e4e":
        table.pop("clipinverter", None)
    table[role] = str(Path(checkpoint).resolve())
    if "landmarks" in domain.weights:
        table["landmarks"] = str(registry.locate(domain, "landmarks").resolve())
    use = "invert" if role == "e4e" else "edit"
    return (f"# Written by clipinvert train: clipinvert {use} --models {toml} --domain {name} …\n"
            + toml_table(f"domains.{name}", table))


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


def on_disk(registry: Registry, domain: Domain, roles: tuple[str, ...]) -> dict[str, Path]:
    """The files of ``roles`` the domain names that are already on disk (nothing fetched)."""
    found = {}
    for role in roles:
        places, _ = registry.candidates(domain, role)
        hit = next((p for p in places if p.is_file()), None)
        if hit is not None:
            found[role] = hit
    return found


def _build_trainer(cfg: TrainConfig, registry: Registry, *, trust: bool,
                   log: Callable[[str], None], launch: Launch, device: torch.device
                   ) -> tuple[Loop, dict[str, Path], str]:
    """The stage's trainer, the files its models.toml names, and the role its checkpoint
    takes there (``clipinverter``; the e4e stage's ``e4e``)."""
    common = {"device": device, "log": log, "rank": launch.rank,
              "world_size": launch.world_size}
    if cfg.stage == "e4e":
        from .e4e_train import E4ETrainer, build_e4e

        built = build_e4e(cfg, registry, device, warn=log, trust=trust)
        # The new encoder makes the domain's CLIPInverter (trained on another encoder's
        # features) unfit: the run's table names CLIP for the next stage, not that model.
        files = {**on_disk(registry, registry.domain(cfg.domain), ("clip",)), **built.files}
        return (E4ETrainer(cfg, built.model, built.criteria, built.train_set, built.val_set,
                           **common), files, "e4e")
    from .build import build
    from .loop import Trainer

    parts = build(cfg, registry, device, warn=log, trust=trust)
    trainer = Trainer(cfg, parts.model, lambda caps: parts.clip.encode_text(caps),
                      parts.criteria, parts.train_set, parts.val_set, **common)
    return trainer, parts.files, "clipinverter"


def _train(cfg: TrainConfig, *, resume: bool, registry: Registry | None, trust: bool,
           log: Callable[[str], None], launch: Launch, device: torch.device) -> Path | None:
    from .loop import truncate_metrics

    registry = registry or Registry.load(cfg.models)
    run_dir = Path(cfg.run_dir)
    trainer, files, role = _build_trainer(cfg, registry, trust=trust, log=log, launch=launch,
                                          device=device)
    # Every process has checked the run folder (the CLI does, before this) and built its parts
    # before rank 0 writes anything: no rank can find a folder another rank just started.
    barrier(launch, device)
    if launch.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.json")
    if resume and (run_dir / "checkpoints" / "resume.pt").exists():
        trainer.resume()  # every rank reads rank 0's files: RUN_DIR must be shared by the nodes
        if launch.is_main:
            truncate_metrics(run_dir, trainer.step)
        log(f"resuming at step {trainer.step} of {cfg.max_steps}")
    if not resume:
        torch.manual_seed(cfg.seed)
    try:
        trainer.fit()
        if not launch.is_main:
            return None
        best = run_dir / "checkpoints" / "best.pt"
        chosen = best if best.exists() else run_dir / "checkpoints" / "latest.pt"
        domain = registry.domain(cfg.domain)
        toml = run_dir / "models.toml"
        atomic_write_text(toml, run_registry(run_dir, domain, files, chosen, registry, role))
    except DiskFullError as exc:
        # Writes are atomic: every checkpoint on disk is whole, the last saved one included.
        saved = (f"the checkpoints of step {trainer.saved_step} are intact"
                 if trainer.saved_step is not None else "no checkpoint of this run was saved")
        raise DiskFullError(f"{exc}: training stopped at step {trainer.step}; {saved}; free "
                            f"space and continue with: clipinvert train -o {run_dir} --resume",
                            exc.path) from None
    return toml
