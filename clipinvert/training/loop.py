"""The training loop: steps, validation, logging, checkpoints, resume (docs/training.md#run-folder).

:class:`Loop` is what every stage shares — the sampler and its position, the step loop with its
stop and skip agreements, validation choosing ``best.pt``, metrics, image grids, ``resume.pt``'s
bookkeeping; a stage says only what it trains through a few hooks (:meth:`Loop.train_step`,
:meth:`Loop.val_step`, :meth:`Loop.grid_columns`, :meth:`Loop.save_checkpoint`,
:meth:`Loop.trained_state` / :meth:`Loop.load_trained_state`).  :class:`Trainer` is
CLIPInverter's stages 1–2; the e4e stage's is ``training/e4e_train.py``'s ``E4ETrainer``.
Neither knows about registries or the command line, so a notebook can drive them too.

Resuming is exact on the CPU: the data order comes from the sampler's (seed, epoch) permutation
and its position, every random choice of a sample from (seed, epoch, index), the caption coin
from (seed, step), and the optimizer's and model's state from ``resume.pt``; a run interrupted
after a save and resumed ends with the same weights, bit for bit, as an uninterrupted one.

Distributed (``world_size > 1``, the process group already joined: training/run.py does it under
torchrun; docs/training-ddp.md): only the trained part is wrapped in DistributedDataParallel — the
adapter in stage 1, the remapper in stage 2 — and only while a training step runs its forward
passes, so saving, loading, validation and the image grids see the plain model.  Every rank
runs the same steps: before each step the ranks agree (a small all-reduce) on whether any of
them drew a batch left with too few readable samples to train on, and skip it together; after
each step, on whether any of them was asked to stop (Ctrl-C, SIGTERM), and stop together after
that step.  Rank 0 alone validates, writes files and logs; the others wait for it in that
agreement.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..fileio import append_line, atomic_write
from ..model import CLIPInverter
from ..workers import DeferredStop
from .checkpoint import (
    load_resume,
    released_state,
    save_released,
    save_resume,
    set_rng_states,
)
from .config import TrainConfig
from .optim import make_optimizer
from .step import Criteria, mismatch_coin, pool, training_step

TextEncoder = Callable[[list[str]], torch.Tensor]  # captions → raw CLIP embeddings (no grad)


class Loop:
    """One stage of training over a dataset; ``fit()`` runs until ``cfg.max_steps``.

    Subclasses implement the hooks (they raise here); everything else is shared."""

    # A batch left with fewer samples than this is skipped (every rank at once).
    min_batch = 2
    grid_labels: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, train_set: Any, val_set: Any | None, *,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.train_set, self.val_set = train_set, val_set
        self.device = torch.device(device)
        self.log = log
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.position = 0  # samples of this epoch already consumed (this rank)
        self.best: float | None = None
        self.saved_step: int | None = None  # the step latest.pt and resume.pt hold, if any
        self._tb = None

    # ---- the stage's hooks ---------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on ``batch`` (at ``self.step``, 0-based); the logged terms."""
        raise NotImplementedError

    def val_step(self, index: int, batch: dict[str, Any]) -> dict[str, float] | None:
        """The logged terms of validation batch ``index`` (no gradient), None to leave it out."""
        raise NotImplementedError

    def grid_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The image columns of the grid (:attr:`grid_labels`) for fixed validation samples."""
        raise NotImplementedError

    def save_checkpoint(self, path: Path) -> None:
        """``latest.pt`` / ``best.pt`` in the stage's released layout (rank 0 only)."""
        raise NotImplementedError

    def trained_state(self) -> dict[str, Any]:
        """What ``resume.pt`` holds of the trained networks and their optimizers."""
        raise NotImplementedError

    def load_trained_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def set_training(self, mode: bool) -> None:
        """Train mode for steps, eval mode for validation and grids."""
        raise NotImplementedError

    def agree(self, signum: int, usable: bool) -> tuple[int, bool]:
        """Distributed: the largest stop signal of any rank, and whether every rank's batch is
        usable (one all-reduce, so every rank takes the same decision).  Alone: as given."""
        if self.world_size == 1:
            return signum, usable
        import torch.distributed as dist

        flags = torch.tensor([int(signum), 0 if usable else 1], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed, unusable = (int(v) for v in flags.tolist())
        return agreed, not unusable

    def mean_across_ranks(self, logs: dict[str, float]) -> dict[str, float]:
        """Distributed: each logged term averaged over the ranks (one all-reduce), so
        metrics.jsonl describes the global batch — every term is a mean over samples, and the
        ranks hold equal shares — as a single process of that batch logs it.  Alone: as
        given.  Every rank logs the same keys at the same steps."""
        if self.world_size == 1 or not logs:
            return logs
        import torch.distributed as dist

        keys = sorted(logs)
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(values)
        return {k: v / self.world_size for k, v in zip(keys, values.tolist(), strict=True)}

    # ---- state ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def resume(self, path: Path | None = None) -> None:
        """Continue from ``resume.pt`` (networks, optimizers, step, sampler position, RNG)."""
        state = load_resume(path or self.ckpt_dir / "resume.pt")
        self.step, self.epoch = state["step"], state["epoch"]
        self.load_trained_state(state)
        # resume.pt counts the epoch's samples consumed by all ranks together (save()): rank r
        # took the epoch's order[r::world_size], so those are exactly order[:position], and a
        # run may resume with another number of processes and go on from the next sample.
        self.position = state["position"] // self.world_size
        self.best = state["best_val"]
        self.saved_step = self.step
        set_rng_states(state["rng"])

    def save(self) -> None:
        """``latest.pt`` (released layout) and ``resume.pt``; rank 0 only; atomic.

        A full disk stops the run here (DiskFullError; training/run.py says so in one line)
        with every file whole: ``resume.pt`` still the previous save's whenever the new one
        could not be written, so ``--resume`` continues from ``saved_step``."""
        if not self.is_main:
            return
        self.save_checkpoint(self.ckpt_dir / "latest.pt")
        save_resume(self.ckpt_dir / "resume.pt", trained=self.trained_state(),
                    step=self.step, epoch=self.epoch,
                    position=self.position * self.world_size, best=self.best,
                    cfg=self.cfg)
        self.saved_step = self.step

    # ---- data ----------------------------------------------------------------------------
    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches from the current (epoch, position) on, forever (epochs roll over)."""
        from .data import ResumableSampler, collate

        n = len(self.train_set)
        per_epoch = n // self.world_size // self.cfg.batch_size
        if per_epoch == 0:
            from ..errors import UsageError

            raise UsageError(f"{n} training images are fewer than one batch of "
                             f"{self.cfg.batch_size} per process")
        while True:
            sampler = ResumableSampler(n, seed=self.cfg.seed, rank=self.rank,
                                       world_size=self.world_size)
            order = sampler.indices(self.epoch)[self.position:]
            self.train_set.set_epoch(self.epoch)
            bs = self.cfg.batch_size
            loader = torch.utils.data.DataLoader(
                _Subset(self.train_set, order[: len(order) // bs * bs]), batch_size=bs,
                shuffle=False, num_workers=self.cfg.workers, collate_fn=collate,
                persistent_workers=False)
            for batch in loader:
                self.position += bs
                for path, reason in batch["failed"]:  # unreadable since the scan: skipped
                    self.log(f"skipped {path}: {reason}")
                yield batch  # fit() skips one left too small (min_batch; on every rank)
            self.epoch += 1
            self.position = 0

    # ---- the loop ------------------------------------------------------------------------
    def fit(self) -> None:
        """Train until ``max_steps``.  Ctrl-C or SIGTERM finish the step in progress, save a
        resumable state of it, then stop (KeyboardInterrupt / Terminated go on to the CLI)."""
        cfg = self.cfg
        it = self.batches()
        with DeferredStop() as stop:
            while self.step < cfg.max_steps:
                batch = next(it)
                # A batch left too small (images unreadable since the scan)
                # is skipped — distributed, by every rank at once, or their steps would drift.
                _, usable = self.agree(0, len(batch["index"]) >= self.min_batch)
                if not usable:
                    continue
                logs = self.train_step(batch)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.write_metrics("train", self.mean_across_ranks(logs))
                if self.val_set is not None and (self.step % cfg.val_every == 0
                                                 or self.step == cfg.max_steps):
                    self.validate()
                if self.step % cfg.image_every == 0 or self.step == cfg.max_steps:
                    self.write_grid()
                # Distributed: a signal to any rank stops every rank after this same step.
                signum, _ = self.agree(stop.signum, True)
                if (self.step % cfg.save_every == 0 or self.step == cfg.max_steps
                        or signum):
                    self.save()
                if signum:
                    stop.signum = signum
                    stop.reraise()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean logged terms over the validation set; ``best.pt`` when ``loss`` improves.

        Rank 0 only (the other ranks return ``{}`` at once and wait for it in the step's stop
        agreement): the numbers are those of a single-process run."""
        from .data import collate

        if not self.is_main:
            return {}
        self.set_training(False)
        totals: dict[str, float] = {}
        count = 0
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg.batch_size,
                                             shuffle=False, collate_fn=collate, drop_last=False)
        for i, batch in enumerate(loader):
            logs = self.val_step(i, batch)
            if logs is None:
                continue
            n = len(batch["index"])
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + v * n
            count += n
        self.set_training(True)
        means = {k: v / count for k, v in totals.items()} if count else {}
        if means:
            self.write_metrics("val", means)
            if self.best is None or means["loss"] < self.best:
                self.best = means["loss"]
                self.save_checkpoint(self.ckpt_dir / "best.pt")
        return means

    # ---- outputs -------------------------------------------------------------------------
    def write_metrics(self, split: str, logs: dict[str, float]) -> None:
        if not self.is_main:
            return
        rec = {"step": self.step, "split": split, "time": round(time.time(), 3),
               **{k: float(v) for k, v in logs.items()}}
        append_line(self.run_dir / "metrics.jsonl", json.dumps(rec, allow_nan=False))
        writer = self.tensorboard()
        if writer is not None:
            for k, v in logs.items():
                writer.add_scalar(f"{split}/{k}", v, self.step)
            writer.flush()
        if split == "train":
            self.log(f"step {self.step}/{self.cfg.max_steps}: loss {logs.get('loss', 0):.4f}")

    def tensorboard(self):
        """A SummaryWriter when ``tensorboard`` is installed (optional dependency)."""
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None

    @torch.no_grad()
    def write_grid(self) -> None:
        """``images/step_<N>.png``: one row of :meth:`grid_columns` per fixed validation
        sample."""
        if not self.is_main or self.val_set is None or len(self.val_set) < self.min_batch:
            return
        from .. import imaging
        from .data import collate

        n = min(self.cfg.val_samples, len(self.val_set))
        batch = collate([self.val_set[i] for i in range(n)])
        self.set_training(False)
        columns = self.grid_columns(batch)
        self.set_training(True)
        rows = [imaging.side_by_side(list(imgs), labels=list(self.grid_labels))
                for imgs in zip(*(imaging.to_pil(c) for c in columns), strict=True)]
        width, height = rows[0].width, sum(r.height for r in rows)
        from PIL import Image

        grid = Image.new("RGB", (width, height), "white")
        y = 0
        for r in rows:
            grid.paste(r, (0, y))
            y += r.height
        imaging.save_image(grid, self.run_dir / "images" / f"step_{self.step:07d}.png")


class Trainer(Loop):
    """CLIPInverter's stages 1–2: the adapter (1) or the remapper (2) of ``model``."""

    grid_labels = ("input", "edit", "cycle")

    def __init__(self, cfg: TrainConfig, model: CLIPInverter, encode_text: TextEncoder,
                 criteria: Criteria, train_set: Any, val_set: Any | None, *,
                 device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(cfg, train_set, val_set, device=device, log=log, rank=rank,
                         world_size=world_size)
        self.model, self.encode_text, self.criteria = model, encode_text, criteria
        self.params = model.set_stage(cfg.stage)
        model.train()
        self.optimizer = make_optimizer(self.params, cfg.lr)
        # Mixed precision (CUDA only, checked by the caller): bf16 needs no loss scaling, fp16
        # does; with amp off the scaler is a no-op and steps are exactly the float32 ones.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp or "")
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        self._ddp = _wrap_trained_part(model, cfg.stage, self.device) if world_size > 1 else None

    def autocast(self):
        """Mixed precision for the step's forward passes (``--amp``; a no-op without)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def distributed_forward(self) -> Iterator[None]:
        """While the block runs, the model calls the trained part through its DDP wrapper
        (which averages its gradients across ranks during ``backward``); a no-op on one
        process.  Outside the block the model is the plain one: checkpoints keep their
        released keys (``adapter.*``, never ``adapter.module.*``) and rank 0 can validate alone
        without entering a collective."""
        if self._ddp is None:
            yield
            return
        model = self.model
        if self.cfg.stage == 1:
            model.adapter = self._ddp  # CLIPInverter.residual calls self.adapter(...)
            try:
                yield
            finally:
                model.adapter = self._ddp.module
        else:
            # CLIPInverter.decode calls decoder.remap(...), a method of Generator that walks the
            # remapper's ModuleList itself, so there is no remapper forward DDP could wrap.  For
            # the block an instance attribute of the same name (a bound method, not a module,
            # so it lands in the instance __dict__ and shadows the class's) sends that call
            # through the wrapped remapper, whose forward is Generator.remap itself.
            model.decoder.remap = self._ddp.__call__
            try:
                yield
            finally:
                del model.decoder.remap

    def set_training(self, mode: bool) -> None:
        self.model.train(mode)

    def trained_state(self) -> dict[str, Any]:
        return {"model": released_state(self.model), "optimizer": self.optimizer.state_dict()}

    def load_trained_state(self, state: dict[str, Any]) -> None:
        # Only adapter.* and decoder.* are stored (the encoder is never trained): a partial load.
        result = self.model.load_state_dict(state["model"], strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, path: Path) -> None:
        save_released(path, self.model, self.cfg)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        x = batch["image"].to(self.device)
        with torch.no_grad():
            t = self.encode_text(list(batch["caption"])).to(self.device, x.dtype)
        mismatch = mismatch_coin(self.cfg.seed, self.step, self.cfg.match_prob)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(), self.distributed_forward():
            loss, logs = training_step(self.model, x, t, mismatch=mismatch,
                                       weights=self.cfg.weights, criteria=self.criteria,
                                       stage=self.cfg.stage)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"the loss is {float(loss.detach())} at step {self.step + 1}")
        self.scaler.scale(loss).backward()  # distributed: DDP averages the gradients here
        self.scaler.step(self.optimizer)
        self.scaler.update()
        logs["mismatch"] = float(mismatch)
        return logs

    def val_step(self, index: int, batch: dict[str, Any]) -> dict[str, float] | None:
        if len(batch["caption"]) < 2:  # a last batch of one has no mismatched caption
            return None
        x = batch["image"].to(self.device)
        t = self.encode_text(list(batch["caption"])).to(self.device, x.dtype)
        _, logs = training_step(self.model, x, t,
                                mismatch=mismatch_coin(self.cfg.seed, -1 - index,
                                                       self.cfg.match_prob),
                                weights=self.cfg.weights, criteria=self.criteria,
                                stage=self.cfg.stage)
        return logs

    def grid_columns(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """input | edit | cycle, each edited with the next sample's caption (the mismatched
        case training learns)."""
        x = batch["image"].to(self.device)
        t = self.encode_text(list(batch["caption"])).to(self.device, x.dtype)
        edit = pool(self.model(x, t.roll(1, 0)).images)
        cycle = pool(self.model(edit, t).images)
        return [x, edit, cycle]



class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


class _Remapper(torch.nn.Module):
    """The CLIPRemapper (``decoder.affine_mlps`` + ``decoder.lambdas``) as one module whose
    forward is ``Generator.remap``: what DDP wraps in stage 2.  The generator itself is held
    outside the module tree, so DDP sees (and synchronises) the remapper's parameters only."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.affine_mlps = decoder.affine_mlps
        self.lambdas = decoder.lambdas
        self._decoder = (decoder,)  # a tuple: not registered as a submodule

    def forward(self, w: torch.Tensor, text: torch.Tensor, mix: float = 1.0) -> torch.Tensor:
        from ..nets import Generator

        return Generator.remap(self._decoder[0], w, text, mix)


def _wrap_trained_part(model: CLIPInverter, stage: int,
                       device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around the part ``stage`` trains (the process group must be joined)."""
    part: torch.nn.Module = model.adapter if stage == 1 else _Remapper(model.decoder)
    assert part is not None  # set_stage checked
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(part, device_ids=ids)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metric lines written after the saved step (they will be written again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for raw in path.read_bytes().splitlines():  # torn, garbage or non-UTF-8 lines are dropped
        try:
            line = raw.decode("utf-8")
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    text = "".join(ln + "\n" for ln in keep)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
