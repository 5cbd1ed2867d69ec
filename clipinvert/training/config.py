"""One training configuration: what the CLI builds and the training loop receives.

Every weight and rate of the released recipe is a field (docs/training.md#recipe), with the
released defaults per stage; ``RUN_DIR/config.json`` stores the whole configuration so that
``--resume`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

# The released recipe (docs/training.md#recipe).
STAGE_DEFAULTS: dict[int, dict[str, float | int]] = {
    1: {"l2": 1.0, "lpips": 0.6, "id": 0.1, "w_norm": 0.005, "clip": 1.0, "cycle": 1.0,
        "lr": 5e-4, "max_steps": 200_000},
    2: {"l2": 0.15, "lpips": 0.15, "id": 0.15, "w_norm": 0.0, "clip": 1.75, "cycle": 1.0,
        "lr": 1.5e-4, "max_steps": 20_000},
}
REMAP_RATIO = 0.35  # stage 2: with/without-remapper terms, inside the l2 and lpips weights


@dataclass
class LossWeights:
    l2: float
    lpips: float
    id: float
    w_norm: float
    clip: float
    cycle: float
    remap_ratio: float = REMAP_RATIO

    @classmethod
    def for_stage(cls, stage: int, **overrides: float | None) -> LossWeights:
        d = {k: v for k, v in STAGE_DEFAULTS[stage].items() if k not in ("lr", "max_steps")}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)  # type: ignore[arg-type]


@dataclass
class TrainConfig:
    """Everything a run needs; JSON round-trips through ``config.json``."""

    domain: str
    data: str
    stage: int
    run_dir: str
    weights: LossWeights
    lr: float
    max_steps: int
    batch_size: int = 8  # per process
    init: str | None = None
    match_prob: float = 0.25  # probability of the true captions (else the batch rolled by one)
    seed: int = 0
    val_data: str | None = None
    val_fraction: float = 0.05
    data_format: str = "auto"
    # The data set's own list to train on (data.SPLITS: all, train, test) and a caption source
    # other than the layout's (AFHQ's captions.jsonl, a CUB caption folder): docs/training-data.md
    split: str = "all"
    captions: str | None = None
    flip: bool = True
    val_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    image_every: int = 1000
    val_samples: int = 8  # fixed validation images shown in the grids
    workers: int = 2
    amp: str | None = None  # "bf16" | "fp16", CUDA only
    clip_preprocess: str = "release"  # or "clip"
    models: str | None = None
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise UsageError(f"--stage must be 1 or 2, not {self.stage}")
        if self.batch_size < 2:
            raise UsageError(
                f"--batch-size {self.batch_size}: training needs at least 2 images per process "
                "(the mismatched captions of a step are the batch's captions rolled by one)")
        if not 0.0 <= self.match_prob <= 1.0:
            raise UsageError(f"--match-prob {self.match_prob} is not in 0..1")
        if self.stage == 2 and not self.init:
            raise UsageError("stage 2 starts from a stage-1 checkpoint: pass --init CKPT")
        if self.amp not in (None, "bf16", "fp16"):
            raise UsageError(f"--amp {self.amp}: use bf16 or fp16")
        if self.clip_preprocess not in ("release", "clip"):
            raise UsageError(f"--clip-preprocess {self.clip_preprocess}: use release or clip")
        if self.split not in ("all", "train", "test"):
            raise UsageError(f"--split {self.split}: use all, train or test")

    @classmethod
    def for_stage(cls, stage: int, *, lr: float | None = None, max_steps: int | None = None,
                  weights: dict[str, float | None] | None = None, **kw: Any) -> TrainConfig:
        d = STAGE_DEFAULTS[stage]
        return cls(stage=stage, lr=float(lr if lr is not None else d["lr"]),
                   max_steps=int(max_steps if max_steps is not None else d["max_steps"]),
                   weights=LossWeights.for_stage(stage, **(weights or {})), **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["weights"] = LossWeights(**d["weights"])
        return cls(**d)

    def save(self, path: Path) -> None:
        from ..fileio import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"cannot read the run's settings {path}: {exc}") from None

    def differences(self, other: TrainConfig, *, may_change: tuple[str, ...] = ("max_steps",)
                    ) -> list[str]:
        """Settings of ``other`` that differ from this run's (``--resume`` must agree)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k} {a[k]!r} → {b[k]!r}" for k in a
                if k not in may_change and a[k] != b.get(k)]
