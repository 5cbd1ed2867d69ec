"""`clipinvert train` end to end on a tiny domain and a tiny captioned set (CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from clipinvert.cli import main
from clipinvert.testing.training import write_caption_set, write_training_domain

NAMES = ("loss_id_real", "loss_l2_real", "loss_lpips_real", "loss_w_norm_real", "loss_real",
         "loss_id_cycle", "loss_l2_cycle", "loss_lpips_cycle", "loss_w_norm_cycle",
         "loss_cycle", "loss")


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_domain(tmp_path_factory.mktemp("trainable"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caption_set(tmp_path_factory.mktemp("captions") / "set", n=6)


def _train(domain: Path, data: Path, run: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "-o", str(run), "--models", str(domain),
                 "--domain", "trainable", "--device", "cpu", "--workers", "0", "-b", "2",
                 "--val-fraction", "0.34", "--log-every", "1", "--val-every", "2",
                 "--save-every", "2", "--image-every", "2", "--quiet", *extra])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(domain: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four uninterrupted stage-1 steps (shared: the stage-1 checks, the resume comparison and
    stage 2's --init)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    assert _train(domain, data, run, "--max-steps", "4") == 0
    return run


def test_stage1_runs_logs_and_saves_released_layout(full_run: Path) -> None:
    run = full_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["stage"] == 1 and cfg["weights"]["w_norm"] == 0.005 and cfg["lr"] == 5e-4
    metrics = _metrics(run)
    train = [m for m in metrics if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        for name in NAMES:
            assert math.isfinite(m[name]), name
        if m["mismatch"]:  # the directional term only when the captions were rolled
            assert math.isfinite(m["loss_directional_real"])
        else:
            assert "loss_directional_real" not in m
    assert any(m["mismatch"] for m in train)
    assert any(m["split"] == "val" for m in metrics)
    assert list((run / "images").glob("step_*.png"))
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert set(ckpt) == {"state_dict", "opts"}
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("adapter.") for k in keys)
    assert not any(k.startswith("decoder.affine_mlps") for k in keys)  # stage 1: plain decoder
    for k in ("stylegan_size", "start_from_latent_avg", "no_coarse_mapper",
              "no_medium_mapper", "no_fine_mapper"):
        assert k in ckpt["opts"]
    assert (run / "checkpoints" / "best.pt").exists()
    assert (run / "checkpoints" / "resume.pt").exists()
    assert (run / "models.toml").exists()


def test_existing_run_refused_without_resume_and_batch_one(domain: Path, data: Path,
                                                           tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert _train(domain, data, run, "--max-steps", "1") == 2
    assert "--resume" in capsys.readouterr().err
    assert _train(domain, data, tmp_path / "b1", "--max-steps", "1", "-b", "1") == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and len(err.strip().splitlines()) == 1
    assert _train(domain, data, tmp_path / "s2", "--stage", "2") == 2
    assert "--init" in capsys.readouterr().err


def test_resume_is_bit_exact_and_checkpoint_edits(domain: Path, data: Path, full_run: Path,
                                                  tmp_path: Path, capsys) -> None:
    part = tmp_path / "part"
    assert _train(domain, data, part, "--max-steps", "2") == 0
    assert _train(domain, data, part, "--resume", "--max-steps", "4") == 0
    captured = capsys.readouterr()
    # stdout is the result alone (the run's models.toml); the hint to use it is on stderr
    assert captured.out.strip().splitlines()[-1] == str(part / "models.toml")
    assert "--domain part" in captured.err and "--domain part" not in captured.out
    a = torch.load(full_run / "checkpoints" / "latest.pt", weights_only=True)["state_dict"]
    b = torch.load(part / "checkpoints" / "latest.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [m["step"] for m in _metrics(part) if m["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    # A changed setting is refused on resume.
    assert _train(domain, data, part, "--resume", "--seed", "5", "--lpips", "0.3") == 2
    err = capsys.readouterr().err
    assert "--seed 5 (the run has 0)" in err and "--lpips 0.3 (the run has 0.6)" in err, err
    # The saved checkpoint is an edit model: the run's models.toml makes `edit` use it.
    img = next(data.glob("*.png"))
    rc = main(["edit", str(img), "blond hair", "--models", str(part / "models.toml"),
               "--domain", "part", "--device", "cpu", "--workers", "0", "-o",
               str(tmp_path / "edited"), "--quiet"])
    assert rc == 0 and (tmp_path / "edited" / f"{img.stem}.png").exists()


def test_stage2_trains_only_the_remapper(domain: Path, data: Path, full_run: Path,
                                         tmp_path: Path) -> None:
    s2 = tmp_path / "s2"
    init = full_run / "checkpoints" / "latest.pt"
    assert _train(domain, data, s2, "--stage", "2", "--init", str(init), "--max-steps", "2",
                  "--match-prob", "0") == 0
    before = torch.load(init, weights_only=True)["state_dict"]
    after = torch.load(s2 / "checkpoints" / "latest.pt", weights_only=True)["state_dict"]
    assert any(k.startswith("decoder.affine_mlps.") for k in after)
    for k, v in before.items():  # adapter and generator unchanged
        assert torch.equal(v, after[k]), k
    # The official inference's loading steps: networks built from the domain's sizes (not from
    # the file), adapter strict, decoder strict with the remapper, then the opts it reads.
    from clipinvert.nets import CLIPAdapter, Generator
    from clipinvert.testing.models import TINY_ENCODER, tiny_config

    ckpt = torch.load(s2 / "checkpoints" / "latest.pt", weights_only=True)
    text_dim = after["adapter.coarse_mapping.modulation_module_list.0.gamma_function.0.weight"
                     ].shape[1]
    adapter = CLIPAdapter(text_dim=text_dim, widths=TINY_ENCODER.adapter_widths)
    adapter.load_state_dict({k[8:]: v for k, v in after.items() if k.startswith("adapter.")},
                            strict=True)
    decoder = Generator(dataclasses.replace(tiny_config(32, 64, 32), text_dim=text_dim))
    decoder.load_state_dict({k[8:]: v for k, v in after.items() if k.startswith("decoder.")},
                            strict=True)
    assert ckpt["opts"]["stylegan_size"] == 32 and ckpt["opts"]["start_from_latent_avg"] is True
    train = [m for m in _metrics(s2) if m["split"] == "train"]
    assert all("loss_w_norm_real" not in m for m in train)
    assert all(math.isfinite(m["loss"]) and m["mismatch"] == 1.0 for m in train)


def test_untrainable_domain_is_one_line_naming_what_is_missing(data: Path, tmp_path: Path,
                                                               capsys) -> None:
    rc = main(["train", "--domain", "cats", "--data", str(data), "-o", str(tmp_path / "c"),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and len(err.strip().splitlines()) == 1
    assert "cannot be trained yet" in err and "e4e" in err and "stylegan2" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # ~8 s of real steps; the default suite keeps one training run per stage
def test_overfitting_one_batch_lowers_the_loss(domain: Path, data: Path) -> None:
    """The real step on one fixed batch, repeated: the adapter learns it (stage 1)."""
    from clipinvert.registry import Registry
    from clipinvert.training.build import build
    from clipinvert.training.config import TrainConfig
    from clipinvert.training.loop import Trainer

    cfg = TrainConfig.for_stage(1, lr=5e-3, max_steps=1, domain="trainable", data=str(data),
                                run_dir="unused", batch_size=2, workers=0, device="cpu",
                                match_prob=1.0)
    parts = build(cfg, Registry.load(domain), torch.device("cpu"), warn=lambda s: None)
    trainer = Trainer(cfg, parts.model, parts.clip.encode_text, parts.criteria,
                      parts.train_set, None, log=lambda s: None)
    from clipinvert.training.data import collate

    batch = collate([parts.train_set[0], parts.train_set[1]])
    losses = [trainer.train_step(batch)["loss"] for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    # Ranger's first steps are momentum-SGD steps through a 0.1-scaled residual: small but
    # steady.  Every step lowers the loss on the batch it fits.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 5e-3, losses


@pytest.mark.slow  # a real subprocess and signal (~8 s)
def test_ctrl_c_saves_a_resumable_state(domain: Path, data: Path, tmp_path: Path) -> None:
    """A real Ctrl-C: the step in progress finishes, resume.pt holds it, exit 130, one line."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipinvert.cli", "train", "--data", str(data), "-o", str(run),
         "--models", str(domain), "--domain", "trainable", "--device", "cpu", "--workers", "0",
         "-b", "2", "--max-steps", "1000", "--log-every", "1", "--val-every", "1000",
         "--save-every", "1000", "--image-every", "1000", "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"clipinvert: interrupted — continue with: clipinvert train -o {run} --resume")
    state = torch.load(run / "checkpoints" / "resume.pt", weights_only=True)
    logged = [m["step"] for m in _metrics(run) if m["split"] == "train"]
    assert state["step"] == logged[-1] >= 1
    assert (run / "checkpoints" / "latest.pt").exists()


def test_resume_keeps_the_saved_settings_and_takes_how_to_run() -> None:
    """Flags given on --resume: --max-steps may rise, device/workers/models may change; any
    other flag (a loss weight included) must agree with config.json, left at its default it is
    not given."""
    from clipinvert.errors import UsageError
    from clipinvert.training.config import TrainConfig
    from clipinvert.training.run import resolve_resume

    saved = TrainConfig.for_stage(1, domain="faces", data="d", run_dir="r", max_steps=10,
                                  weights={"clip": 2.0})
    defaults = {"max_steps": None, "clip": None, "device": "auto", "workers": 2, "seed": 0}
    same = resolve_resume(saved, {"max_steps": None, "clip": None, "seed": 0}, defaults)
    assert same == saved
    moved = resolve_resume(saved, {"max_steps": 20, "clip": 2.0, "device": "cpu", "workers": 0},
                           defaults)
    assert (moved.max_steps, moved.device, moved.workers) == (20, "cpu", 0)
    assert moved.weights == saved.weights
    with pytest.raises(UsageError, match=r"--max-steps 5 is below the run's 10"):
        resolve_resume(saved, {"max_steps": 5}, defaults)
    with pytest.raises(UsageError, match=r"--clip 1.0 \(the run has 2.0\)"):
        resolve_resume(saved, {"clip": 1.0}, defaults)
