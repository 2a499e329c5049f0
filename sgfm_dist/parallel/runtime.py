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

import torch.distributed as dist
from torch import Tensor


def setup_distributed(device: str) -> tuple[int, int, int]:
    """Start the process group (env://, mpiexec discovery or a lone process) and DeepSpeed's
    communication layer on top of it; returns ``(rank, world size, local rank)``. Idempotent."""
    import deepspeed
    import deepspeed.ops

    from .mesh import init_distributed

    if device == "cpu":
        # no JIT-compiled shared-memory all-reduce on CPU: gloo does the job for our sizes
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if device == "cuda" else "gloo"
    rank, world = init_distributed(backend=backend)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # finds the group and wraps it
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local_rank


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
