"""Periodic halo exchange: ghost cells from the neighbouring ranks along one split axis.

``halo_exchange(x, config)`` returns ``x`` with ``lo`` ghost cells prepended and ``hi``
appended along ``config.dim``: the left ghosts are the last ``lo`` cells of the left
neighbour's block, the right ghosts the first ``hi`` of the right neighbour's (periodic:
rank 0's left neighbour is the last rank). Several axes are padded by a dimension sweep
(:func:`halo_pad` pads axis after axis, each exchange carrying the ghosts of the axes
before it, which fills the corners).

Notes
-----
One exchange is at most four non-blocking messages in one ``batch_isend_irecv``: my first
``hi`` cells to the left neighbour, my last ``lo`` cells to the right, and the two
matching receives. Tags distinguish the direction, so with two ranks on a periodic axis
(left neighbour == right neighbour) the messages cannot be swapped; the operations are
also issued in the same order on every rank, which is how NCCL (which ignores tags)
matches them. The exchange is linear, and its backward is its adjoint: each ghost's
gradient is sent back to the rank that owns the cell and added there. Forward and
adjoint are one :class:`~.collectives.LinearComm` pair (each the other's backward), so
double backward works too. With one rank on the axis it wraps locally (no communication).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from .collectives import LinearComm
from .comm_stats import COMM_STATS

_TAG_LEFTWARD = 1   # data travelling to the left neighbour
_TAG_RIGHTWARD = 2  # data travelling to the right neighbour


@dataclass(frozen=True)
class HaloConfig:
    """One periodic ghost-cell exchange along one tensor dim."""

    dim: int
    """Tensor dim exchanged (a field axis of ``[B, C, *S]``)."""
    lo: int
    """Ghost cells before the block (from the left neighbour)."""
    hi: int
    """Ghost cells after the block (from the right neighbour)."""
    extents: tuple[int, ...]
    """Every rank's block extent along ``dim``, in grid order (one entry: the axis is whole)."""
    coord: int = 0
    """This rank's position along the axis, ``0 <= coord < len(extents)``."""
    prev_rank: int = 0
    """Global rank of the left (periodic) neighbour."""
    next_rank: int = 0
    """Global rank of the right (periodic) neighbour."""
    group: object = None
    """Process group holding both neighbours (None: the default group)."""

    def __post_init__(self):
        object.__setattr__(self, "extents", tuple(self.extents))
        for name in ("dim", "lo", "hi", "coord"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if not self.extents or any(n < 1 for n in self.extents):
            raise ValueError(f"extents: expected positive block extents, got {self.extents}")
        if self.coord >= len(self.extents):
            raise ValueError(f"coord: {self.coord} outside the {len(self.extents)} ranks of the axis")
        if len(self.extents) > 1:
            thinnest = min(self.extents)
            # one hop only: a ghost region must lie inside the neighbour's block
            if max(self.lo, self.hi) > thinnest:
                raise ValueError(
                    f"halo: width (lo={self.lo}, hi={self.hi}) on axis {self.dim} is wider than a neighbour's "
                    f"slab: global extent {sum(self.extents)} split over {len(self.extents)} ranks gives "
                    f"local extents {self.extents}; use fewer ranks on this axis or a narrower stencil")

    @property
    def n_ranks(self) -> int:
        return len(self.extents)

    @property
    def local_extent(self) -> int:
        return self.extents[self.coord]


# ---- forward and adjoint ---------------------------------------------------------------------
def _swap_with_neighbours(to_prev: Tensor | None, to_next: Tensor | None, from_next: Tensor | None,
                          from_prev: Tensor | None, cfg: HaloConfig) -> None:
    """Send ``to_prev`` / ``to_next`` to the left / right neighbour and receive into ``from_next``
    / ``from_prev`` (None: no such message); all posted in one ``batch_isend_irecv``, sends
    first, in the same order on every rank, tagged by direction, then waited for."""
    sends = [(t, peer, tag) for t, peer, tag in ((to_prev, cfg.prev_rank, _TAG_LEFTWARD),
                                                (to_next, cfg.next_rank, _TAG_RIGHTWARD)) if t is not None]
    recvs = [(t, peer, tag) for t, peer, tag in ((from_next, cfg.next_rank, _TAG_LEFTWARD),
                                                (from_prev, cfg.prev_rank, _TAG_RIGHTWARD)) if t is not None]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, cfg.group, tag) for t, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, cfg.group, tag) for t, peer, tag in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    COMM_STATS.add("halo", sum(t.numel() * t.element_size() for t, _, _ in sends), len(sends))


def _empty_or_none(like: Tensor, dim: int, n: int) -> Tensor | None:
    return like.new_empty(_with(like.shape, dim, n)) if n else None


def _halo_forward(x: Tensor, cfg: HaloConfig) -> Tensor:
    """``[.., n, ..] -> [.., lo + n + hi, ..]`` along ``cfg.dim``, ghosts from the neighbours."""
    dim, lo, hi, n = cfg.dim, cfg.lo, cfg.hi, x.shape[cfg.dim]
    if n != cfg.local_extent:
        raise ValueError(f"halo: tensor extent {n} along dim {dim} differs from this rank's block "
                         f"{cfg.local_extent} of {cfg.extents}")
    if cfg.n_ranks == 1:  # whole axis: periodic wrap, possibly several times round
        idx = torch.arange(-lo, n + hi, device=x.device) % n
        return x.index_select(dim, idx)
    right, left = _empty_or_none(x, dim, hi), _empty_or_none(x, dim, lo)
    # my first hi cells are the left neighbour's right ghosts, my last lo its right neighbour's left ones
    _swap_with_neighbours(x.narrow(dim, 0, hi) if hi else None, x.narrow(dim, n - lo, lo) if lo else None,
                          right, left, cfg)
    return torch.cat([t for t in (left, x, right) if t is not None], dim)  # [.., lo + n + hi, ..]


def _halo_adjoint(g: Tensor, cfg: HaloConfig) -> Tensor:
    """Adjoint of :func:`_halo_forward`: ``[.., lo + n + hi, ..] -> [.., n, ..]``, ghost values
    sent back to their owners and added to the cells they were copied from."""
    dim, lo, hi = cfg.dim, cfg.lo, cfg.hi
    n = g.shape[dim] - lo - hi
    if n != cfg.local_extent:
        raise ValueError(f"halo adjoint: extent {g.shape[dim]} along dim {dim} is not lo + n + hi = "
                         f"{lo} + {cfg.local_extent} + {hi}")
    if cfg.n_ranks == 1:
        idx = torch.arange(-lo, n + hi, device=g.device) % n
        return g.new_zeros(_with(g.shape, dim, n)).index_add(dim, idx, g)
    out = g.narrow(dim, lo, n).clone()  # [.., n, ..]
    from_right, from_left = _empty_or_none(g, dim, lo), _empty_or_none(g, dim, hi)
    # my left ghosts came from the left neighbour's last lo cells, my right ones from the right's first hi
    _swap_with_neighbours(g.narrow(dim, 0, lo) if lo else None, g.narrow(dim, lo + n, hi) if hi else None,
                          from_right, from_left, cfg)
    if from_right is not None:
        out.narrow(dim, n - lo, lo).add_(from_right)
    if from_left is not None:
        out.narrow(dim, 0, hi).add_(from_left)
    return out


def _with(shape, dim: int, n: int) -> list[int]:
    s = list(shape)
    s[dim] = n
    return s


_HALO = LinearComm(_halo_forward, _halo_adjoint)


# ---- public functions ------------------------------------------------------------------------
def halo_exchange(x: Tensor, config: HaloConfig) -> Tensor:
    """``x`` with periodic ghost cells along ``config.dim`` (differentiable: backward is the adjoint)."""
    with record_function("sgfm.halo"):  # profiler range (tools/benchmarks/profile.py); changes no value
        if config.lo == 0 and config.hi == 0:
            return x
        return _HALO(x, config)


def halo_adjoint(g: Tensor, config: HaloConfig) -> Tensor:
    """The adjoint of :func:`halo_exchange`: ghost values returned to and added at their owners."""
    with record_function("sgfm.halo"):  # profiler range (tools/benchmarks/profile.py); changes no value
        if config.lo == 0 and config.hi == 0:
            return g
        return _HALO.T(g, config)


def halo_pad(x: Tensor, configs: Sequence[HaloConfig]) -> Tensor:
    """Dimension sweep: exchange along each config's dim in turn (corners come with the later
    exchanges, since they carry the earlier axes' ghosts)."""
    for cfg in configs:
        x = halo_exchange(x, cfg)
    return x
