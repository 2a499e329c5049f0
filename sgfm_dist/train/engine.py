"""The DeepSpeed engine around an SGFM model: process group, precision, ZeRO, optimizer,
LR schedule, and the full-weight view the EMA and evaluation need.

``setup_distributed`` makes one code path serve every launch:

* ``deepspeed launch/train.py`` / ``torchrun`` set RANK, WORLD_SIZE, MASTER_ADDR/PORT: used as is;
* ``mpiexec -n N python launch/train.py``: MPI discovery (mpi4py) fills them in;
* plain ``python launch/train.py``: a one-rank gloo group on 127.0.0.1 and a free port, so the
  same ``deepspeed.initialize`` engine (ZeRO, clipping, checkpoint format) runs on one process.

The process group itself comes from ``sgfm_dist.parallel.mesh.init_distributed`` (the one
module that creates groups); DeepSpeed only wraps it.

On CPU the DeepSpeed communication backend would JIT-compile its shared-memory all-reduce
kernel (about a minute on 2 cores, and a C++ toolchain on the machine) on first use; we mark
it unavailable so plain gloo is used and nothing is compiled, like ``torch_adam`` does for
the optimizer.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import Tensor, nn

from sgfm_dist.train.config import Config, to_deepspeed_config
from sgfm_dist.train.schedule import lr_scheduler_factory


def resolve_device(choice: str) -> str:
    """"cpu" or "cuda" for ``train.device`` (``auto`` = CUDA when available)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but torch.cuda.is_available() is False")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def setup_distributed(device: str) -> tuple[int, int, int]:
    """Start the process group (``sgfm_dist.parallel.mesh.init_distributed``: env://, mpiexec
    discovery or a lone process) and DeepSpeed's communication layer on top of it; returns
    (rank, world size, local rank). Idempotent."""
    import deepspeed
    import deepspeed.ops

    from sgfm_dist.parallel.mesh import init_distributed

    if device == "cpu":
        # No JIT-compiled shared-memory all-reduce on CPU: gloo does the job for our sizes.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rank, world = init_distributed(backend="nccl" if device == "cuda" else "gloo")
    # Finds the existing group and only wraps it (DeepSpeed's `cdb`).
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local_rank


def teardown_distributed(engine=None) -> None:
    """Release the engine's hooks/buffers and the process group (safe to call twice)."""
    if engine is not None:
        engine.destroy()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class TrainingLoss(nn.Module):
    """``forward(batch, generator) = model.training_loss(batch, generator)``.

    DeepSpeed applies autocast, ZeRO-3 parameter gathering and its forward hooks in
    ``engine(...)``; wrapping keeps the model's own API (``training_loss``) while training goes
    through the engine's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
        return self.model.training_loss(batch, generator=generator)


def build_engine(model: nn.Module, cfg: Config, device: str, world: int, adapt_config=None):
    """``deepspeed.initialize`` on ``TrainingLoss(model)`` with the config's ZeRO stage,
    precision, clipping, AdamW and warmup+cosine LambdaLR. ``adapt_config(ds_config)`` may rewrite
    the DeepSpeed dict (the dp x sp mesh counts sp ranks in its batch). Returns the engine."""
    import deepspeed

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        # DeepSpeed 0.19.8 broadcasts every parameter as `p.data.view(torch.uint8)` at
        # initialize, which fails on 0-dim tensors ("self.dim() cannot be 0 to view Float as Byte").
        raise ValueError(f"model: 0-dim parameters {scalars} cannot be trained under DeepSpeed (its parameter "
                         f"broadcast views each parameter as bytes); give them shape [1]")
    ds_config = to_deepspeed_config(cfg, world, device)
    if adapt_config is not None:
        ds_config = adapt_config(ds_config)
    wrapper = TrainingLoss(model).to(device)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper,
        model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_scheduler_factory(cfg.optim, cfg.train.steps),
    )
    return engine


@contextlib.contextmanager
def full_parameters(engine) -> Iterator[nn.Module]:
    """The wrapped model with whole (gathered) parameters for reading: a no-op below ZeRO-3,
    ``deepspeed.zero.GatheredParameters`` at ZeRO-3."""
    module = engine.module.model
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


def grad_norm_before_step(engine) -> float | None:
    """Global L2 norm of the (already all-reduced) gradients at an accumulation boundary, for
    ZeRO 0 where DeepSpeed does not report it; None for ZeRO >= 1 (read
    ``engine.get_global_grad_norm()`` after ``step`` instead)."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:  # fp16 autocast: gradients are still multiplied by the loss scale here
        norm /= float(scaler.get_scale())
    return norm
