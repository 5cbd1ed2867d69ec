"""`torchrun -m clipinvert train`: distributed training with real processes (gloo, CPU).

Every process is started in its own session, every wait is bounded, and whatever is still alive
at the end of a test is killed by process group.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchrun_helpers import (
    WAIT,
    clipinvert_lines,
    free_port,
    kill_tree,
    launch_env,
    no_clipinvert_traceback,
    run_all,
    start_process,
)

from clipinvert.cli import main
from clipinvert.testing.training import write_caption_set, write_training_domain


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_training_domain(tmp_path_factory.mktemp("trainable"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 10 images: 2 held out, 8 to train on = 4 per process = 2 steps of -b 2 per epoch
    return write_caption_set(tmp_path_factory.mktemp("captions") / "set", n=10)


def _train_args(domain: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["-m", "clipinvert", "train", "--data", str(data), "-o", str(run), "--models",
            str(domain), "--domain", "trainable", "--device", "cpu", "--workers", "0", "-b", "2",
            "--max-steps", "2", "--val-fraction", "0.2", "--log-every", "1", "--val-every", "2",
            "--save-every", "2", "--image-every", "2", *extra]


def _train_steps(run: Path) -> list[int]:
    return [m["step"] for m in _metrics(run) if m["split"] == "train"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["state_dict"]


def test_python_m_clipinvert_is_the_command_line() -> None:
    for args, expect in ((["--help"], "Usage: clipinvert"), (["--version"], "clipinvert ")):
        done = subprocess.run([sys.executable, "-m", "clipinvert", *args], capture_output=True,
                              text=True, timeout=60, env=launch_env())
        assert done.returncode == 0 and expect in done.stdout, done.stderr


def test_torchrun_environment_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipinvert.distributed import Launch, _timeout, launch_from_env, process_device
    from clipinvert.errors import UsageError

    assert launch_from_env({}) == Launch() and launch_from_env({"WORLD_SIZE": "1"}) == Launch()
    full = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
    assert launch_from_env(full) == Launch(rank=3, world_size=4, local_rank=1)
    for broken, words in (({"RANK": ""}, "RANK not set"), ({"RANK": "4"}, "do not fit"),
                          ({"LOCAL_RANK": "x"}, "not usable")):
        with pytest.raises(UsageError, match=words):
            launch_from_env({**full, **broken})
    ddp = Launch(rank=1, world_size=2, local_rank=1)
    assert process_device(ddp, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(UsageError, match="cuda:LOCAL_RANK"):
        process_device(ddp, torch.device("cuda", 0))
    with pytest.raises(UsageError, match="not mps"):
        process_device(ddp, torch.device("mps"))
    assert process_device(Launch(), torch.device("mps")) == torch.device("mps")
    monkeypatch.setenv("CLIPINVERT_DIST_TIMEOUT", "90")
    assert _timeout().total_seconds() == 90
    monkeypatch.setenv("CLIPINVERT_DIST_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="CLIPINVERT_DIST_TIMEOUT"):
        _timeout()


def test_two_processes_train_write_once_and_the_checkpoint_edits(
        torchrun: list[str], domain: Path, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    [(rc, out, err)] = run_all(
        [[*torchrun, "--standalone", "--nproc-per-node", "2", *_train_args(domain, data, run)]],
        tmp_path, launch_env())
    assert rc == 0, err
    # Rank 0 alone prints and writes: the run's models.toml on stdout and how to use it on
    # stderr, once; one log line per step, one metric line each.
    assert out.splitlines() == [str(run / "models.toml")], out
    assert err.count("trained: clipinvert edit") == 1, err
    assert err.count("step 1/2:") == 1 and err.count("step 2/2:") == 1, err
    assert "Traceback" not in err
    assert _train_steps(run) == [1, 2]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["split"] for m in lines].count("val") == 1
    assert sorted(p.name for p in (run / "images").iterdir()) == ["step_0000002.png"]
    assert json.loads((run / "config.json").read_text())["batch_size"] == 2  # per process
    # The released layout: adapter.* keys straight from the module, no DDP "module." in them.
    keys = list(_state(run))
    assert any(k.startswith("adapter.") for k in keys)
    assert not any(".module." in k or k.startswith("module.") for k in keys)
    state = torch.load(run / "checkpoints" / "resume.pt", weights_only=True)
    # the position counts both ranks' samples: all 8 training images of epoch 0
    assert (state["step"], state["epoch"], state["position"]) == (2, 0, 8)
    from clipinvert.checkpoints import load_clipinverter

    load_clipinverter(run / "checkpoints" / "latest.pt")  # strict, as edit loads it
    img = next(data.glob("*.png"))
    assert main(["edit", str(img), "blond hair", "--models", str(run / "models.toml"),
                 "--domain", run.name, "--device", "cpu", "--workers", "0", "-o",
                 str(tmp_path / "edited"), "--quiet"]) == 0
    assert (tmp_path / "edited" / f"{img.stem}.png").exists()


def _single(domain: Path, data: Path, run: Path, *extra: str) -> None:
    """The same training in one process (one thread, as each rank), with the batch of both."""
    args = _train_args(domain, data, run, *extra)
    args[args.index("-b") + 1] = "4"
    [(rc, _, err)] = run_all([[sys.executable, *args]], run.parent, launch_env())
    assert rc == 0, err


def _assert_same_training(ddp: dict[str, torch.Tensor], one: dict[str, torch.Tensor],
                          start: dict[str, torch.Tensor]) -> None:
    """Both runs moved the trained weights from ``start``, and to the same place: their
    difference is rounding (float32 ulps), far below the distance travelled (gradients summed
    instead of averaged, or not shared at all, would put them about that distance apart)."""
    assert start and ddp.keys() == one.keys() and start.keys() <= ddp.keys()
    moved = max(float((ddp[k] - v).abs().max()) for k, v in start.items())
    apart = max(float((ddp[k] - one[k]).abs().max()) for k in ddp)
    assert moved > 1e-6, moved
    assert apart <= 1e-2 * moved, (apart, moved)


@pytest.mark.slow  # two launchers plus a single-process twin: ~30 s
def test_two_nodes_train_like_one_process_with_both_batches(
        torchrun: list[str], domain: Path, data: Path, tmp_path: Path) -> None:
    """Two "nodes" on localhost (two torchrun launchers, c10d rendezvous), one process each.
    With the true captions only (no roll within a batch) a step's loss is a mean over samples, so
    DDP's averaged gradient of 2 × 2 images is the single-process gradient of the same 4 images
    (rank r takes samples r, r+2, …: together the 4 a -b 4 run takes): the weights agree with a
    one-process run of -b 4, to rounding."""
    run = tmp_path / "nodes"
    port = free_port()
    launch = [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}"]
    results = run_all([[*launch, *_train_args(domain, data, run, "--match-prob", "1")]] * 2,
                       tmp_path, launch_env())
    for rc, _, err in results:
        assert rc == 0, err
    # c10d gives rank 0 to either launcher: exactly one of them printed and wrote.
    assert sorted(out for _, out, _ in results) == ["", f"{run / 'models.toml'}\n"]
    assert sum("trained: clipinvert edit" in err for _, _, err in results) == 1
    assert _train_steps(run) == [1, 2]
    one = tmp_path / "one"
    _single(domain, data, one, "--match-prob", "1")
    ddp = _state(run)
    # The adapter as training starts it: initialised from the seed (0).
    from clipinvert.nets import CLIPAdapter
    from clipinvert.testing.models import TINY_ENCODER

    text_dim = ddp["adapter.coarse_mapping.modulation_module_list.0.gamma_function.0.weight"
                   ].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = CLIPAdapter(text_dim=text_dim, widths=TINY_ENCODER.adapter_widths)
    start = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
    _assert_same_training(ddp, _state(one), start)


@pytest.mark.slow  # a stage-1 run to start from, then stage 2 on two processes and one: ~40 s
def test_stage2_two_processes_train_the_remapper_like_one(
        torchrun: list[str], domain: Path, data: Path, tmp_path: Path) -> None:
    from clipinvert.checkpoints import load_clipinverter
    from clipinvert.training.build import with_remapper

    s1 = tmp_path / "s1"
    _single(domain, data, s1)
    init = s1 / "checkpoints" / "latest.pt"
    run = tmp_path / "s2ddp"
    extra = ("--stage", "2", "--init", str(init), "--match-prob", "1")
    [(rc, out, err)] = run_all(
        [[*torchrun, "--standalone", "--nproc-per-node", "2",
          *_train_args(domain, data, run, *extra)]], tmp_path, launch_env())
    assert rc == 0, err
    assert out.splitlines() == [str(run / "models.toml")] and _train_steps(run) == [1, 2]
    before, ddp = torch.load(init, weights_only=True)["state_dict"], _state(run)
    assert not any("module." in k for k in ddp)
    for k, v in before.items():  # adapter and generator unchanged
        assert torch.equal(v, ddp[k]), k
    loaded = load_clipinverter(run / "checkpoints" / "latest.pt")  # strict
    assert loaded.decoder.has_remapper
    # The remapper as stage 2 starts it: fresh from the seed on the stage-1 generator.
    plain = load_clipinverter(init).decoder
    fresh = with_remapper(plain, int(loaded.adapter.text_dim), 0).state_dict()
    start = {f"decoder.{k}": v for k, v in fresh.items()
             if k.startswith(("affine_mlps.", "lambdas."))}
    one = tmp_path / "s2one"
    _single(domain, data, one, *extra)
    _assert_same_training(ddp, _state(one), start)


AGREE = """
import json, os, signal, sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from clipinvert.training.data import ResumableSampler
from clipinvert.training.loop import Trainer
from clipinvert.workers import Terminated

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
N, B = 16, 2
orders = [ResumableSampler(N, seed=0, rank=r, world_size=world).indices(0) for r in range(world)]
bad = set(orders[1][B:2 * B]) if rank == 1 else set()  # rank 1's 2nd batch: unreadable now


class Data(torch.utils.data.Dataset):
    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return N

    def __getitem__(self, i):
        if i in bad:
            return {"image": None, "path": f"img{i}", "index": i, "error": "gone"}
        return {"image": torch.zeros(3, 2, 2), "caption": f"c{i}", "path": f"img{i}", "index": i}


t = Trainer.__new__(Trainer)  # the real fit() and batches(); no model
t.cfg = SimpleNamespace(max_steps=6, batch_size=B, seed=0, workers=0, log_every=1,
                        val_every=100, image_every=100, save_every=100)
t.rank, t.world_size, t.device = rank, world, torch.device("cpu")
t.step = t.epoch = t.position = 0
t.train_set, t.val_set, t.log = Data(), None, lambda line: None
trained, saved = [], []


def train_step(batch):
    trained.append(batch["index"].tolist())
    if rank == 1 and len(trained) == 3:  # rank 1 alone gets SIGTERM, during step 3
        os.kill(os.getpid(), signal.SIGTERM)
    return {}


t.train_step = train_step
t.write_metrics = lambda split, logs: None
t.write_grid = lambda: None
t.save = lambda: saved.append(t.step)
try:
    t.fit()
    how = "finished"
except Terminated:
    how = "terminated"
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(
    {"trained": trained, "saved": saved, "step": t.step, "how": how, "order": orders[rank]}))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two processes, no model: ~6 s
def test_ranks_skip_a_spoilt_batch_and_stop_together(torchrun: list[str],
                                                     tmp_path: Path) -> None:
    """Rank 1's second batch lost its images: both ranks skip their second batch.  SIGTERM
    reaches rank 1 alone during step 3: both finish step 3, save it, and stop."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    [(rc, _, err)] = run_all([[*torchrun, "--standalone", "--nproc-per-node", "2",
                                str(script), str(tmp_path)]], tmp_path, launch_env())
    assert rc == 0, err
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["how"] == "terminated" and r["step"] == 3 and r["saved"] == [3], r
        order = r["order"]
        assert r["trained"] == [order[0:2], order[4:6], order[6:8]], r


def _static(torchrun: list[str], port: int, node: int) -> list[str]:
    return [*torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port)]


@pytest.mark.slow  # two failing two-node launches, one of them waiting out a 5 s timeout: ~35 s
def test_a_failing_rank_ends_every_process_with_one_line(
        torchrun: list[str], domain: Path, data: Path, tmp_path: Path) -> None:
    small = write_caption_set(tmp_path / "small", n=3)  # too few images for a batch
    env = launch_env(CLIPINVERT_DIST_TIMEOUT="5")
    # Node 1 fails once training has started (its data has no batch): rank 0 hears of it at
    # the next collective.  Then node 1 fails before joining (-b 1): rank 0 waits 5 s.
    for case, node1_args in (("started", ["--data", str(small)]), ("joining", ["-b", "1"])):
        run = tmp_path / case
        port = free_port()
        results = run_all(
            [[*_static(torchrun, port, 0), *_train_args(domain, data, run)],
             [*_static(torchrun, port, 1), *_train_args(domain, data, run), *node1_args]],
            tmp_path, env)
        for rc, _, err in results:
            assert rc == 1, err  # torchrun's code for a failed worker, whatever the worker's
            assert "clipinvert FAILED" in err  # torchrun's own report
            assert no_clipinvert_traceback(err), err
        (_, _, err0), (_, _, err1) = results
        [line1] = clipinvert_lines(err1)
        assert ("fewer than one batch" if case == "started" else "at least 2") in line1
        [line0] = clipinvert_lines(err0)
        assert line0.startswith("clipinvert: error: rank 0 of 2: lost contact with the other "
                                "training processes"), line0


@pytest.mark.slow  # a real signal to torchrun while two processes train (~20 s)
def test_sigterm_to_torchrun_stops_both_ranks_after_the_same_step(
        torchrun: list[str], domain: Path, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "stopped"
    args = _train_args(domain, data, run)
    args[args.index("--max-steps") + 1] = "1000"
    for flag in ("--val-every", "--save-every", "--image-every"):
        args[args.index(flag) + 1] = "1000"
    proc = start_process([*torchrun, "--standalone", "--nproc-per-node", "2", *args], tmp_path,
                         launch_env())
    try:
        deadline = time.monotonic() + WAIT
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 1, err  # torchrun: SignalException
    assert "SignalException" in err and no_clipinvert_traceback(err)
    lines = clipinvert_lines(err)
    resume = f"clipinvert: terminated — continue with: clipinvert train -o {run} --resume"
    assert lines == [resume] * 2, err
    state = torch.load(run / "checkpoints" / "resume.pt", weights_only=True)
    steps = _train_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and state["step"] == steps[-1]


@pytest.mark.slow  # three two-process launches: ~50 s
def test_two_processes_resume_exactly(torchrun: list[str], domain: Path, data: Path,
                                      tmp_path: Path) -> None:
    """4 steps on two processes = 2 steps, then --resume to 4 on two processes, bit for bit."""
    launch = [*torchrun, "--standalone", "--nproc-per-node", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    for run, extra in ((full, ("--max-steps", "4")), (part, ()),
                       (part, ("--resume", "--max-steps", "4"))):
        [(rc, _, err)] = run_all([[*launch, *_train_args(domain, data, run, *extra)]],
                                  tmp_path, launch_env())
        assert rc == 0, err
    a, b = _state(full), _state(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _train_steps(part) == [1, 2, 3, 4]


# Run under torchrun (or plain python) in place of `-m clipinvert`: the CLI, each rank saving
# its encoder, discriminator and w-pools before and after training to
# $E4E_RANK_STATES/rank<R>.pt (the run folder is rank 0's).
_RANK_STATES = '''
import os, sys, torch
from clipinvert.training.e4e_train import E4ETrainer
fit = E4ETrainer.fit
def state(self):
    p = self.parts
    return {"encoder": {k: v.clone() for k, v in self.model.encoder.state_dict().items()},
            "discriminator": {k: v.clone()
                              for k, v in self.model.discriminator.state_dict().items()},
            "real_pool": p.real_pool.state_dict()["codes"],
            "fake_pool": p.fake_pool.state_dict()["codes"]}
def fit_and_keep(self):
    start = state(self)
    fit(self)
    torch.save({"start": start, "end": state(self)},
               os.path.join(os.environ["E4E_RANK_STATES"], f"rank{self.rank}.pt"))
E4ETrainer.fit = fit_and_keep
from clipinvert.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow  # two processes of the e4e stage and a one-process twin: ~35 s
def test_e4e_two_processes_train_like_one_process_with_both_batches(
        torchrun: list[str], domain: Path, tmp_path: Path) -> None:
    """`--stage e4e` under torchrun (gloo): one run folder written by rank 0 alone; both ranks
    end identical — encoder, discriminator (R1 steps included), BatchNorm statistics (global
    BatchNorm: :mod:`clipinvert.nets.batchnorm`) and the w-pools (filled from the gathered
    global batch) — and equal, to rounding, to one process training on both ranks' images
    (-b 4): the same updates, the same pools, the same logged losses."""
    from clipinvert.testing.training import write_image_set

    images = write_image_set(tmp_path / "images", 10, size=40, seed=5)
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_STATES)
    run, one = tmp_path / "e4e", tmp_path / "one"
    args = _train_args(domain, images, run, "--stage", "e4e", "--progressive-start", "1",
                       "--progressive-step-every", "1", "--d-reg-every", "2",
                       "--w-pool-size", "6")
    for flag in ("--max-steps", "--save-every", "--val-every", "--image-every"):
        args[args.index(flag) + 1] = "3"
    single = [a if a != str(run) else str(one) for a in args]
    single[single.index("-b") + 1] = "4"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    [(rc, out, err)] = run_all(
        [[*torchrun, "--standalone", "--nproc-per-node", "2", str(script), *args[2:]]],
        tmp_path, launch_env(E4E_RANK_STATES=str(tmp_path / "ddp")))
    assert rc == 0, err
    assert out.splitlines() == [str(run / "models.toml")], out
    assert err.count("trained: clipinvert invert") == 1 and "Traceback" not in err, err
    assert err.count("step 3/3:") == 1, err
    assert _train_steps(run) == [1, 2, 3]
    [(rc, _, err)] = run_all([[sys.executable, str(script), *single[2:]]], tmp_path,
                             launch_env(E4E_RANK_STATES=str(tmp_path / "single")))
    assert rc == 0, err
    a, b = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    o = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    for part in ("encoder", "discriminator"):
        for k, v in a["end"][part].items():
            assert torch.equal(v, b["end"][part][k]), (part, k)
        start, ddp, ref = a["start"][part], a["end"][part], o["end"][part]
        assert all(torch.equal(v, o["start"][part][k]) for k, v in start.items())
        trained = [k for k, v in start.items() if v.is_floating_point()
                   and not torch.equal(v, ref[k])]
        moved = max(float((ref[k] - start[k]).abs().max()) for k in trained)
        apart = max(float((ddp[k] - ref[k]).abs().max()) for k in trained)
        assert moved > 0 and apart <= 2e-2 * moved, (part, apart, moved)
    for pool in ("real_pool", "fake_pool"):
        assert a["end"][pool].shape[0] == 6
        assert torch.equal(a["end"][pool], b["end"][pool])
        torch.testing.assert_close(a["end"][pool], o["end"][pool], rtol=1e-4, atol=1e-5)
    logged = [[r for r in _metrics(r_) if r["split"] == "train"] for r_ in (run, one)]
    for x, y in zip(*logged, strict=True):
        for key in ("loss", "loss_l2", "loss_lpips", "discriminator_loss", "total_delta_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    saved = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert not any(".module." in k or k.startswith("module.") for k in saved["state_dict"])
    for k, v in a["end"]["discriminator"].items():
        assert torch.equal(v, saved["discriminator_state_dict"][k]), k
    state = torch.load(run / "checkpoints" / "resume.pt", weights_only=True)
    # 8 training images = 2 steps of 2 × 2 per epoch: step 3 took the first 4 of epoch 1
    assert (state["step"], state["epoch"], state["position"]) == (3, 1, 4)
