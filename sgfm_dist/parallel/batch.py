"""How a batch and its loss map onto the ``dp x sp`` mesh: this rank's block of a batch, the
factor on the loss before ``backward``, and the batch sizes DeepSpeed must be told.

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

from dataclasses import dataclass

from torch import Tensor

from ..ops.domain import Domain

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


def shard_batch(batch: dict, domain: Domain) -> dict:
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
