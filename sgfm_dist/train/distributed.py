"""Training on a ``dp x sp`` mesh: batch sharding, sp-aware loss reduction, DeepSpeed wiring
and true batch accounting.

Gradient convention (proved by ``tests/distributed/test_exact_step.py``)
------------------------------------------------------------------------
Every rank of an sp group computes the *same* replicated scalar loss of its sample(s): the
global mean over the whole field, formed with ``domain.sum`` (an all-reduce whose backward is
the identity, see ``sgfm_dist/parallel/collectives.py``). Backward on one rank then yields
only that rank's share of the single-device gradient; the halo and FFT backwards add the
cross-rank parts, so the sum over the sp ranks of their parameter gradients is the
single-device gradient ``g`` of that group's loss.

DeepSpeed is given **all** ``dp * sp`` ranks as its data-parallel world (no ``mesh_param``:
on DeepSpeed 0.19.8 that is exact only for ZeRO-3) and averages gradients over them. Each
rank back-propagates ``sp * loss`` (:func:`backward_scale`), so the average is::

    1/(dp sp) * sum_dp sum_sp sp * share = 1/dp * sum_dp g_dp

the dp-average of the global-mean gradient, i.e. the single-process gradient of the mean
loss over the global batch, for ZeRO stages 0-3 (ZeRO partitions over all ranks, the
reduce-scatter is the same average). Reported losses stay unscaled.

Batch accounting: DeepSpeed checks ``train_batch_size == micro * accum * world``, counting
the sp ranks as if they held different samples; the true global batch is
``micro * accum * dp`` (:class:`BatchAccounting`), which is what logs report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

TOKEN_KEYS = ("tokens", "pad_mask")
"""Text batch entries laid out ``[B, T, L]`` (field axes without a channel dim)."""
FIELD_KEYS = ("field",)
"""Video / physics batch entries laid out ``[B, C, *S]``."""


@dataclass(frozen=True)
class BatchAccounting:
    """Batch sizes of one optimizer step on a ``dp x sp`` mesh."""

    micro_batch: int
    """Samples per data-parallel group per forward (every sp rank of a group holds a block of each)."""
    grad_accum: int
    """Micro-batches accumulated before one optimizer step."""
    dp: int
    """Data-parallel groups (different samples)."""
    sp: int
    """Ranks that share each sample (domain split)."""

    def __post_init__(self):
        for name in ("micro_batch", "grad_accum", "dp", "sp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BatchAccounting.{name}: must be a positive int, got {v!r}")

    @property
    def global_batch(self) -> int:
        """True samples per optimizer step: micro x accum x dp (sp ranks share samples)."""
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def deepspeed_train_batch_size(self) -> int:
        """What DeepSpeed's ``train_batch_size`` must say: it counts every rank as data-parallel."""
        return self.micro_batch * self.grad_accum * self.dp * self.sp


def backward_scale(sp: int) -> float:
    """Factor on the replicated loss before ``backward`` so that DeepSpeed's average over all
    ``dp * sp`` ranks equals the dp-average of the single-device gradient (module docstring)."""
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise ValueError(f"sp: must be a positive int, got {sp!r}")
    return float(sp)


def global_mean(local_sum: Tensor, local_count: Tensor | float, domain) -> Tensor:
    """Mean over the whole (possibly split) field from this rank's sum and count of cells.

    ``sum_r local_sum_r / sum_r local_count_r`` over the sp ranks (replicated result). This is
    the single-device mean whatever the blocks' sizes; the mean of the per-rank means equals it
    only when every rank holds the same number of cells."""
    count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device)
    if count.shape != local_sum.shape:
        count = count.expand_as(local_sum).clone()
    total = domain.sum(count)
    if bool((total <= 0).any()):
        raise ValueError(f"global_mean: the cell count over all ranks is {total.tolist()}; nothing to average")
    return domain.sum(local_sum) / total


def shard_batch(batch: dict, domain) -> dict:
    """This rank's block of every field-shaped entry of a batch that all sp ranks of a group
    read whole (``tokens`` / ``pad_mask`` ``[B, T, L]``, ``field`` ``[B, C, *S]``); other entries
    (per-sample scalars, metadata) are kept as they are."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
    if not getattr(domain, "is_split", False):
        return batch
    want = tuple(domain.layout.global_extents)
    for key in TOKEN_KEYS + FIELD_KEYS:
        x = batch.get(key)
        if isinstance(x, Tensor) and tuple(x.shape[x.ndim - len(want):]) != want:
            # a batch of another shape would be cut into blocks of the wrong field
            raise ValueError(f"batch[{key!r}]: field extents {tuple(x.shape[x.ndim - len(want):])} (shape "
                             f"{tuple(x.shape)}) differ from the extents {want} the model was split for")
    out = dict(batch)
    for key in TOKEN_KEYS:
        if key in batch and isinstance(batch[key], Tensor):
            x = batch[key]
            if x.ndim != 3:
                raise ValueError(f"batch[{key!r}]: expected [B, T, L], got shape {tuple(x.shape)}")
            out[key] = domain.shard(x.unsqueeze(1))[:, 0].contiguous()  # [B, T_loc, L_loc]
    for key in FIELD_KEYS:
        if key in batch and isinstance(batch[key], Tensor):
            out[key] = domain.shard(batch[key]).contiguous()  # [B, C, *S_loc]
    return out


def deepspeed_config_for_mesh(ds_config: dict, accounting: BatchAccounting) -> dict:
    """A copy of ``ds_config`` whose batch sizes match DeepSpeed's view of the mesh (every one of
    the ``dp * sp`` ranks a data-parallel replica, no ``mesh_param``), checked."""
    if not isinstance(ds_config, dict):
        raise ValueError(f"ds_config: expected a dict, got {type(ds_config).__name__}")
    out = dict(ds_config)
    micro = out.get("train_micro_batch_size_per_gpu", accounting.micro_batch)
    accum = out.get("gradient_accumulation_steps", accounting.grad_accum)
    if (micro, accum) != (accounting.micro_batch, accounting.grad_accum):
        raise ValueError(f"ds_config: train_micro_batch_size_per_gpu={micro} / gradient_accumulation_steps={accum} "
                         f"disagree with the accounting's micro_batch={accounting.micro_batch} / "
                         f"grad_accum={accounting.grad_accum}")
    if "mesh_param" in out:
        raise ValueError("ds_config: 'mesh_param' must not be set; the dp x sp mesh is handled by giving DeepSpeed "
                         "all ranks as data-parallel world (exact for ZeRO 0-3; mesh_param is exact only for ZeRO-3 "
                         "on DeepSpeed 0.19.8)")
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ds_config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    out["train_micro_batch_size_per_gpu"] = accounting.micro_batch
    out["gradient_accumulation_steps"] = accounting.grad_accum
    out["train_batch_size"] = accounting.deepspeed_train_batch_size
    return out


def initialize_engine(module: torch.nn.Module, ds_config: dict, accounting: BatchAccounting, optimizer=None,
                      lr_scheduler=None):
    """``deepspeed.initialize`` of ``module`` on the whole world with the mesh-corrected config.

    Checks the world size against the accounting first, so a wrong mesh fails before any
    engine state exists. Returns the engine."""
    import deepspeed
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if accounting.dp * accounting.sp != world:
        raise ValueError(f"mesh: dp x sp = {accounting.dp} x {accounting.sp} = {accounting.dp * accounting.sp} "
                         f"ranks, but the world size is {world}")
    config = deepspeed_config_for_mesh(ds_config, accounting)
    kwargs = {}
    if optimizer is not None:
        kwargs["optimizer"] = optimizer
    else:
        kwargs["model_parameters"] = [p for p in module.parameters() if p.requires_grad]
    if lr_scheduler is not None:
        kwargs["lr_scheduler"] = lr_scheduler
    engine, _, _, _ = deepspeed.initialize(model=module, config=config, **kwargs)
    logger.info("deepspeed: ZeRO-%d over all %d ranks (dp %d x sp %d), train_batch_size %d for DeepSpeed, "
                "true global batch %d", config.get("zero_optimization", {}).get("stage", 0), world, accounting.dp,
                accounting.sp, accounting.deepspeed_train_batch_size, accounting.global_batch)
    return engine


def resolve_split_axes(model_cfg, parallel_cfg) -> tuple[int, ...]:
    """Tensor dims of ``[B, C, *S]`` split over the sp grid, from ``parallel.split_axes`` (field
    axes, 0 = t) or, when that is empty, automatically: t for text (a periodic flow axis: its
    spectral layers stay local); for video/physics the spatial axes (y for a slab, y and x for a
    pencil), because their d_t is a one-sided stencil (``model.time_derivative``) that reads the
    t axis whole. A split that cannot work is a ValueError naming the config keys."""
    grid = tuple(parallel_cfg.sp_grid) or (parallel_cfg.sp,)
    ndim = model_cfg.field_ndim
    names = ("t", "x") if ndim == 2 else ("t", "y", "x")
    if len(grid) > 1 and ndim != 3:
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


@dataclass
class MeshTraining:
    """What a trainer needs to run on the dp x sp mesh (built by :func:`setup_mesh_training`)."""

    mesh: object
    """The ``ProcessMesh`` (dp groups, sp groups)."""
    domain: object
    """The domain now in the model (``SplitDomain`` when sp > 1, else ``LOCAL``)."""
    accounting: BatchAccounting
    """True and DeepSpeed batch sizes."""
    checkpointed_blocks: int
    """Residual blocks recomputed in backward."""

    @property
    def dp(self) -> int:
        return self.mesh.dp

    @property
    def sp(self) -> int:
        return self.mesh.sp

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank

    def shard(self, batch: dict) -> dict:
        """This rank's block of a batch read whole by every sp rank of the group."""
        return shard_batch(batch, self.domain)

    def backward_loss(self, loss: Tensor) -> Tensor:
        """The tensor to back-propagate (``sp * loss``, see the module docstring)."""
        return loss * backward_scale(self.mesh.sp)

    def deepspeed_config(self, ds_config: dict) -> dict:
        """``ds_config`` with DeepSpeed's batch sizes for this mesh."""
        return deepspeed_config_for_mesh(ds_config, self.accounting)


def setup_mesh_training(model, world_size: int, dp: int, sp: int, field_shape, wavelet: str, levels: int,
                        zero_stage: int, micro_batch: int, grad_accum: int, activation_checkpointing: bool = False,
                        split_axes=(2,), sp_grid=()) -> MeshTraining:
    """Check the dp x sp setup from its numbers (every rank raises the same ValueError before any
    step), build the process mesh and ``parallelize`` ``model`` in place. ``split_axes``: tensor
    dims (:func:`resolve_split_axes`), one per dim of ``sp_grid`` (``()`` = a slab of ``sp``)."""
    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.parallel.parallelize import ParallelizeConfig, check_parallel_setup, parallelize

    field_shape = tuple(int(n) for n in field_shape)
    dp, sp = check_parallel_setup(world_size, dp, sp, field_shape, split_axes, wavelet, levels, zero_stage, sp_grid)
    accounting = BatchAccounting(micro_batch, grad_accum, dp, sp)
    mesh = ProcessMesh.create(dp=dp, sp=sp, sp_grid=sp_grid)
    plan = parallelize(model, mesh, mesh.layout(field_shape, tuple(split_axes)),
                       ParallelizeConfig(wavelet=wavelet, levels=levels,
                                         activation_checkpointing=bool(activation_checkpointing),
                                         zero_stage=zero_stage))
    logger.info("mesh: %s; true global batch %d", mesh.describe(), accounting.global_batch)
    return MeshTraining(mesh=mesh, domain=plan.domain, accounting=accounting,
                        checkpointed_blocks=plan.checkpointed_blocks)


def setup_split_sampling(model, world_size: int, sp: int, field_shape, wavelet: str, levels: int,
                         split_axes=(2,), sp_grid=()):
    """Split ``model`` over all ``world_size`` ranks (``sp`` must equal it) for sampling one field
    of global ``field_shape``; returns the domain (``generate`` then draws its noise globally and
    shards it, so the samples equal the single-process ones for the same seed). Every sp rank
    must call ``generate`` with identically seeded generators. Checked from numbers first."""
    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.parallel.parallelize import ParallelizeConfig, check_parallel_setup, parallelize

    if sp != world_size:
        # dp groups would each draw the whole ensemble again (the noise of member i depends on
        # the ensemble size, so it cannot be dealt out over groups without changing the samples)
        raise ValueError(f"sp: sampling splits one field over all ranks; got sp={sp} on {world_size} processes "
                         f"(launch {sp} processes, or pass --sp {world_size})")
    field_shape = tuple(int(n) for n in field_shape)
    check_parallel_setup(world_size, 1, sp, field_shape, split_axes, wavelet, levels, 0, sp_grid)
    mesh = ProcessMesh.create(dp=1, sp=sp, sp_grid=sp_grid)
    plan = parallelize(model, mesh, mesh.layout(field_shape, tuple(split_axes)),
                       ParallelizeConfig(wavelet=wavelet, levels=levels))
    return plan.domain
