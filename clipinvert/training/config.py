"""One training configuration: what the CLI builds and the training loop receives.

Every weight and rate of the released recipe is a field (docs/training.md#recipe), with the
released defaults per stage; ``RUN_DIR/config.json`` stores the whole configuration so that
``--resume`` needs nothing else.  Stage ``"e4e"`` (docs/training.md#e4e-stage) trains e4e's own
encoder: its discriminator and progression settings are :class:`E4EConfig`, its image-loss
weights the same ``l2``/``lpips``/``id`` fields as the other stages.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

# The released recipe (docs/training.md#recipe).
Stage = int | str  # 1, 2 or "e4e"
STAGES: tuple[Stage, ...] = (1, 2, "e4e")
STAGE_DEFAULTS: dict[Stage, dict[str, float | int]] = {
    1: {"l2": 1.0, "lpips": 0.6, "id": 0.1, "w_norm": 0.005, "clip": 1.0, "cycle": 1.0,
        "lr": 5e-4, "max_steps": 200_000},
    2: {"l2": 0.15, "lpips": 0.15, "id": 0.15, "w_norm": 0.0, "clip": 1.75, "cycle": 1.0,
        "lr": 1.5e-4, "max_steps": 20_000},
    # e4e's README command (e4e_step.E4EWeights); its id weight depends on the identity network
    # (E4EConfig.recipe), the CLIPInverter-only terms are off.
    "e4e": {"l2": 1.0, "lpips": 0.8, "id": 0.1, "w_norm": 0.0, "clip": 0.0, "cycle": 0.0,
            "lr": 1e-4, "max_steps": 200_000},
}
# Flags of stages 1–2 that mean nothing to the e4e stage: refused there rather than ignored.
CLIPINVERTER_ONLY = ("w_norm", "clip", "cycle")


def parse_stage(text: str | int) -> Stage:
    """``--stage`` as config.json stores it: 1 and 2 as numbers (as before), ``"e4e"``."""
    value: Stage = int(text) if str(text) in ("1", "2") else str(text)
    if value not in STAGES:
        raise UsageError(f"--stage must be 1, 2 or e4e, not {text}")
    return value
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
    def for_stage(cls, stage: Stage, **overrides: float | None) -> LossWeights:
        d = {k: v for k, v in STAGE_DEFAULTS[stage].items() if k not in ("lr", "max_steps")}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)  # type: ignore[arg-type]


IDENTITIES = ("arcface", "moco")


@dataclass
class E4EConfig:
    """The e4e stage's own settings (flag names; e4e's option names in ``e4e_opts``).

    Built by :meth:`recipe` from :class:`~clipinvert.training.e4e_step.E4ESettings`, the one
    place e4e's defaults are written down."""

    identity: str  # the identity network: arcface (faces) or moco
    w_discriminator: float  # e4e's w_discriminator_lambda
    delta_reg: float  # e4e's delta_norm_lambda
    d_lr: float
    r1: float
    d_reg_every: int
    progressive_start: int
    progressive_step_every: int
    w_pool_size: int  # 0: no pool

    @classmethod
    def recipe(cls, identity: str, **overrides: Any) -> E4EConfig:
        from .e4e_step import E4ESettings

        s = E4ESettings()
        d: dict[str, Any] = {
            "identity": identity, "w_discriminator": s.weights.adv,
            "delta_reg": s.weights.delta, "d_lr": s.d_lr, "r1": s.r1,
            "d_reg_every": s.d_reg_every, "progressive_start": s.progressive_start,
            "progressive_step_every": s.progressive_step_every, "w_pool_size": s.w_pool_size}
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def __post_init__(self) -> None:
        if self.identity not in IDENTITIES:
            raise UsageError(f"--identity {self.identity}: use arcface or moco")
        for name in ("d_reg_every", "progressive_step_every"):
            if int(getattr(self, name)) < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {getattr(self, name)}: must be at least 1")
        for name in ("progressive_start", "w_pool_size"):
            if int(getattr(self, name)) < 0:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {getattr(self, name)}: must be at least 0")

    def settings(self, weights: LossWeights) -> Any:
        """The step's :class:`~clipinvert.training.e4e_step.E4ESettings`."""
        from .e4e_step import E4ESettings, E4EWeights

        return E4ESettings(
            weights=E4EWeights(l2=weights.l2, lpips=weights.lpips, id=weights.id,
                               adv=self.w_discriminator, delta=self.delta_reg),
            d_lr=self.d_lr, r1=self.r1, d_reg_every=self.d_reg_every,
            progressive_start=self.progressive_start,
            progressive_step_every=self.progressive_step_every, w_pool_size=self.w_pool_size)


@dataclass
class TrainConfig:
    """Everything a run needs; JSON round-trips through ``config.json``."""

    domain: str
    data: str
    stage: Stage
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
    e4e: E4EConfig | None = None  # stage "e4e" only

    def __post_init__(self) -> None:
        parse_stage(self.stage)
        if self.stage == "e4e":
            self._check_e4e()
        elif self.batch_size < 2:
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

    def _check_e4e(self) -> None:
        """The e4e stage trains on images alone, in float32, from one batch image up."""
        if self.e4e is None:
            raise UsageError("the e4e stage needs its settings (TrainConfig.e4e)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.amp:
            raise UsageError(f"--amp {self.amp}: the e4e stage trains in float32 (R1's double "
                             "backward and the discriminator are not scaled)")
        given = [f"--{k.replace('_', '-')}" for k in CLIPINVERTER_ONLY
                 if getattr(self.weights, k) != 0]
        if given:
            raise UsageError(f"{', '.join(given)}: not a term of the e4e stage (CLIPInverter's "
                             "stages 1-2 only)")

    @classmethod
    def for_stage(cls, stage: Stage, *, lr: float | None = None, max_steps: int | None = None,
                  weights: dict[str, float | None] | None = None,
                  e4e: dict[str, Any] | None = None, **kw: Any) -> TrainConfig:
        """The recipe of ``stage`` with the given overrides (None: the recipe's).

        ``e4e``: the e4e stage's settings (:class:`E4EConfig` fields; ``identity`` required);
        its ``id`` weight defaults to e4e's for that identity network (0.1 ArcFace, 0.5 MoCo).
        """
        d = STAGE_DEFAULTS[stage]
        weights = dict(weights or {})
        settings = None
        if stage == "e4e":
            from .e4e_step import default_id_weight

            opts = dict(e4e or {})
            if not opts.get("identity"):
                raise UsageError("the e4e stage needs an identity network: arcface or moco")
            settings = E4EConfig.recipe(**opts)
            if weights.get("id") is None:
                weights["id"] = default_id_weight(settings.identity)
        elif e4e and any(v is not None for v in e4e.values()):
            named = ", ".join(f"--{k.replace('_', '-')}" for k, v in e4e.items()
                              if v is not None)
            raise UsageError(f"{named}: options of --stage e4e only")
        return cls(stage=stage, lr=float(lr if lr is not None else d["lr"]),
                   max_steps=int(max_steps if max_steps is not None else d["max_steps"]),
                   weights=LossWeights.for_stage(stage, **weights), e4e=settings, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["e4e"] is None:  # stages 1-2 write config.json as they always did
            del d["e4e"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["weights"] = LossWeights(**d["weights"])
        if d.get("e4e") is not None:
            d["e4e"] = E4EConfig(**d["e4e"])
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
