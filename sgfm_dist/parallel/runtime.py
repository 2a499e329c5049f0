"""The process group as the trainer and the command lines see it: start and stop it (with
DeepSpeed's communication layer on top), and the few collectives they need outside the model.

``setup_distributed`` makes one code path serve every launch:

* ``deepspeed launch/train.py`` / ``torchrun`` set RANK, WORLD_SIZE, MASTER_ADDR/PORT: used as is;
* ``mpiexec -n N python launch/train.py``: MPI discovery (mpi4py) fills them in;
* plain ``python launch/train.py``: a one-rank gloo group on 127.0.0.1 and a free port, so the
  same ``deepspeed.initialize`` engine (ZeRO, clipping, checkpoint format) runs on one process.

The group itself comes from :func:`sgfm_dist.parallel.mesh.init_distributed` (the one function
that creates it); DeepSpeed only wraps it. On CPU DeepSpeed's communication backend would
JIT-compile its shared-memory all-reduce (about a minute on 2 cores, and a C++ toolchain) on
first use; it is marked unavailable so plain gloo is used and nothing is compiled.

The collectives here move host-side bookkeeping (logged scalars, checkpoint client state),
never field data: that goes through the mesh's groups in ``halo`` / ``fft`` / ``collectives``.
Every function also works without a process group (one process: identities).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import Tensor


def setup_distributed(device: str, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Start the process group (env://, mpiexec discovery or a lone process) and DeepSpeed's
    communication layer on top of it; returns ``(rank, world size, local rank)``. Idempotent.
    ``timeout_s``: how long a collective waits for the other ranks (None: ``DEFAULT_TIMEOUT_S``)."""
    import deepspeed
    import deepspeed.ops

    from .mesh import DEFAULT_TIMEOUT_S, init_distributed

    if device == "cpu":
        # no JIT-compiled shared-memory all-reduce on CPU: gloo does the job for our sizes
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device == "cuda" else "gloo"
    timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    rank, world = init_distributed(backend=backend, timeout_s=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # finds the group and wraps it
    _give_deepspeed_world_clone(timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local_rank


def _give_deepspeed_world_clone(timeout_s: float) -> None:
    """DeepSpeed reduces gradients over its own copy of the world group, which it makes with
    ``new_group(ranks)`` and hence torch's default timeout (30 min on gloo), not the default
    group's: a hung rank would stall the others that long whatever ``timeout_s`` says. Making
    that copy here, with ``timeout_s``, before the engine asks for it, fixes that."""
    import datetime

    from deepspeed.utils import groups

    if dist.get_world_size() > 1 and getattr(groups, "_WORLD_GROUP", None) is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())),
                                             timeout=datetime.timedelta(seconds=timeout_s))


def teardown_distributed(engine=None) -> None:
    """Release the engine's hooks and buffers and the process group (safe to call twice)."""
    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default group; ``(0, 1)`` without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Every rank waits here for the others (no-op without a group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all ranks, in place (returned for chaining)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def setup_if_launched(device: str) -> tuple[int, int, bool]:
    """``(rank, world size, started)``: the process group when a launcher started this process
    (torchrun, deepspeed, mpiexec; gloo on CPU, nccl on CUDA), else ``(0, 1)`` and no group, so a
    plain ``python`` command that runs no collective needs no rendezvous port. ``started`` says
    whether the group was started here (the caller then ends it with ``teardown_distributed``;
    a group that already existed belongs to whoever made it). Inference only: no DeepSpeed
    layer on top (``setup_distributed`` adds it for training)."""
    from .mesh import detect_launcher, init_distributed

    if dist.is_initialized():
        return *world(), False
    if detect_launcher() == "none":
        return 0, 1, False
    return *init_distributed(backend="nccl" if device == "cuda" else "gloo"), True


# ---- waiting longer than the process-group timeout, and failed collectives -----------------
_store_barriers = 0


def store_barrier(poll_s: float = 0.5) -> None:
    """A barrier that may wait longer than the process-group timeout: for the ranks that wait
    while rank 0 alone works (an evaluation, a long save).

    A collective barrier fails after the group's timeout, so an evaluation longer than that
    killed the job. Here every rank adds 1 to a counter in the rendezvous store (the TCPStore
    every launcher sets up) and polls it until all have: no collective is in flight meanwhile,
    so nothing times out. A rank that dies is still noticed: the launcher ends the job, and
    when the store's host (rank 0, or torchrun's agent) is gone the poll raises. A short
    collective barrier ends it, so no rank leaves (and rank 0 takes the store down on exit)
    while another still polls. Every rank must call it, in the same order (like ``barrier``)."""
    global _store_barriers
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch.distributed.distributed_c10d import _get_default_store

    _store_barriers += 1
    store, key, world_size = _get_default_store(), f"sgfm/store_barrier/{_store_barriers}", dist.get_world_size()
    store.add(key, 1)
    while store.add(key, 0) < world_size:
        time.sleep(poll_s)
    dist.barrier()


def all_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce of a scalar)."""
    x = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum(x)[0] > 0)


_FAILURE_HINTS = {
    "Connection reset": "a peer's connection was reset: that rank (or its node) died",
    "Connection closed": "a peer's connection was closed: that rank (or its node) died",
    "Broken pipe": "a peer's connection broke: that rank (or its node) died",
    "Timed out": "the collective timed out: a rank hung or its node became unreachable",
    "timed out": "the collective timed out: a rank hung or its node became unreachable",
    "Timeout": "the collective timed out: a rank hung or its node became unreachable",
    "NCCL": "NCCL reported an error: a rank died, hung or its GPU failed",
}


def collective_failure(exc: BaseException) -> str | None:
    """What a failed collective means, in words, or None when ``exc`` is not a failed collective
    (gloo raises plain RuntimeErrors naming its transport; nccl ``DistBackendError``)."""
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo" in text)):
        return None
    for needle, meaning in _FAILURE_HINTS.items():
        if needle in text:
            return meaning
    return "a collective failed: another rank died or stopped responding"


def group_rank(group) -> int:
    """This process's rank within ``group`` (a process group of the mesh or of DeepSpeed's ZeRO)."""
    return dist.get_rank(group=group)


def gather_shards(shard: Tensor, group, to_all: bool = True) -> list[Tensor] | None:
    """Every rank's equally shaped ``shard`` in ``group``, in group-rank order: on every rank
    (``to_all``), or only on the group's first rank (the others get None), for host-side state
    that is kept sharded (the ZeRO-3 EMA) and assembled only to be saved or evaluated."""
    world = dist.get_world_size(group=group)
    if to_all:
        parts = [torch.empty_like(shard) for _ in range(world)]
        dist.all_gather(parts, shard, group=group)
        return parts
    dst = dist.get_global_rank(group, 0)
    mine = dist.get_rank() == dst
    parts = [torch.empty_like(shard) for _ in range(world)] if mine else None
    dist.gather(shard, parts, dst=dst, group=group)
    return parts
