"""Global BatchNorm and the gathered global batch, on two real gloo processes (CPU).

Why: under DDP the e4e encoder's BatchNorm must normalise over the global batch, and the
w-pools must see it whole, for a step of N processes × b images to equal one process of N·b
(the slow test in test_train_ddp.py checks whole training runs; these check the pieces)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from clipinvert.nets.batchnorm import GlobalBatchNorm2d, synchronise_batchnorm
from clipinvert.training.e4e_step import global_rows, rank_rows

WORLD = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.PReLU(4))


def _batch() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1


def _rank(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        net = _net()
        synchronise_batchnorm(net)
        x = rank_rows(_batch(), rank, WORLD)
        y = net(x)
        y.square().mean().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:  # DDP's averaging
            dist.all_reduce(g)
            g /= WORLD
        torch.save({"y": global_rows(y.detach(), WORLD), "grads": grads,
                    "buffers": {k: v.clone() for k, v in net.state_dict().items()
                                if "running" in k or "num_batches" in k}},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_on_two_processes_is_batchnorm_on_the_whole_batch(
        tmp_path: Path) -> None:
    """Outputs, DDP-averaged gradients and running statistics of 2 × 2 images through
    GlobalBatchNorm2d equal BatchNorm2d's on the 4 images in one process, to rounding; and
    ``global_rows`` puts every rank's rows back in the global batch's order."""
    mp.spawn(_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD)
    net = _net()
    y = net(_batch())
    y.square().mean().backward()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-5)
        for g, p in zip(got["grads"], net.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        bn = net[1]
        torch.testing.assert_close(got["buffers"]["1.running_mean"], bn.running_mean)
        torch.testing.assert_close(got["buffers"]["1.running_var"], bn.running_var)
        assert int(got["buffers"]["1.num_batches_tracked"]) == 1


def test_synchronise_batchnorm_keeps_parameters_keys_and_single_process_behaviour() -> None:
    """In place: the same parameter objects (an optimizer made before keeps them), the same
    state-dict keys (checkpoints keep their layout); outside a process group it is
    BatchNorm2d, in training and in eval mode."""
    net, ref = _net(), _net()
    params = list(net.parameters())
    keys = list(net.state_dict())
    assert synchronise_batchnorm(net) == 1
    assert type(net[1]) is GlobalBatchNorm2d
    assert all(a is b for a, b in zip(params, net.parameters(), strict=True))
    assert list(net.state_dict()) == keys
    x = _batch()
    for mode in (True, False):
        net.train(mode), ref.train(mode)
        assert torch.equal(net(x), ref(x))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_rows_deal_the_global_batch_as_the_sampler_does(world: int) -> None:
    t = torch.arange(6 * world).reshape(6 * world, 1)
    rows = [rank_rows(t, r, world) for r in range(world)]
    assert sorted(torch.cat(rows).flatten().tolist()) == list(range(6 * world))
    # global_rows' interleaving, done by hand: row i of rank r is global row i·N + r
    assert torch.equal(torch.stack(rows, 1).flatten(0, 1), t)
