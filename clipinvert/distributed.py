"""Running one command in several processes under torchrun: ranks, the process group, barriers.

``torchrun --nproc-per-node N -m clipinvert CMD …`` starts N processes that run the same
command; :func:`launch_from_env` reads which one this is.  ``train`` wraps the trained part in
DistributedDataParallel (docs/training-ddp.md); the image commands shard their sorted inputs
across the ranks (docs/batch-runs.md#torchrun).  Both join the process group with
:func:`process_group` — NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the CPU — and
turn a lost peer into one line.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ClipInvertError, UsageError, first_line

if TYPE_CHECKING:  # torch is imported where it is used: `align` never needs it
    import torch

__all__ = ["TIMEOUT_ENV", "Launch", "barrier", "gather", "launch_from_env", "process_device",
           "process_group"]

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
                             "several processes with torchrun (docs/training-ddp.md)")
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
    import torch

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
        raise UsageError(f"several processes run on CUDA (NCCL) or the CPU (gloo), "
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
def process_group(launch: Launch, device: torch.device | None, what: str = "training",
                  backend: str | None = None) -> Iterator[None]:
    """Joined to the process group for the block (NCCL on CUDA, gloo on the CPU, or
    ``backend``), and out of it afterwards, errors included; nothing without torchrun.  A failed
    collective (another process died, or did not answer within ``CLIPINVERT_DIST_TIMEOUT``)
    ends as one line."""
    if not launch.distributed:
        yield
        return
    import warnings

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this PyTorch build has no torch.distributed: it cannot run under "
                         "torchrun")
    nccl = (backend or ("nccl" if device is not None and device.type == "cuda" else "gloo")
            ) == "nccl"
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
                f"{what} processes ({detail}); one of them failed or was stopped — its "
                "own message says why") from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def gather(launch: Launch, value: object) -> list[object]:
    """Every process's ``value``, in rank order (``[value]`` without torchrun)."""
    if not launch.distributed:
        return [value]
    import torch.distributed as dist

    out: list[object] = [None] * launch.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(launch: Launch, device: torch.device | None = None) -> None:
    """Wait for every process (``device``: this process's GPU in an NCCL group)."""
    if launch.distributed:
        import torch.distributed as dist

        cuda = device is not None and device.type == "cuda"
        dist.barrier(device_ids=[device.index] if cuda else None)
