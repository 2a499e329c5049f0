"""Differentiable reductions and (un)sharding over the ranks that share one field.

Gradient convention (the one Megatron uses for tensor parallelism): a *replicated* value
(the same on every rank: the output of :func:`all_reduce_replicated` or :func:`gather_field`,
or a global field before :func:`shard_field`) counts once in the objective, and a
*partitioned* value (a rank's own block) counts on its own rank. So

* ``all_reduce_replicated``: forward sums over the group, backward is the identity (every
  rank already holds the gradient of the one replicated output);
* ``gather_field``: forward all-gathers the blocks, backward keeps this rank's block;
* ``shard_field``: forward slices this rank's block, backward all-gathers the gradient.

With it, ``torch.autograd.grad(domain.sum(local), u)`` gives every rank its block of the
single-device gradient, which is what guided sampling and the operator tests rely on. A
training loss that adds a replicated term on every sp rank and then averages gradients
over the sp ranks weights that term by ``1/sp``: multiply it by ``sp`` (or add it on one
rank only) to count it once per sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .comm_stats import COMM_STATS
from .mesh import block_offset, block_sizes


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        y = x.clone()
        dist.all_reduce(y, group=group)
        COMM_STATS.add("allreduce", y.numel() * y.element_size())
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def all_reduce_replicated(x: Tensor, group) -> Tensor:
    """Sum of ``x`` over ``group``, replicated on every rank (backward: identity)."""
    return _AllReduceReplicated.apply(x, group)


@dataclass(frozen=True)
class LinearComm:
    """A linear communication map ``forward(x, cfg)`` and its adjoint ``adjoint(x, cfg)`` (plain
    functions of a tensor and a config), made differentiable as a pair: the backward of each is
    the other, so double backward works too. The halo exchange, the FFT transpose and
    gather/shard are all such pairs."""

    forward: Callable[[Tensor, object], Tensor]
    adjoint: Callable[[Tensor, object], Tensor]

    def __call__(self, x: Tensor, cfg) -> Tensor:
        return _ApplyLinearComm.apply(x, self, cfg)

    @property
    def T(self) -> "LinearComm":
        """The adjoint map, as a differentiable :class:`LinearComm` too."""
        return LinearComm(self.adjoint, self.forward)


class _ApplyLinearComm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, op: LinearComm, cfg) -> Tensor:
        ctx.op, ctx.cfg = op, cfg
        return op.forward(x, cfg)

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.op.T(g.contiguous(), ctx.cfg), None, None


@dataclass(frozen=True)
class BlockGrid:
    """How a tensor is cut into blocks over a grid of ranks (row-major, last mesh dim fastest)."""

    dims: tuple[int, ...]
    """Tensor dim split by each mesh dim."""
    extents: tuple[int, ...]
    """Global extent of each of those dims."""
    ranks: tuple[int, ...]
    """Ranks per mesh dim."""
    coords: tuple[int, ...]
    """This rank's grid coordinates."""
    group: object = None
    """Process group of all the grid's ranks, in row-major grid order."""

    def __post_init__(self):
        if not len(self.dims) == len(self.extents) == len(self.ranks) == len(self.coords):
            raise ValueError(f"BlockGrid: dims {self.dims}, extents {self.extents}, ranks {self.ranks} and "
                             f"coords {self.coords} must have equal lengths")
        for dm, n, p in zip(self.dims, self.extents, self.ranks):
            if n < p:
                raise ValueError(f"BlockGrid: dim {dm} has extent {n}, fewer cells than its {p} ranks")

    def coords_of(self, r: int) -> tuple[int, ...]:
        c = []
        for p in reversed(self.ranks):
            r, ci = divmod(r, p)
            c.append(ci)
        return tuple(reversed(c))

    def block(self, coords: Sequence[int]) -> list[tuple[int, int]]:
        """``(offset, extent)`` per split dim of the block at ``coords``."""
        return [(block_offset(n, p, c), block_sizes(n, p)[c]) for n, p, c in zip(self.extents, self.ranks, coords)]


def _slice_block(x: Tensor, grid: BlockGrid, coords) -> Tensor:
    for dm, (o, n) in zip(grid.dims, grid.block(coords)):
        x = x.narrow(dm, o, n)
    return x


def _gather_forward(x: Tensor, grid: BlockGrid) -> Tensor:
    size = 1
    for p in grid.ranks:
        size *= p
    if size == 1:
        return x.clone()
    maxes = [max(block_sizes(n, p)) for n, p in zip(grid.extents, grid.ranks)]
    padded = x
    for dm, m in zip(grid.dims, maxes):  # all_gather wants equal shapes: pad uneven blocks
        if padded.shape[dm] < m:
            pad_shape = list(padded.shape)
            pad_shape[dm] = m - padded.shape[dm]
            padded = torch.cat([padded, padded.new_zeros(pad_shape)], dm)
    padded = padded.contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=grid.group)
    COMM_STATS.add("gather", padded.numel() * padded.element_size() * (size - 1), size - 1)
    blocks = {}
    for r, t in enumerate(parts):
        c = grid.coords_of(r)
        for dm, (_, n) in zip(grid.dims, grid.block(c)):
            t = t.narrow(dm, 0, n)
        blocks[c] = t

    def assemble(prefix: tuple[int, ...]) -> Tensor:
        k = len(prefix)
        if k == len(grid.ranks):
            return blocks[prefix]
        return torch.cat([assemble(prefix + (j,)) for j in range(grid.ranks[k])], grid.dims[k])

    return assemble(())


def _own_block(x: Tensor, grid: BlockGrid) -> Tensor:
    return _slice_block(x, grid, grid.coords).clone()


_GATHER = LinearComm(_gather_forward, _own_block)
"""All-gather of the blocks; its adjoint keeps this rank's block (the replicated convention)."""


def gather_field(x: Tensor, grid: BlockGrid) -> Tensor:
    """The global tensor from every rank's block, on every rank (backward: own block)."""
    return _GATHER(x, grid)


def shard_field(x: Tensor, grid: BlockGrid) -> Tensor:
    """This rank's block of a replicated global tensor (backward: gathered gradient)."""
    for dm, n in zip(grid.dims, grid.extents):
        if x.shape[dm] != n:
            raise ValueError(f"shard: tensor extent {x.shape[dm]} along dim {dm} is not the global extent {n}")
    return _GATHER.T(x, grid)
