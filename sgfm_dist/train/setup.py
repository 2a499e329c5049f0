"""From a config to a ready-to-step engine, and one optimizer step: the one training path.

``launch/train.py`` -> :class:`sgfm_dist.train.trainer.Trainer` -> :func:`build_training` and
:func:`train_step`. The exact-step tests (``tests/distributed/test_exact_step.py``) call these
same two functions at every (dp, sp) and ZeRO stage and compare with one process.

:func:`build_training` does, in this order: seed the weights (identical on every rank), build
the model, create the ``dp x sp`` process mesh, ``parallelize`` (domain split, activation
checkpointing, ZeRO and batch sizes, in one place), copy the EMA, initialize the DeepSpeed
engine.

Seeds: the weights start from ``train.seed`` on every rank (DeepSpeed also broadcasts rank
0's). Every random draw of a step is a function of (``train.seed``, global step, global sample
index) (:func:`step_draws`, ``sgfm_dist/ops/draws.py``): step ``s`` trains on the global batch
at global sample indices ``[s G, (s + 1) G)`` and dp group ``r`` holds the contiguous positions
``[r G / dp, (r + 1) G / dp)`` of it, micro-batch after micro-batch (the order of
``sgfm_dist/data/stream.py``). The sp ranks of a group draw their shared samples identically (the
noise is drawn as each sample's global field and sharded). Nothing depends on dp, sp or the
DataLoader workers, so a run resumed onto another (dp, sp) draws what an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from sgfm_dist.ops.draws import SampleDraws
from sgfm_dist.parallel import runtime
from sgfm_dist.parallel.mesh import ProcessMesh
from sgfm_dist.parallel.parallelize import ParallelizeConfig, ParallelPlan, check_parallel_setup, parallelize
from sgfm_dist.train.batches import batch_counts
from sgfm_dist.train.config import Config
from sgfm_dist.train.ema import EMA, ShardedEMA
from sgfm_dist.train.engine import build_engine, deepspeed_config, full_parameters, grad_norm_before_step


def resolve_split_axes(model_cfg, parallel_cfg) -> tuple[int, ...]:
    """Tensor dims of ``[B, C, *S]`` split over the sp grid, from ``parallel.split_axes`` (field
    axes, 0 = t) or, when that is empty, automatically: t for text and time series (a periodic
    flow axis: its spectral layers stay local); for video/physics the spatial axes (y for a slab, y and x for a
    pencil), because their d_t is a one-sided stencil (``model.time_derivative``) that reads the
    t axis whole. A split that cannot work is a ValueError naming the config keys."""
    grid = tuple(parallel_cfg.sp_grid) or (parallel_cfg.sp,)
    ndim = model_cfg.field_ndim
    names = model_cfg.layout.axes
    if len(grid) > 1 and ndim < 3:
        raise ValueError(f"parallel.sp_grid: a pencil {list(grid)} needs a 3-D field; a {model_cfg.modality} field "
                         f"has {ndim} axes {names}: use a slab (parallel.sp_grid: [])")
    axes = tuple(parallel_cfg.split_axes)
    if not axes:
        # t where the layout makes it a flow axis (text, time series), else the spatial axes
        axes = (0,) if model_cfg.layout.flow == "all" else tuple(range(1, 1 + len(grid)))
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


def step_draws(seed: int, step: int, first: int, count: int, global_batch: int, device: str) -> SampleDraws:
    """The random draws of the ``count`` samples at positions ``first ..`` of global step ``step``
    (module docstring): what one micro-batch of :func:`train_step` uses."""
    return SampleDraws.contiguous(seed, step, first, count, global_batch, device)


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
    """Exponential moving average of the weights (:class:`ShardedEMA` under ZeRO-3)."""
    seed: int
    """``train.seed``: with the global step and sample index, it fixes every draw (:func:`step_draws`)."""
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
                                         grad_accum=cfg.train.grad_accum, compile=cfg.train.compile),
                       ds_config=deepspeed_config(cfg, device))
    # the EMA copies the full weights now: under ZeRO-3 the engine partitions them
    ema = EMA(model.to(device), cfg.train.ema_decay, cfg.train.ema_warmup)
    engine = build_engine(model, plan.ds_config, cfg.optim, cfg.train.steps, device)
    if engine.zero_optimization_stage() == 3:
        # keep only this rank's partition of the EMA, like the parameters (ema.py)
        ema = ShardedEMA(engine.module.model, ema)
    return Training(model=model, plan=plan, engine=engine, ema=ema,
                    seed=cfg.train.seed, n_params=n_params, rank=rank,
                    world=world, device=device)


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, Tensor):
            return int(v.shape[0])
    raise ValueError(f"train_step: a micro-batch without tensors (keys {sorted(batch)})")


@dataclass
class StepResult:
    """One optimizer step as this rank saw it (losses unscaled, averaged over micro-batches)."""

    losses: dict[str, float]
    """``total`` and each loss term, mean over the step's micro-batches."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when DeepSpeed reports none; NaN or inf on a
    skipped step)."""
    cells: float
    """Field cells of this rank's whole (unsharded) batches."""
    tokens: float
    """Real text tokens of those batches (0 for video/physics)."""
    skipped: bool = False
    """The step had a non-finite loss (on any rank) or gradient and changed nothing: no
    parameter, optimizer-moment or EMA update. The same on every rank."""


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: the ``inject="grad"`` test hook (a finite loss whose
    gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def _inject(loss: Tensor, kind: str | None) -> Tensor:
    """Test hook (``SGFM_NAN_AT``): ``"loss"`` makes the loss NaN, ``"inf"`` +inf, ``"grad"`` keeps
    the loss and makes its gradient NaN."""
    if kind is None:
        return loss
    if kind == "grad":
        return _NanGradient.apply(loss)
    return loss + float("nan" if kind == "loss" else "inf")


def _skip_zero0_update(engine, bad_local: bool) -> bool:
    """ZeRO 0 (DeepSpeed hands the step to torch's AdamW, which has no overflow check): agree on
    ``bad_local`` over all ranks and, when any rank has it, drop the gradients, so the coming
    ``engine.step()`` updates nothing (AdamW skips parameters without a gradient) while
    DeepSpeed's step counters and the LR schedule advance as on any step. Returns the agreed flag."""
    bad = runtime.all_agree(bad_local)
    if bad and getattr(engine, "torch_autocast_z0_gradscaler", None) is None:
        # (fp16's GradScaler needs the gradients: its own inf check skips the update instead)
        for p in engine.module.parameters():
            p.grad = None
    return bad


@contextlib.contextmanager
def _clipping_off(engine, off: bool):
    """DeepSpeed's ZeRO-0 gradient clipping fails on a model without any gradient (an empty
    parameter list); a skipped step has none, and nothing to clip."""
    saved = engine._config.gradient_clipping
    if off:
        engine._config.gradient_clipping = 0.0
    try:
        yield
    finally:
        engine._config.gradient_clipping = saved


def train_step(t: Training, micro_batches: Iterable[dict], inject: str | None = None,
               step: int | None = None) -> StepResult:
    """One optimizer step: for each of the ``grad_accum`` micro-batches (this dp group's whole
    samples, on the device) shard it to this rank's block, forward through the engine with the
    draws of its samples (:func:`step_draws`: global step ``step``, default the engine's step
    count; micro-batch ``i`` of dp group ``r`` holds global-batch positions ``r * micro_batch *
    grad_accum + i * micro_batch ..``), back-propagate the mesh-scaled loss, ``engine.step()``;
    then update the EMA.

    A non-finite loss or gradient skips the step on every rank together (``StepResult.skipped``):
    the parameters, the optimizer state and the EMA stay as they were; the batch, the noise
    draws and the LR-schedule slot of the step are used up as on any step, so what follows does
    not depend on whether a step was skipped. How all ranks agree without an extra collective
    under ZeRO >= 1: a rank whose loss is not finite back-propagates it times NaN, so the
    reduced gradient is NaN on every rank; DeepSpeed's ZeRO optimizers then find a non-finite
    global norm (all-reduced) and skip the update themselves. ZeRO 0 checks the (already
    reduced) gradient norm plus the loss flag in one all-reduce of a scalar before ``step``.
    ``inject``: test hook, see :func:`_inject`."""
    engine, plan = t.engine, t.plan
    accum = plan.accounting.grad_accum
    zero0 = engine.zero_optimization_stage() == 0
    sums: dict[str, float] = {}
    cells = tokens = 0.0
    grad_norm = None
    loss_finite = True
    bad_zero0 = False
    engine.train()
    step = int(engine.global_steps) if step is None else int(step)
    acc = plan.accounting
    first = plan.dp_rank * acc.micro_batch * acc.grad_accum  # this dp group's slice of the global batch
    for whole in micro_batches:
        n = _batch_size(whole)
        draws = step_draws(t.seed, step, first, n, acc.global_batch, t.device)
        first += n
        batch = plan.shard(whole)  # this rank's block of the field
        loss, terms = engine(batch, generator=draws)
        loss = _inject(loss, inject)
        # a global mean replicated over sp, scaled so that DeepSpeed's mean over all dp x sp
        # ranks equals the single-process gradient (parallel/batch.py)
        backward = plan.backward_loss(loss)
        value = float(loss.detach())
        if not math.isfinite(value):
            loss_finite = False
            backward = backward * float("nan")  # poison the reduced gradient on every rank (docstring)
        engine.backward(backward)
        if engine.is_gradient_accumulation_boundary():
            grad_norm = grad_norm_before_step(engine)
            if zero0:
                # under fp16 an inf gradient is a loss-scale overflow, not a bad step: the
                # GradScaler skips that update and lowers the scale itself
                grads_bad = not math.isfinite(grad_norm) and getattr(engine, "torch_autocast_z0_gradscaler",
                                                                     None) is None
                bad_zero0 = _skip_zero0_update(engine, not loss_finite or grads_bad)
        with _clipping_off(engine, bad_zero0):
            engine.step()
        sums["total"] = sums.get("total", 0.0) + value / accum
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) / accum
        c, n = batch_counts(whole)
        cells += c
        tokens += n
    if grad_norm is None:
        g = engine.get_global_grad_norm()
        grad_norm = float(g) if g is not None else float("nan")
    skipped = bad_zero0 if zero0 else not engine.was_step_applied()
    if skipped:
        if not zero0 and engine.lr_scheduler is not None:
            # DeepSpeed does not advance the schedule on a step its optimizer skipped; we do,
            # so the LR stays a function of the step number (as under ZeRO 0)
            engine.lr_scheduler.step()
        return StepResult(losses=sums, grad_norm=grad_norm, cells=cells, tokens=tokens, skipped=True)
    if isinstance(t.ema, ShardedEMA):  # ZeRO-3: from this rank's partitions, no gather
        t.ema.update_from_partitions(engine.module.model)
    else:
        with full_parameters(engine) as module:
            t.ema.update(module.state_dict().items())
    return StepResult(losses=sums, grad_norm=grad_norm, cells=cells, tokens=tokens)
