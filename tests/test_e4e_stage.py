"""``clipinvert train --stage e4e``: the step's parity with encoder4editing's own coach, the
run, resume, refusals (docs/training.md#e4e-stage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipinvert.training.e4e_step import (
    E4ECriteria,
    E4EParts,
    E4ESettings,
    E4EWeights,
    WPool,
    e4e_step,
    ensure_groups,
    progressive_stage,
)

# ---- parity with encoder4editing (omertov/encoder4editing @ 99ea505) -------------------------
# e4e's code builds only the full-width IR-SE50 encoder, a 512-wide generator and ResNet-50 MoCo,
# so the parity setup is full width with small images: a 32 px generator (8 styles: all three
# FPN levels), 64 px inputs, the output pooled to 64 (e4e's face_pool set to 64), MoCo identity
# (the README's cars recipe, id 0.5).  Progression starts at step 1, one delta per step, so the
# three steps train stages 0, 1, 2 (heads joining the optimizer mid-run), R1 every 2 steps
# (steps 0 and 2), the w-pool on (50; its index draws matter from stage 1).
PARITY_SETTINGS = E4ESettings(weights=E4EWeights(id=0.5), progressive_start=1,
                              progressive_step_every=1, d_reg_every=2, loss_size=64)
PARITY_SEED, PARITY_STEPS, PARITY_BATCH = 7, 3, 2


def parity_files(directory: Path) -> dict[str, Path]:
    """Random weights in the released layouts: MoCo ResNet-50, AlexNet trunk; written once."""
    from torchvision.models import alexnet, resnet50

    directory.mkdir(parents=True, exist_ok=True)
    files = {"moco": directory / "moco.pt", "lpips": directory / "alexnet.pt"}
    if not files["moco"].exists():
        torch.manual_seed(11)
        sd = {f"module.encoder_q.{k}": v for k, v in resnet50().state_dict().items()}
        torch.save({"state_dict": sd}, files["moco"])
        torch.manual_seed(12)
        torch.save(alexnet().state_dict(), files["lpips"])
    return files


def parity_models() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.nn.Module,
                             torch.Tensor]:
    """(encoder, decoder, latent_avg, discriminator, x), all from fixed seeds."""
    from clipinvert.nets import Encoder4Editing, Generator, LatentDiscriminator

    torch.manual_seed(21)
    encoder = Encoder4Editing(n_styles=8)
    torch.manual_seed(22)
    decoder = Generator(size=32)
    latent_avg = decoder.mean_latent(1000, seed=3).repeat(8, 1)
    torch.manual_seed(23)
    disc = LatentDiscriminator()
    g = torch.Generator().manual_seed(24)
    x = torch.rand((PARITY_BATCH, 3, 64, 64), generator=g) * 2 - 1
    return encoder, decoder.requires_grad_(False), latent_avg, disc, x


def run_parity(directory: Path) -> tuple[list[dict[str, float]], dict[str, torch.Tensor],
                                         dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our three steps: the logs of each, the encoder's and discriminator's updates, and the
    initial encoder state (for the reference run)."""
    from clipinvert.losses import IdentityLoss, LPIPSLoss
    from clipinvert.training.optim import make_optimizer

    files = parity_files(directory)
    encoder, decoder, latent_avg, disc, x = parity_models()
    criteria = E4ECriteria(identity=IdentityLoss.from_file("moco", files["moco"]),
                           lpips=LPIPSLoss.from_file(files["lpips"]))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    d_before = {k: v.clone() for k, v in disc.state_dict().items()}
    groups = encoder.progressive_groups()
    parts = E4EParts(encoder=encoder.train(), decoder=decoder, latent_avg=latent_avg,
                     discriminator=disc, optimizer=make_optimizer(groups[0], 1e-4),
                     d_optimizer=torch.optim.Adam(disc.parameters(), lr=2e-5),
                     real_pool=WPool(50), fake_pool=WPool(50))
    logs = []
    for step in range(PARITY_STEPS):
        stage = progressive_stage(step, PARITY_SETTINGS, encoder.n_styles)
        ensure_groups(parts.optimizer, groups, stage)
        logs.append(e4e_step(parts, x, step=step, seed=PARITY_SEED, settings=PARITY_SETTINGS,
                             criteria=criteria, stage=stage))
    update = {k: v - before[k] for k, v in encoder.state_dict().items()
              if v.is_floating_point()}
    d_update = {k: v - d_before[k] for k, v in disc.state_dict().items()}
    return logs, update, d_update, before


# Golden numbers: e4e's own coach (omertov/encoder4editing 99ea505, training/coach.py run on
# the CPU) on parity_models() and parity_files(), three steps of its train() loop body.  Patches
# of that copy: pure-PyTorch fused_leaky_relu/upfirdn2d instead of the CUDA ops; LPIPS's
# AlexNet not downloaded (trunk = parity_files' alexnet.pt, heads = the lpips wheel's v0.1 alex);
# MoCo and LPIPS left on the CPU; its z taken from real_z(seed, step) and its python `random`
# seeded with derive_seed("e4e_w_pool", seed, step, 0) before each step (the w-pool's draws);
# its decoder given step_noise(seed, step); its face_pool set to 64.  The networks were loaded
# through e4e's own pSp(opts) from a checkpoint in e4e's layout (strict=True).
# Ours matched every logged term within 5e-7 and the encoder's update within 3e-4 (relative
# norm of the difference; float32 rounding of ≈1e-6 updates), the discriminator's within 2e-6.
E4E_LOGS = [
    {"d_real_loss": 0.7059310674667358, "d_fake_loss": 0.6747151613235474,
     "discriminator_loss": 1.3806462287902832, "discriminator_r1_loss": 0.019468411803245544,
     "encoder_discriminator_loss": 0.7120697498321533, "total_delta_loss": 0.0,
     "loss_id": 0.0020467638969421387, "id_improve": -0.0020467638969421387,
     "loss_l2": 1.79593026638031, "loss_lpips": 0.17003554105758667,
     "loss": 2.0041890144348145},
    {"d_real_loss": 0.6951103806495667, "d_fake_loss": 0.6744820475578308,
     "discriminator_loss": 1.3695924282073975,
     "encoder_discriminator_loss": 0.7129549980163574, "delta1_loss": 0.16545513272285461,
     "total_delta_loss": 0.16545513272285461, "loss_id": 0.0020419061183929443,
     "id_improve": -0.0020419061183929443, "loss_l2": 1.7980560064315796,
     "loss_lpips": 0.16997113823890686, "loss": 2.006382465362549},
    {"d_real_loss": 0.6995267868041992, "d_fake_loss": 0.6738060712814331,
     "discriminator_loss": 1.3733328580856323, "discriminator_r1_loss": 0.02110547386109829,
     "encoder_discriminator_loss": 0.7160229682922363, "delta1_loss": 0.1654505431652069,
     "delta2_loss": 0.13947603106498718, "total_delta_loss": 0.3049265742301941,
     "loss_id": 0.002042233943939209, "id_improve": -0.002042233943939209,
     "loss_l2": 1.7977150678634644, "loss_lpips": 0.17001280188560486,
     "loss": 2.0064096450805664},
]
# The update (after − before) of each part: (norm, dot with randn(seed 5) of its length),
# parameters only (BatchNorm's running statistics are not updates).
E4E_ENCODER_UPDATE = {
    "body": (0.00018136677681468427, 0.0003174619923811406),
    "input_layer": (1.0674466466298327e-05, -2.652500188560225e-05),
    "latlayer1": (0.0, 0.0), "latlayer2": (0.0, 0.0),
    "styles.0": (0.0005435123457573354, -0.0005606936756521463),
    "styles.1": (0.00014682802429888397, -4.8625261115375906e-05),
    "styles.2": (5.951391358394176e-05, -9.359893738292158e-05),
    "styles.3": (0.0, 0.0), "styles.4": (0.0, 0.0), "styles.5": (0.0, 0.0),
    "styles.6": (0.0, 0.0), "styles.7": (0.0, 0.0),
}
E4E_D_UPDATE = {"mlp": (0.049871157854795456, 0.03813164681196213)}


def _part(key: str) -> str:
    return ".".join(key.split(".")[:2]) if key.startswith("styles.") else key.split(".")[0]


def fingerprint(update: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per part: the update's norm and its dot with a fixed random direction."""
    out = {}
    for name in sorted({_part(k) for k in update}):
        keys = sorted(k for k in update if _part(k) == name
                      and "running" not in k and "num_batches" not in k)
        v = torch.cat([update[k].flatten() for k in keys])
        d = torch.randn(v.numel(), generator=torch.Generator().manual_seed(5))
        out[name] = (float(v.norm()), float((v * d).sum()))
    return out


def test_progressive_stage_follows_e4e_steps() -> None:
    s = E4ESettings()  # 20000 / 2000, as e4e's setup_progressive_steps makes them
    n = 18
    assert [progressive_stage(t, s, n) for t in (0, 19_999, 20_000, 21_999, 22_000)] == \
        [0, 0, 1, 1, 2]
    assert progressive_stage(20_000 + 16 * 2000, s, n) == 17
    assert progressive_stage(10**7, s, n) == 17  # never beyond the last delta
    # start 0 (as e4e's loop applies every step equal to the current one, the last wins)
    s0 = E4ESettings(progressive_start=0, progressive_step_every=3)
    assert [progressive_stage(t, s0, 8) for t in (0, 2, 3, 6)] == [1, 1, 2, 3]


@pytest.mark.slow  # full-width encoder, MoCo ResNet-50 and AlexNet: ~18 s
def test_step_equals_e4e_coach(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Three steps on random full-width weights: every logged loss equals e4e's own coach's,
    and so do the encoder's and the discriminator's updates (golden numbers above)."""
    logs, update, d_update, _ = run_parity(tmp_path_factory.mktemp("parity"))
    for ours, theirs in zip(logs, E4E_LOGS, strict=True):
        assert set(ours) == set(theirs)
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, rel=2e-5, abs=1e-6), k
    for golden, got in ((E4E_ENCODER_UPDATE, fingerprint(update)),
                        (E4E_D_UPDATE, fingerprint(d_update))):
        assert set(got) == set(golden)
        for name, (norm, proj) in golden.items():
            assert got[name][0] == pytest.approx(norm, rel=2e-3, abs=1e-12), name
            assert got[name][1] == pytest.approx(proj, abs=2e-3 * norm + 1e-12), name
    # the heads of stages not reached (3..7) and the lateral layers they read never moved
    assert all(float(update[k].abs().max()) == 0 for k in update
               if k.startswith(("styles.3", "styles.7", "latlayer")))


def test_checkpoint_has_e4e_layout_and_load_e4e_reads_it(tmp_path: Path) -> None:
    """latest/best in e4e's layout: load_e4e reads the encoder and latent_avg back exactly;
    opts carry e4e's own names (its setup_model was checked to build pSp from such a file,
    strict, with the fetched encoder4editing code)."""
    from clipinvert.checkpoints import load_e4e
    from clipinvert.nets import Encoder4Editing, Generator, LatentDiscriminator
    from clipinvert.training.checkpoint import e4e_checkpoint, e4e_opts, save_e4e

    torch.manual_seed(0)
    enc = Encoder4Editing(n_styles=6, style_dim=16,
                          stages=((16, 16, 1), (16, 32, 1), (32, 48, 1), (48, 64, 1)))
    dec = Generator(size=16, style_dim=16, channels={4: 8, 8: 8, 16: 8}, n_mlp=2)
    avg = torch.randn(6, 16)
    opts = e4e_opts(stylegan_size=16, settings=E4ESettings(), lr=1e-4, batch_size=8,
                    max_steps=200_000, identity="moco", domain="cats")
    save_e4e(tmp_path / "e4e.pt", e4e_checkpoint(enc, dec, avg, LatentDiscriminator(16), opts))
    ckpt = torch.load(tmp_path / "e4e.pt", weights_only=True)
    assert set(ckpt) == {"state_dict", "latent_avg", "opts", "discriminator_state_dict"}
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"encoder", "decoder"}
    assert ckpt["opts"]["encoder_type"] == "Encoder4Editing"
    assert ckpt["opts"]["progressive_steps"][:3] == [0, 20_000, 22_000]
    assert ckpt["opts"]["w_discriminator_lambda"] == 0.1 and ckpt["opts"]["use_w_pool"]
    back = load_e4e(tmp_path / "e4e.pt")
    assert torch.equal(back.latent_avg, avg)
    for k, v in enc.state_dict().items():
        assert torch.equal(back.encoder.state_dict()[k], v), k
    LatentDiscriminator.from_state_dict(ckpt["discriminator_state_dict"]).load_state_dict(
        ckpt["discriminator_state_dict"])


# ---- the command: clipinvert train --stage e4e on the tiny training domain -------------------
E4E_NAMES = ("d_real_loss", "d_fake_loss", "discriminator_loss", "encoder_discriminator_loss",
             "total_delta_loss", "loss_id", "id_improve", "loss_l2", "loss_lpips", "loss")


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipinvert.testing.training import write_training_domain

    return write_training_domain(tmp_path_factory.mktemp("trainable"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six bare images: no captions, no manifest (the e4e stage needs none)."""
    from clipinvert.testing.training import write_image_set

    return write_image_set(tmp_path_factory.mktemp("bare") / "images", 6, size=40, seed=3)


def _e4e(domain: Path, images: Path, run: Path, *extra: str) -> int:
    """Progression from step 1, one delta a step, R1 every 2 steps: 4 steps reach stage 3."""
    from clipinvert.cli import main

    return main(["train", "--stage", "e4e", "--data", str(images), "-o", str(run), "--models",
                 str(domain), "--domain", "trainable", "--device", "cpu", "--workers", "0",
                 "-b", "2", "--val-fraction", "0.34", "--log-every", "1", "--val-every", "2",
                 "--save-every", "2", "--image-every", "2", "--progressive-start", "1",
                 "--progressive-step-every", "1", "--d-reg-every", "2", "--w-pool-size", "3",
                 "--quiet", *extra])


def _metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def e4e_run(domain: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four uninterrupted e4e steps on bare images (shared by the run, resume and --init
    checks)."""
    run = tmp_path_factory.mktemp("e4e-runs") / "full"
    assert _e4e(domain, images, run, "--max-steps", "4") == 0
    return run


def test_e4e_run_writes_its_folder_in_e4e_names_and_layout(e4e_run: Path, images: Path,
                                                           tmp_path: Path) -> None:
    import json
    import math

    from clipinvert.checkpoints import load_e4e
    from clipinvert.cli import main

    cfg = json.loads((e4e_run / "config.json").read_text())
    assert cfg["stage"] == "e4e" and cfg["lr"] == 1e-4 and cfg["max_steps"] == 4
    assert cfg["e4e"]["identity"] == "arcface" and cfg["weights"]["id"] == 0.1  # faces-like
    assert cfg["e4e"]["w_discriminator"] == 0.1 and cfg["e4e"]["delta_reg"] == 2e-4
    train = [m for m in _metrics(e4e_run) if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        for name in E4E_NAMES:
            assert math.isfinite(m[name]), name
    # R1 on the 0-based steps 0 and 2; delta i from step i (progressive start 1, every 1)
    assert ["discriminator_r1_loss" in m for m in train] == [True, False, True, False]
    assert [sorted(k for k in m if k.startswith("delta")) for m in train] == [
        [], ["delta1_loss"], ["delta1_loss", "delta2_loss"],
        ["delta1_loss", "delta2_loss", "delta3_loss"]]
    val = [m for m in _metrics(e4e_run) if m["split"] == "val"]
    assert [m["step"] for m in val] == [2, 4] and all("loss" in m for m in val)
    assert list((e4e_run / "images").glob("step_*.png"))
    ckpts = e4e_run / "checkpoints"
    for name in ("latest.pt", "best.pt"):
        ckpt = torch.load(ckpts / name, weights_only=True)
        assert set(ckpt) == {"state_dict", "latent_avg", "opts", "discriminator_state_dict"}
        assert ckpt["opts"]["encoder_type"] == "Encoder4Editing"
        assert ckpt["opts"]["progressive_steps"][:3] == [0, 1, 2]
        back = load_e4e(ckpts / name)
        assert back.encoder.n_styles == 8 and back.latent_avg.shape == (8, 64)
    state = torch.load(ckpts / "resume.pt", weights_only=True)
    assert state["step"] == 4 and len(state["optimizer"]["param_groups"]) == 4  # heads 0..3
    assert state["real_pool"]["codes"].shape == (3, 64)  # the pool filled to its size
    # The run's models.toml names best.pt as the domain's e4e: `invert` uses it.
    toml = (e4e_run / "models.toml").read_text()
    assert f'e4e = "{(ckpts / "best.pt").resolve()}"' in toml and "clipinverter" not in toml
    img = next(images.glob("*.png"))
    rc = main(["invert", str(img), "--models", str(e4e_run / "models.toml"), "--domain", "full",
               "--device", "cpu", "--workers", "0", "-o", str(tmp_path / "inv"), "--quiet"])
    assert rc == 0 and (tmp_path / "inv" / f"{img.stem}.png").exists()


def test_e4e_resume_is_bit_exact(domain: Path, images: Path, e4e_run: Path,
                                 tmp_path: Path, capsys) -> None:
    """Stopped after step 2 (R1 done, a head joined) and resumed: the same weights, the
    discriminator's included, as the uninterrupted run."""
    part = tmp_path / "part"
    assert _e4e(domain, images, part, "--max-steps", "2") == 0
    assert _e4e(domain, images, part, "--resume", "--max-steps", "4") == 0
    for name in ("latest.pt", "resume.pt"):
        a = torch.load(e4e_run / "checkpoints" / name, weights_only=True)
        b = torch.load(part / "checkpoints" / name, weights_only=True)
        for key in ("state_dict", "discriminator_state_dict", "encoder", "discriminator"):
            if key in a:
                assert a[key].keys() == b[key].keys()
                for k in a[key]:
                    assert torch.equal(a[key][k], b[key][k]), (name, key, k)
    assert [m["step"] for m in _metrics(part) if m["split"] == "train"] == [1, 2, 3, 4]
    capsys.readouterr()
    assert _e4e(domain, images, part, "--resume", "--r1", "5") == 2
    assert "--r1 5.0 (the run has 10.0)" in capsys.readouterr().err


def test_e4e_init_takes_encoder_decoder_latent_avg_and_discriminator(
        domain: Path, images: Path, e4e_run: Path, tmp_path: Path) -> None:
    """--init an e4e checkpoint: with both learning rates 0 nothing moves, so the run's
    checkpoint is the init file's networks (BatchNorm statistics aside)."""
    init = e4e_run / "checkpoints" / "latest.pt"
    run = tmp_path / "ft"
    assert _e4e(domain, images, run, "--init", str(init), "--max-steps", "1", "--lr", "0",
                "--d-lr", "0") == 0
    a = torch.load(init, weights_only=True)
    b = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert torch.equal(a["latent_avg"], b["latent_avg"])
    for k, v in a["state_dict"].items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, b["state_dict"][k]), k
    for k, v in a["discriminator_state_dict"].items():
        assert torch.equal(v, b["discriminator_state_dict"][k]), k


def test_e4e_refusals_name_what_is_wrong_in_one_line(domain: Path, images: Path,
                                                     tmp_path: Path, capsys) -> None:
    """Missing roles all named at once (exit 3, nothing written); captions are not asked for,
    and CLIPInverter-only flags or e4e-only flags on the wrong stage are refused (exit 2)."""
    from clipinvert.cli import main

    text = domain.read_text().replace('lpips = "alexnet.pt"', 'lpips = "gone.pt"') \
        .replace('encoder_init = "arcface.pt"', 'encoder_init = "nowhere.pt"')
    broken = domain.with_name("broken.toml")
    broken.write_text(text)
    assert _e4e(broken, images, tmp_path / "m", "--max-steps", "1") == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lpips" in err and "encoder_init" in err, err
    assert "clip" not in err.replace("clipinvert", "") and "captions" not in err
    assert not (tmp_path / "m").exists()
    for extra, words in ((["--w-norm", "0.1"], "--w-norm: not a term of the e4e stage"),
                         (["--captions", str(images)], "--captions: the e4e stage"),
                         (["--amp", "bf16"], "float32")):
        assert _e4e(domain, images, tmp_path / "x", "--max-steps", "1", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    rc = main(["train", "--data", str(images), "-o", str(tmp_path / "s1"), "--models",
               str(domain), "--domain", "trainable", "--device", "cpu", "--r1", "5", "--quiet"])
    assert rc == 2 and "--r1: options of --stage e4e only" in capsys.readouterr().err


def test_train_help_lists_the_e4e_flags_with_an_example(capsys) -> None:
    from clipinvert.cli import main

    assert main(["train", "-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("1|2|e4e", "--progressive-start", "--progressive-step-every", "--w-pool-size",
                 "--identity", "--w-discriminator", "--delta-reg", "--d-lr", "--r1",
                 "--d-reg-every"):
        assert flag in out, flag
    assert "clipinvert train --stage e4e" in out.split("Examples:")[1]
