"""The DeepSpeed engine around an SGFM model: its config (optimizer, precision, clipping), the
LR schedule, and the full-weight view the EMA and evaluation need.

ZeRO and the batch sizes of the dp x sp mesh are not set here: ``parallelize``
(``sgfm_dist/parallel/parallelize.py``) completes the config this module starts
(:func:`deepspeed_config`), and :func:`build_engine` initializes DeepSpeed with the result.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from sgfm_dist.train.config import Config, OptimConfig, effective_precision
from sgfm_dist.train.schedule import lr_scheduler_factory


def resolve_device(choice: str) -> str:
    """"cpu" or "cuda" for ``train.device`` (``auto`` = CUDA when available)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but torch.cuda.is_available() is False")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def deepspeed_config(cfg: Config, device: str) -> dict:
    """The DeepSpeed config of ``cfg`` on ``device`` ("cpu"/"cuda") before ``parallelize`` adds the
    ZeRO stage and the mesh's batch sizes.

    The LR schedule is not in here: :func:`build_engine` passes its own warmup+cosine ``LambdaLR``
    (``sgfm_dist.train.schedule``) to ``deepspeed.initialize``, which steps it once per optimizer
    step and saves it with the checkpoint.
    """
    o = cfg.optim
    on_gpu = device == "cuda"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW instead of DeepSpeed's (Fused/CPU)Adam: nothing to JIT-compile.
                "torch_adam": not (on_gpu and o.fused_adam),
            },
        },
        "steps_per_print": 10**9,  # our own logging; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if effective_precision(cfg, device) != "fp32":
        # torch.autocast inside the engine's forward, parameters and optimizer stay fp32:
        # only Linear/Conv run in half precision, the FFT/wavelet math keeps its fp32 inputs
        # (torch.fft has no bf16 kernels), and float batches need no casting.
        ds["torch_autocast"] = {"enabled": True,
                                "dtype": "bfloat16" if effective_precision(cfg, device) == "bf16" else "float16"}
    return ds


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


def build_engine(model: nn.Module, ds_config: dict, optim: OptimConfig, total_steps: int, device: str):
    """``deepspeed.initialize`` on ``TrainingLoss(model)`` with ``ds_config`` (completed by
    ``parallelize``: ZeRO stage, batch sizes) and the warmup+cosine LambdaLR of ``optim`` over
    ``total_steps``. Returns the engine."""
    import deepspeed

    scalars = [n for n, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        # DeepSpeed 0.19.8 broadcasts every parameter as `p.data.view(torch.uint8)` at
        # initialize, which fails on 0-dim tensors ("self.dim() cannot be 0 to view Float as Byte").
        raise ValueError(f"model: 0-dim parameters {scalars} cannot be trained under DeepSpeed (its parameter "
                         f"broadcast views each parameter as bytes); give them shape [1]")
    wrapper = TrainingLoss(model).to(device)
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper,
        model_parameters=[p for p in wrapper.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_scheduler_factory(optim, total_steps),
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
