"""From a config to a ready-to-step engine, and one optimizer step: the one training path.

``launch/train.py`` -> :class:`sgfm_dist.train.trainer.Trainer` -> :func:`build_training` and
:func:`train_step`. The exact-step tests (``tests/distributed/test_exact_step.py``) call these
same two functions at every (dp, sp) and ZeRO stage and compare with one process.

:func:`build_training` does, in this order: seed the weights (identical on every rank), build
the model, create the ``dp x sp`` process mesh, ``parallelize`` (domain split, activation
checkpointing, ZeRO and batch sizes, in one place), copy the EMA, initialize the DeepSpeed
engine, and seed this dp group's noise generator.

Seeds: the weights start from ``train.seed`` on every rank (DeepSpeed also broadcasts rank
0's). The diffusion noise of a step comes from a generator seeded with
``train.seed * 1_000_003 + dp_rank``: the sp ranks of one dp group noise their shared samples
identically (the noise is drawn as the global field and sharded), different dp groups draw
different noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from sgfm_dist.parallel import runtime
from sgfm_dist.parallel.mesh import ProcessMesh
from sgfm_dist.parallel.parallelize import ParallelizeConfig, ParallelPlan, check_parallel_setup, parallelize
from sgfm_dist.train.batches import batch_counts
from sgfm_dist.train.config import Config
from sgfm_dist.train.ema import EMA
from sgfm_dist.train.engine import build_engine, deepspeed_config, full_parameters, grad_norm_before_step


def resolve_split_axes(model_cfg, parallel_cfg) -> tuple[int, ...]:
    """Tensor dims of ``[B, C, *S]`` split over the sp grid, from ``parallel.split_axes`` (field
    axes, 0 = t) or, when that is empty, automatically: t for text (a periodic flow axis: its
    spectral layers stay local); for video/physics the spatial axes (y for a slab, y and x for a
    pencil), because their d_t is a one-sided stencil (``model.time_derivative``) that reads the
    t axis whole. A split that cannot work is a ValueError naming the config keys."""
    grid = tuple(parallel_cfg.sp_grid) or (parallel_cfg.sp,)
    ndim = model_cfg.field_ndim
    names = {2: ("t", "x"), 3: ("t", "y", "x"), 4: ("t", "z", "y", "x")}.get(ndim, tuple(range(ndim)))
    if len(grid) > 1 and ndim < 3:
        raise ValueError(f"parallel.sp_grid: a pencil {list(grid)} needs a 3-D field; a {model_cfg.modality} field "
                         f"has {ndim} axes {names}: use a slab (parallel.sp_grid: [])")
    axes = tuple(parallel_cfg.split_axes)
    if not axes:
        axes = (0,) if model_cfg.modality == "text" else tuple(range(1, 1 + len(grid)))
    for a in axes:
        if a >= ndim:
            raise ValueError(f"parallel.split_axes: field axis {a} does not exist; a {model_cfg.modality} field "
                             f"has {ndim} axes {names}")
    # the time axis of video/physics (field axis 0, unless model.flow makes it a flow axis) takes
    # a non-periodic d_t when model.time_derivative is one-sided: such an axis cannot be split
    time_is_flow = 2 in model_cfg.flow_axes()
    if 0 in axes and not time_is_flow and str(model_cfg.time_derivative).startswith("one_sided"):
        raise ValueError(f"parallel.split_axes: {list(axes)} splits t, but model.time_derivative="
                         f"{model_cfg.time_derivative!r} is a one-sided stencil that reads t whole; split the spatial "
                         f"axes (parallel.split_axes: [] picks them) or use a periodic time derivative")
    return tuple(2 + a for a in axes)


def noise_generator(cfg: Config, dp_rank: int, device: str) -> torch.Generator:
    """The diffusion-noise generator of data-parallel group ``dp_rank`` (module docstring)."""
    return torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + dp_rank)


@dataclass
class Training:
    """Everything one rank steps: the model (inside the engine), the plan, the engine, the EMA."""

    model: nn.Module
    """The SGFM (parallelized in place; the engine wraps it)."""
    plan: ParallelPlan
    """Mesh, domain, batch accounting and DeepSpeed config (``parallelize``)."""
    engine: object
    """The DeepSpeed engine."""
    ema: EMA
    """Exponential moving average of the weights."""
    generator: torch.Generator
    """This dp group's diffusion noise."""
    n_params: int
    """Parameters of the model (counted before ZeRO-3 partitions them)."""
    rank: int
    world: int
    device: str


def build_training(cfg: Config, device: str, field_shape: tuple[int, ...], model: nn.Module | None = None) -> Training:
    """Model, mesh, ``parallelize`` and the DeepSpeed engine for ``cfg`` on this rank (the process
    group must exist: ``sgfm_dist.parallel.runtime.setup_distributed``). ``field_shape``: the
    extents of one whole sample's field (``sgfm_dist.train.batches.global_field_shape``).
    ``model``: an already built model to train instead of ``build_model(cfg)`` (same config)."""
    from sgfm_dist.model.sgfm import build_model

    rank, world = runtime.world()
    pc = cfg.parallel
    dp, sp = pc.mesh(world)
    split_axes = resolve_split_axes(cfg.model, pc)
    field_shape = tuple(int(n) for n in field_shape)
    # every rank raises the same error from the numbers alone, before any group or engine exists
    check_parallel_setup(world, dp, sp, field_shape, split_axes, cfg.model.wavelet, cfg.model.levels,
                         pc.zero_stage, pc.sp_grid)
    if model is None:
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model, cfg.diffusion)
    n_params = sum(p.numel() for p in model.parameters())
    mesh = ProcessMesh.create(dp=dp, sp=sp, sp_grid=pc.sp_grid)
    plan = parallelize(model, mesh, mesh.layout(field_shape, split_axes),
                       ParallelizeConfig(wavelet=cfg.model.wavelet, levels=cfg.model.levels,
                                         activation_checkpointing=pc.activation_checkpointing,
                                         zero_stage=pc.zero_stage, micro_batch=cfg.train.micro_batch,
                                         grad_accum=cfg.train.grad_accum),
                       ds_config=deepspeed_config(cfg, device))
    # the EMA copies the full weights now: under ZeRO-3 the engine partitions them
    ema = EMA(model.to(device), cfg.train.ema_decay, cfg.train.ema_warmup)
    engine = build_engine(model, plan.ds_config, cfg.optim, cfg.train.steps, device)
    return Training(model=model, plan=plan, engine=engine, ema=ema,
                    generator=noise_generator(cfg, plan.dp_rank, device), n_params=n_params, rank=rank,
                    world=world, device=device)


@dataclass
class StepResult:
    """One optimizer step as this rank saw it (losses unscaled, averaged over micro-batches)."""

    losses: dict[str, float]
    """``total`` and each loss term, mean over the step's micro-batches."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when DeepSpeed reports none)."""
    cells: float
    """Field cells of this rank's whole (unsharded) batches."""
    tokens: float
    """Real text tokens of those batches (0 for video/physics)."""


def train_step(t: Training, micro_batches: Iterable[dict]) -> StepResult:
    """One optimizer step: for each of the ``grad_accum`` micro-batches (this dp group's whole
    samples, on the device) shard it to this rank's block, forward through the engine, back-
    propagate the mesh-scaled loss, ``engine.step()``; then update the EMA."""
    engine, plan = t.engine, t.plan
    accum = plan.accounting.grad_accum
    sums: dict[str, float] = {}
    cells = tokens = 0.0
    grad_norm = None
    engine.train()
    for whole in micro_batches:
        batch = plan.shard(whole)  # this rank's block of the field
        loss, terms = engine(batch, generator=t.generator)
        # a global mean replicated over sp, scaled so that DeepSpeed's mean over all dp x sp
        # ranks equals the single-process gradient (parallel/batch.py)
        engine.backward(plan.backward_loss(loss))
        if engine.is_gradient_accumulation_boundary():
            grad_norm = grad_norm_before_step(engine)
        engine.step()
        sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / accum
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
        c, n = batch_counts(whole)
        cells += c
        tokens += n
    if grad_norm is None:
        g = engine.get_global_grad_norm()
        grad_norm = float(g) if g is not None else float("nan")
    with full_parameters(engine) as module:
        t.ema.update(module.state_dict().items())
    return StepResult(losses=sums, grad_norm=grad_norm, cells=cells, tokens=tokens)
