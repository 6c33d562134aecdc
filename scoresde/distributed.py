"""Data-parallel training under ``torchrun``: process-group setup and the per-rank batch split.

``torchrun --nproc_per_node=N`` starts N processes with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
in the environment. :func:`setup` joins the process group (gloo on CPU, NCCL on CUDA) and picks
the rank's device; the model is wrapped in ``DistributedDataParallel``, which averages gradients.

Batches: every rank draws the *global* batch's indices, times and noise from the same seeded
generator, then keeps its own contiguous slice (:func:`rank_slice`). This is an exact per-rank
index split (the equivalent of a ``DistributedSampler`` with a shared seed): the effective batch is
the sum of the per-rank batches, and since DDP averages equal-sized per-rank mean losses, N ranks
take the same step as one process on the global batch, up to float summation order.
Logging and checkpoints happen on rank 0 only; EMA needs no communication because every rank
applies the same update to the same (all-reduced) parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``); single process otherwise.

    Returns the rank info and the device this rank should use (``cuda:LOCAL_RANK`` on CUDA).
    """
    world = env_world_size()
    if world <= 1:
        return DistInfo(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        _load_compiler_stack()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    if dist.get_world_size() != world:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    return DistInfo(rank, world, local_rank, initialized_here), device


def _load_compiler_stack() -> None:
    """Import torch's compiler stack (``torch.compiler.disable`` loads it) before the process group
    exists.

    Loaded afterwards, as the first optimizer loads it lazily, it keeps the group referenced inside
    torch (2.13), so :func:`cleanup`'s ``destroy_process_group`` cannot free it: gloo's three threads
    (``gloo_tcp_loop`` and two ``pt_gloo_runloop``) then run on into interpreter shutdown, where
    they sporadically killed a finished worker with SIGABRT ("terminate called without an active
    exception"). Loaded first, the group and its threads go at :func:`cleanup`
    (``tests/test_distributed.py::test_cleanup_stops_the_backend_threads``).
    """
    torch.compiler.disable(lambda: None)


def cleanup(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def rank_slice(global_batch: int, info: DistInfo) -> slice:
    """This rank's contiguous share of a global batch; the global batch must split evenly."""
    if global_batch % info.world_size:
        raise ValueError(
            f"batch_size={global_batch} must be divisible by the number of processes ({info.world_size}); "
            "batch_size is the global batch, split evenly across ranks"
        )
    per = global_batch // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (identity on one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision, shared with every rank (so a wall-clock stop happens at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


def agree_to_stop(time_over: bool, signalled: bool, info: DistInfo, device: torch.device) -> tuple[bool, bool]:
    """``(time_over, signalled)`` agreed by every rank in one collective: the wall-clock decision is
    rank 0's (clocks differ), a signal on any rank counts (SIGINT/SIGTERM may reach one rank only).
    Every rank then stops at the same step."""
    if not info.enabled:
        return time_over, signalled
    t = torch.tensor([1.0 if (time_over and info.is_main) else 0.0, 1.0 if signalled else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    over, sig = t.tolist()
    return over > 0.5, sig > 0.5


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


__all__ = ["DistInfo", "setup", "cleanup", "rank_slice", "all_reduce_mean", "broadcast_flag", "agree_to_stop", "barrier",
           "env_world_size"]
