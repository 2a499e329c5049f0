"""``parallelize``: the one step that turns a single-device SGFM into its dp x sp form
(torchtitan's ``parallelize_llama`` style: ``apply_*`` functions in turn, each logging what
it did; the model itself never branches on distribution).

    mesh = ProcessMesh.create(sp=cfg.parallel.sp)
    layout = mesh.layout(field_shape, split_axes=(2,))        # slab along t
    plan = parallelize(model, mesh, layout, ParallelizeConfig(wavelet=..., levels=..., ...))
    batch = shard_batch(batch, plan.domain)                    # sgfm_dist.train.distributed

* :func:`apply_domain_split`: checks the split against the wavelet levels (every local
  extent divisible by ``2**levels``, halos no wider than a neighbour's block), builds the
  :class:`SplitDomain` and swaps it into every layer (``model.set_domain``): halo-padded
  convolutions, distributed spectral layers, distributed DWT, projection and reductions.
* :func:`apply_activation_checkpointing`: recomputes each residual block (every entry of an
  ``nn.ModuleList`` named ``blocks``) in backward.
* :func:`apply_zero`: the DeepSpeed side: ZeRO stage over all ``dp * sp`` ranks, batch sizes
  as DeepSpeed counts them (see ``sgfm_dist/train/distributed.py`` for why this is exact).

Everything here is checked before any step runs, with errors naming the numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from .domain import SplitDomain
from .mesh import FieldLayout, ProcessMesh
from .wavelets import check_dwt_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelizeConfig:
    """What ``parallelize`` applies."""

    wavelet: str = "db4"
    """The model's wavelet (``model.wavelet``): its filter reach sets the halo per level."""
    levels: int = 2
    """The model's wavelet levels (``model.levels``): local extents must divide by ``2**levels``."""
    activation_checkpointing: bool = False
    """Recompute each residual block in backward instead of storing its activations."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0 off, 1 optimizer state, 2 + gradients, 3 + parameters), over all ranks."""

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels: must be a positive int, got {self.levels!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing: must be a bool, got {self.activation_checkpointing!r}")


@dataclass
class ParallelPlan:
    """What ``parallelize`` did (the engine and trainer read it)."""

    domain: object
    """The domain now in the model: a ``SplitDomain`` (sp > 1) or ``LOCAL``."""
    checkpointed_blocks: int
    """Residual blocks recomputed in backward (0 when off)."""
    zero_stage: int
    """ZeRO stage the engine must use."""
    dp: int
    """Data-parallel groups."""
    sp: int
    """Ranks per sample."""


def check_parallel_setup(world_size: int, dp: int, sp: int, field_shape: Sequence[int], split_axes: Sequence[int],
                         wavelet: str, levels: int, zero_stage: int, sp_grid: Sequence[int] = ()) -> tuple[int, int]:
    """Everything about a dp x sp run that can be wrong, checked from numbers alone (no process
    group): the mesh against the world size, the field's split over the sp grid against the
    wavelet levels on *every* sp rank's block, the ZeRO stage. Every rank raises the same
    ValueError, naming the numbers, before any step. Returns the resolved ``(dp, sp)``."""
    from .mesh import MeshConfig

    dp, sp, grid = MeshConfig(dp=dp, sp=sp, sp_grid=tuple(sp_grid)).resolve(world_size)
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage!r}")
    split_axes = tuple(split_axes)
    if len(split_axes) != len(grid):
        raise ValueError(f"split_axes: {split_axes} names {len(split_axes)} axes but the sp grid {grid} has "
                         f"{len(grid)} dims (sp = {sp})")
    # the DWT check looks at every rank's block, so rank 0's layout speaks for all
    layout = FieldLayout(tuple(int(n) for n in field_shape), split_axes, grid, (0,) * len(grid))
    check_dwt_split(layout, wavelet, levels)
    return dp, sp


def apply_domain_split(model: nn.Module, mesh: ProcessMesh, layout: FieldLayout, wavelet: str, levels: int):
    """Swap a :class:`SplitDomain` of ``layout`` into every layer of ``model`` (after checking the
    split fits ``levels`` levels of ``wavelet``); with one sp rank the model keeps ``LOCAL``.
    Returns the domain in use."""
    from ..ops.domain import LOCAL

    if tuple(layout.ranks) != tuple(mesh.sp_grid):
        raise ValueError(f"layout: splits over {layout.ranks} ranks per axis but the mesh's sp_grid is "
                         f"{mesh.sp_grid} (sp = {mesh.sp})")
    check_dwt_split(layout, wavelet, levels)
    if mesh.sp == 1:
        model.set_domain(LOCAL)
        logger.info("domain split: sp = 1, the field stays whole on each rank (LocalDomain)")
        return LOCAL
    domain = SplitDomain(mesh, layout)
    model.set_domain(domain)
    logger.info("domain split: field %s split on dims %s over %s ranks; this rank holds %s",
                layout.global_extents, layout.split_axes, layout.ranks, layout.local_extents)
    return domain


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every residual block of the score and forcing networks in backward
    (``torch.utils.checkpoint``, non-reentrant, so halo/FFT communication simply runs again in
    the recomputation). Returns the number of blocks; a model without blocks is a ValueError."""
    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "blocks":
            for block in mod:
                if getattr(block, "_sgfm_checkpointed", False):
                    continue
                plain = block.forward

                def ckpt_forward(*args, _f=plain, **kwargs):
                    import torch

                    if torch.is_grad_enabled():
                        return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                    return _f(*args, **kwargs)

                block.forward = ckpt_forward
                block._sgfm_checkpointed = True
                wrapped += 1
    if wrapped == 0 and not any(getattr(m, "_sgfm_checkpointed", False) for m in model.modules()):
        raise ValueError("activation_checkpointing: the model has no nn.ModuleList named 'blocks' to checkpoint")
    logger.info("activation checkpointing: %d residual blocks recomputed in backward", wrapped)
    return wrapped


def apply_zero(ds_config: dict, mesh: ProcessMesh, micro_batch: int, grad_accum: int, zero_stage: int) -> dict:
    """The DeepSpeed config for ZeRO ``zero_stage`` on ``mesh``: stage set, batch sizes as
    DeepSpeed counts them (all ``dp * sp`` ranks data-parallel). Returns a new dict."""
    from ..train.distributed import BatchAccounting, deepspeed_config_for_mesh

    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage!r}")
    acc = BatchAccounting(micro_batch, grad_accum, mesh.dp, mesh.sp)
    cfg = dict(ds_config)
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": zero_stage}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg = deepspeed_config_for_mesh(cfg, acc)
    sharded = {0: "nothing", 1: "optimizer state", 2: "optimizer state and gradients",
               3: "optimizer state, gradients and parameters"}[zero_stage]
    logger.info("ZeRO-%d: %s sharded over all %d ranks (dp %d x sp %d); DeepSpeed train_batch_size %d, "
                "true global batch %d", zero_stage, sharded, mesh.world_size, mesh.dp, mesh.sp,
                acc.deepspeed_train_batch_size, acc.global_batch)
    return cfg


def parallelize(model: nn.Module, mesh: ProcessMesh, layout: FieldLayout, cfg: ParallelizeConfig) -> ParallelPlan:
    """Apply the domain split and activation checkpointing to ``model`` in place; return the plan
    (the engine then uses ``apply_zero`` with ``plan.zero_stage``)."""
    if not isinstance(cfg, ParallelizeConfig):
        raise ValueError(f"cfg: expected a ParallelizeConfig, got {type(cfg).__name__}")
    domain = apply_domain_split(model, mesh, layout, cfg.wavelet, cfg.levels)
    n = apply_activation_checkpointing(model) if cfg.activation_checkpointing else 0
    return ParallelPlan(domain=domain, checkpointed_blocks=n, zero_stage=cfg.zero_stage, dp=mesh.dp, sp=mesh.sp)
