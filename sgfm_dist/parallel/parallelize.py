"""``parallelize``: the one step that turns a single-device SGFM into its dp x sp form
(torchtitan's ``parallelize_llama`` style: ``apply_*`` functions in turn, each logging what
it did; the model itself never branches on distribution).

    mesh = ProcessMesh.create(dp=-1, sp=cfg.parallel.sp)
    layout = mesh.layout(field_shape, split_axes=(2,))        # slab along t
    plan = parallelize(model, mesh, layout, ParallelizeConfig(wavelet=..., levels=..., zero_stage=...,
                                                               micro_batch=..., grad_accum=...),
                       ds_config=base_deepspeed_config)
    engine = deepspeed.initialize(model, config=plan.ds_config, ...)
    loss = engine(plan.shard(batch)); engine.backward(plan.backward_loss(loss))

* :func:`apply_domain_split`: checks the split against the wavelet levels (every local
  extent divisible by ``2**levels``, halos no wider than a neighbour's block), builds the
  :class:`SplitDomain` and swaps it into every layer (``model.set_domain``): halo-padded
  convolutions, distributed spectral layers, distributed DWT, projection and reductions.
  With one sp rank the model keeps the ``LocalDomain``.
* :func:`apply_activation_checkpointing`: recomputes each residual block (every entry of an
  ``nn.ModuleList`` named ``blocks``) in backward.
* :func:`apply_compile`: ``torch.compile`` of the score and forcing networks (the transformer
  baseline: of each block), in place, so parameters and checkpoint keys stay the eager ones.
* :func:`apply_zero`: the DeepSpeed side: ZeRO stage over all ``dp * sp`` ranks, batch sizes
  as DeepSpeed counts them (``sgfm_dist/parallel/batch.py`` says why this is exact).

The same call serves one process (dp = sp = 1), data parallelism, domain parallelism and
split sampling (no DeepSpeed config): there is no second path. Everything is checked before
any step runs, with errors naming the numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops.domain import LOCAL, Domain
from .batch import BatchAccounting, backward_scale, shard_batch
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
    activation_checkpointing: bool | str = False
    """Recompute each residual block in backward instead of storing its activations: ``True`` /
    ``"full"`` (store only each block's input), ``"selective"`` (store the block's matmul,
    convolution, FFT and attention outputs, recompute its element-wise ops), ``False`` off."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0 off, 1 optimizer state, 2 + gradients, 3 + parameters), over all ranks."""
    micro_batch: int = 1
    """Samples per data-parallel group per forward (DeepSpeed's ``train_micro_batch_size_per_gpu``)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    compile: bool = False
    """``torch.compile`` the networks (``train.compile``; :func:`apply_compile`); sp = 1 only."""

    def __post_init__(self):
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels: must be a positive int, got {self.levels!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.activation_checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"activation_checkpointing: must be true, false, 'full' or 'selective', "
                             f"got {self.activation_checkpointing!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be a bool, got {self.compile!r}")


@dataclass
class ParallelPlan:
    """What ``parallelize`` did; the trainer shards batches and scales losses through it."""

    mesh: ProcessMesh
    """The dp x sp process mesh."""
    domain: Domain
    """The domain now in the model: a ``SplitDomain`` (sp > 1) or ``LOCAL``."""
    accounting: BatchAccounting
    """True and DeepSpeed batch sizes."""
    checkpointed_blocks: int
    """Residual blocks recomputed in backward (0 when off)."""
    compiled: tuple[str, ...]
    """Names of the submodules whose forward runs through ``torch.compile`` (empty when off)."""
    ds_config: dict | None
    """The complete DeepSpeed config (ZeRO stage and batch sizes for this mesh), or None when
    ``parallelize`` was given none (sampling)."""

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
        """This rank's block of a batch that every sp rank of the group read whole."""
        return shard_batch(batch, self.domain)

    def backward_loss(self, loss: Tensor) -> Tensor:
        """The tensor to back-propagate: ``sp * loss`` (``parallel/batch.py``); exact (``* 1.0``) at sp = 1."""
        return loss * backward_scale(self.mesh.sp)


def check_parallel_setup(world_size: int, dp: int, sp: int, field_shape: Sequence[int], split_axes: Sequence[int],
                         wavelet: str, levels: int, zero_stage: int, sp_grid: Sequence[int] = ()) -> tuple[int, int]:
    """Everything about a dp x sp run that can be wrong, checked from numbers alone (no process
    group): the mesh against the world size, the field's split over the sp grid against the
    wavelet levels on *every* sp rank's block, the ZeRO stage. Every rank raises the same
    ValueError, naming the numbers, before any step. Returns the resolved ``(dp, sp)``."""
    from .mesh import MeshConfig

    dp, sp, grid = MeshConfig(dp=dp, sp=sp, sp_grid=tuple(sp_grid)).resolve(world_size)
    ParallelizeConfig(wavelet=wavelet, levels=levels, zero_stage=zero_stage)  # its own checks
    split_axes = tuple(split_axes)
    if len(split_axes) != len(grid):
        raise ValueError(f"split_axes: {split_axes} names {len(split_axes)} axes but the sp grid {grid} has "
                         f"{len(grid)} dims (sp = {sp})")
    # the DWT check looks at every rank's block, so rank 0's layout speaks for all
    layout = FieldLayout(tuple(int(n) for n in field_shape), split_axes, grid, (0,) * len(grid))
    check_dwt_split(layout, wavelet, levels)
    return dp, sp


def apply_domain_split(model: nn.Module, mesh: ProcessMesh, layout: FieldLayout, wavelet: str, levels: int) -> Domain:
    """Swap a :class:`SplitDomain` of ``layout`` into every layer of ``model`` (after checking the
    split fits ``levels`` levels of ``wavelet``); with one sp rank the model keeps ``LOCAL``.
    Returns the domain in use."""
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


CHECKPOINT_MODES = (False, True, "full", "selective")
"""Values of ``parallel.activation_checkpointing`` (``True`` = ``"full"``)."""


def _saved_by_selective_checkpointing() -> frozenset:
    """The ATen ops whose outputs selective checkpointing stores (torchtitan's op-level SAC
    policy): the products (matmul, convolution, attention) and the FFTs, whose recomputation
    costs FLOPs. Everything else in a block is element-wise or a copy (norms, FiLM, GELU,
    residual sums, periodic padding): cheap to recompute, and it is what holds the memory (about
    20 full-width tensors per block against ~7 outputs of products; docs/results.md)."""
    aten = torch.ops.aten
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten.convolution.default, aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default]
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            ops.append(getattr(aten, name).default)
    return frozenset(ops)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _saved_by_selective_checkpointing()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> int:
    """Recompute every residual block of the score and forcing networks in backward
    (``torch.utils.checkpoint``, non-reentrant, so halo/FFT communication simply runs again in
    the recomputation). ``mode`` ``"full"`` (or True) stores each block's input only;
    ``"selective"`` also stores the outputs of its products and FFTs
    (:func:`_saved_by_selective_checkpointing`) and recomputes the element-wise ops between them.
    Either way the forward values and the gradients are those of the plain model, bit for bit.
    Returns the number of blocks; a model without blocks is a ValueError."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    if mode not in CHECKPOINT_MODES or mode is False:
        raise ValueError(f"mode: expected 'full' or 'selective', got {mode!r}")
    context_fn = _selective_context if mode == "selective" else noop_context_fn
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
                        return checkpoint(_f, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
                    return _f(*args, **kwargs)

                block.forward = ckpt_forward
                block._sgfm_checkpointed = True
                wrapped += 1
    if wrapped == 0 and not any(getattr(m, "_sgfm_checkpointed", False) for m in model.modules()):
        raise ValueError("activation_checkpointing: the model has no nn.ModuleList named 'blocks' to checkpoint")
    logger.info("activation checkpointing: %d residual blocks recomputed in backward", wrapped)
    return wrapped


def apply_compile(model: nn.Module, sp: int = 1) -> tuple[str, ...]:
    """``torch.compile`` (inductor, default mode) of the networks of ``model``, in place through
    ``nn.Module.compile``: the SGFM's ``score_net`` and ``forcing_net`` (the convolutions,
    spectral layers, norms and FiLM of every block, fused), or each entry of a ``blocks``
    ``nn.ModuleList`` for a model without them (the transformer baseline). Parameters, their
    names and the state dict stay those of the eager model, so checkpoints, the EMA and ZeRO see
    no difference. Compilation happens at the first forward of each new input shape. Applied
    after activation checkpointing (torchtitan's order), before the engine wraps the model.
    The split domain's collectives are not traced: ``sp > 1`` (ranks sharing one sample) is a
    ValueError. Returns the compiled submodules' names."""
    if sp > 1:
        raise ValueError(f"compile: torch.compile runs with sp = 1 only, got sp = {sp} (the split domain's halo "
                         f"exchanges and distributed FFTs are not traced); set train.compile: false or parallel.sp: 1")
    targets = [(name, getattr(model, name)) for name in ("score_net", "forcing_net")
               if isinstance(getattr(model, name, None), nn.Module)]
    if not targets:
        blocks = getattr(model, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            targets = [(f"blocks.{i}", block) for i, block in enumerate(blocks)]
    if not targets:
        raise ValueError(f"compile: {type(model).__name__} has no score_net / forcing_net and no 'blocks' "
                         f"ModuleList to compile")
    for _, module in targets:
        module.compile()
    names = tuple(name for name, _ in targets)
    logger.info("torch.compile: %s (inductor; compiled at the first forward of each input shape)", ", ".join(names))
    return names


def apply_zero(ds_config: dict, accounting: BatchAccounting, zero_stage: int) -> dict:
    """The DeepSpeed config for ZeRO ``zero_stage`` on the mesh of ``accounting``: a copy of ``ds_config`` (optimizer,
    precision, clipping) with the stage set and the batch sizes as DeepSpeed counts them (every
    one of the ``dp * sp`` ranks a data-parallel replica, no ``mesh_param``), checked."""
    if not isinstance(ds_config, dict):
        raise ValueError(f"ds_config: expected a dict, got {type(ds_config).__name__}")
    if "mesh_param" in ds_config:
        raise ValueError("ds_config: 'mesh_param' must not be set; the dp x sp mesh is handled by giving DeepSpeed "
                         "all ranks as data-parallel world (exact for ZeRO 0-3; mesh_param is exact only for ZeRO-3 "
                         "on DeepSpeed 0.19.8)")
    for key, want in (("train_micro_batch_size_per_gpu", accounting.micro_batch),
                      ("gradient_accumulation_steps", accounting.grad_accum)):
        if key in ds_config and ds_config[key] != want:
            raise ValueError(f"ds_config: {key}={ds_config[key]} disagrees with the plan's {want}")
    cfg = dict(ds_config)
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": zero_stage}
    cfg["train_micro_batch_size_per_gpu"] = accounting.micro_batch
    cfg["gradient_accumulation_steps"] = accounting.grad_accum
    cfg["train_batch_size"] = accounting.deepspeed_train_batch_size
    sharded = {0: "nothing", 1: "optimizer state", 2: "optimizer state and gradients",
               3: "optimizer state, gradients and parameters"}[zero_stage]
    logger.info("ZeRO-%d: %s sharded over all %d ranks (dp %d x sp %d); DeepSpeed train_batch_size %d, "
                "true global batch %d", zero_stage, sharded, accounting.dp * accounting.sp, accounting.dp,
                accounting.sp,
                accounting.deepspeed_train_batch_size, accounting.global_batch)
    return cfg


def parallelize(model: nn.Module, mesh: ProcessMesh, layout: FieldLayout, cfg: ParallelizeConfig,
                ds_config: dict | None = None) -> ParallelPlan:
    """Apply the domain split, activation checkpointing and compilation to ``model`` in place and complete
    ``ds_config`` (the engine's optimizer / precision / clipping settings) with ZeRO and this
    mesh's batch sizes; return the plan. ``ds_config=None``: no engine follows (sampling)."""
    if not isinstance(cfg, ParallelizeConfig):
        raise ValueError(f"cfg: expected a ParallelizeConfig, got {type(cfg).__name__}")
    accounting = BatchAccounting(cfg.micro_batch, cfg.grad_accum, mesh.dp, mesh.sp)
    domain = apply_domain_split(model, mesh, layout, cfg.wavelet, cfg.levels)
    n = apply_activation_checkpointing(model, cfg.activation_checkpointing) if cfg.activation_checkpointing else 0
    compiled = apply_compile(model, mesh.sp) if cfg.compile else ()
    full = apply_zero(ds_config, accounting, cfg.zero_stage) if ds_config is not None else None
    logger.info("mesh: %s; true global batch %d", mesh.describe(), accounting.global_batch)
    return ParallelPlan(mesh=mesh, domain=domain, accounting=accounting, checkpointed_blocks=n, compiled=compiled,
                        ds_config=full)


def parallelize_for_sampling(model: nn.Module, world_size: int, sp: int, field_shape: Sequence[int], wavelet: str,
                             levels: int, split_axes: Sequence[int], sp_grid: Sequence[int] = ()) -> Domain:
    """Split ``model`` over all ``world_size`` ranks (``sp`` must equal it) for sampling one field
    of global ``field_shape``; returns the domain (``generate`` then draws its noise globally and
    shards it, so the samples equal the single-process ones for the same seed). Every sp rank
    must call ``generate`` with identically seeded generators. Checked from numbers first."""
    if sp != world_size:
        # dp groups would each draw the whole ensemble again (the noise of member i depends on
        # the ensemble size, so it cannot be dealt out over groups without changing the samples)
        raise ValueError(f"sp: sampling splits one field over all ranks; got sp={sp} on {world_size} processes "
                         f"(launch {sp} processes, or pass --sp {world_size})")
    field_shape = tuple(int(n) for n in field_shape)
    check_parallel_setup(world_size, 1, sp, field_shape, split_axes, wavelet, levels, 0, sp_grid)
    mesh = ProcessMesh.create(dp=1, sp=sp, sp_grid=sp_grid)
    return parallelize(model, mesh, mesh.layout(field_shape, tuple(split_axes)),
                       ParallelizeConfig(wavelet=wavelet, levels=levels)).domain
