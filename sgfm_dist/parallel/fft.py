"""Distributed real FFT over split field axes: slab and pencil decompositions by transposes.

A field split over a process grid (slab: one split axis; pencil: two) is transformed by
local FFTs over the axes that are whole on every rank, interleaved with ``all_to_all``
transposes that make a split axis whole by splitting another one. The result is left in
that *transposed* spectral layout: spectral operators only multiply elementwise by
wavenumbers (:func:`spectral_blocks` says which frequencies this rank holds), so the
inverse starts from there and a forward + inverse pair costs the forward's transposes
once each way (slab: 2 all-to-alls, pencil: 4), never a transpose back to the input layout
in between.

Notes
-----
Following Dedalus' layouts: an :class:`FFTPlan` is a list of stages, each a local
transform of whole axes or a :class:`TransposeConfig` over one mesh dim; only the transposes
communicate. Planning (field indices ``0 .. d-1``, ``A`` the FFT axes, ``h = max(A)`` the
axis the real FFT halves, as in ``torch.fft.rfftn``):

1. if ``h`` is split, first transpose the *real* data so ``h`` is whole, preferably
   splitting an axis outside ``A`` (else an axis of ``A``, which then costs one more
   transpose later);
2. ``rfftn`` over every whole axis of ``A`` (halving ``h``);
3. while an axis of ``A`` is untransformed (it is split on mesh dim ``k``): transpose on
   ``k`` to make it whole, splitting an axis that is already transformed or outside
   ``A``, then ``fft`` along it.

A transpose's target is chosen, identically on every rank, among the whole axes with at
least as many cells as ranks: evenly divisible extents first, then transformed axes, then
the lowest index. Uneven extents are fine (``all_to_all_single`` with split sizes, blocks
as in :func:`~sgfm_dist.parallel.mesh.block_sizes`). Complex data travel as real views.
A transpose is a permutation of the distributed array, so its adjoint is its inverse: the
autograd backward of a transpose is the reverse transpose, and the two call each other
(double backward works).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..ops.domain import rfftn
from .collectives import LinearComm
from .comm_stats import COMM_STATS
from .mesh import block_offset, block_sizes


# ---- the transpose ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TransposeConfig:
    """One all-to-all over the ranks of one mesh dim: ``gather_dim`` becomes whole and
    ``scatter_dim`` becomes split (tensor dims of the array being transposed)."""

    gather_dim: int
    """Tensor dim that is split on input and whole on output."""
    gather_blocks: tuple[int, ...]
    """Every rank's extent of ``gather_dim`` on input (grid order)."""
    scatter_dim: int
    """Tensor dim that is whole on input and split on output."""
    scatter_blocks: tuple[int, ...]
    """Every rank's extent of ``scatter_dim`` on output (grid order)."""
    coord: int
    """This rank's position along the mesh dim."""
    group: object = None
    """Process group of the mesh dim's ranks (ordered by coordinate)."""

    def __post_init__(self):
        object.__setattr__(self, "gather_blocks", tuple(self.gather_blocks))
        object.__setattr__(self, "scatter_blocks", tuple(self.scatter_blocks))
        if self.gather_dim == self.scatter_dim:
            raise ValueError(f"transpose: gather_dim and scatter_dim are both {self.gather_dim}")
        if len(self.gather_blocks) != len(self.scatter_blocks) or not 0 <= self.coord < len(self.gather_blocks):
            raise ValueError(f"transpose: blocks {self.gather_blocks} / {self.scatter_blocks} and coord "
                             f"{self.coord} disagree on the number of ranks")

    def reversed(self) -> "TransposeConfig":
        """The inverse transpose (and the adjoint: a transpose is a permutation)."""
        return TransposeConfig(self.scatter_dim, self.scatter_blocks, self.gather_dim, self.gather_blocks,
                               self.coord, self.group)


def _transpose_forward(x: Tensor, cfg: TransposeConfig) -> Tensor:
    """``[.., a_q, .., T, ..] -> [.., sum a, .., t_q, ..]`` (a = gather, t = scatter dim)."""
    q = cfg.coord
    if x.shape[cfg.gather_dim] != cfg.gather_blocks[q] or x.shape[cfg.scatter_dim] != sum(cfg.scatter_blocks):
        raise ValueError(f"transpose: local shape {tuple(x.shape)} does not match blocks {cfg.gather_blocks} "
                         f"on dim {cfg.gather_dim} (rank {q}) and {sum(cfg.scatter_blocks)} on dim {cfg.scatter_dim}")
    complex_ = x.is_complex()
    chunks = x.split(list(cfg.scatter_blocks), dim=cfg.scatter_dim)  # chunk j goes to rank j
    flat = [(torch.view_as_real(c) if complex_ else c).reshape(-1) for c in chunks]
    send = torch.cat(flat)  # [sum of chunk numels] real
    shapes = []
    for a in cfg.gather_blocks:  # what rank j sends me: its gather block, my scatter block
        s = list(x.shape)
        s[cfg.gather_dim], s[cfg.scatter_dim] = a, cfg.scatter_blocks[q]
        shapes.append(s)
    recv_sizes = [math.prod(s) * (2 if complex_ else 1) for s in shapes]
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=[f.numel() for f in flat],
                           group=cfg.group)
    COMM_STATS.add("transpose", sum(f.numel() for j, f in enumerate(flat) if j != q) * send.element_size(),
                   len(flat) - 1)
    parts = []
    for r, s in zip(recv.split(recv_sizes), shapes):
        parts.append(torch.view_as_complex(r.view(*s, 2)) if complex_ else r.view(s))
    return torch.cat(parts, dim=cfg.gather_dim)


def _transpose_adjoint(g: Tensor, cfg: TransposeConfig) -> Tensor:
    """A transpose permutes entries between ranks: its adjoint is its inverse, the reverse transpose."""
    return _transpose_forward(g, cfg.reversed())


_TRANSPOSE = LinearComm(_transpose_forward, _transpose_adjoint)


def transpose(x: Tensor, config: TransposeConfig) -> Tensor:
    """All-to-all transpose (differentiable: the backward is the reverse transpose)."""
    with record_function("sgfm.transpose"):  # profiler range (tools/benchmarks/profile.py); changes no value
        return _TRANSPOSE(x, config)


# ---- plans ---------------------------------------------------------------------------------
BATCH = -2
"""The transpose target that is no field axis: the batch dim (tensor dim 0). Chosen only when no
whole field axis can take a split, i.e. a field whose every axis is split (a 1-D time series
split along t): its spectral layout is then split over the samples, every frequency whole.
(-1 means "not split" in ``FFTPlan.split``.)"""


def _dim(i: int, offset: int) -> int:
    return 0 if i == BATCH else offset + i


@dataclass(frozen=True)
class TransposeStage:
    """Transpose on ``mesh_dim``: field axis ``gather`` becomes whole, ``scatter`` split."""

    mesh_dim: int
    gather: int
    gather_extent: int
    scatter: int
    scatter_extent: int


@dataclass(frozen=True)
class RFFTStage:
    """``rfftn`` over whole field axes ``others + (axis,)``, halving ``axis`` (real length ``n``)."""

    others: tuple[int, ...]
    axis: int
    n: int


@dataclass(frozen=True)
class FFTStage:
    """Complex ``fft`` along whole field axis ``axis``."""

    axis: int


@dataclass(frozen=True)
class FFTPlan:
    """Stages of a distributed rfft over ``axes`` of a field split as ``split`` (field indices)."""

    extents: tuple[int, ...]
    """Global real extents of the field axes."""
    axes: tuple[int, ...]
    """FFT axes (sorted field indices); the last is halved."""
    split: tuple[int, ...]
    """Field index split by each mesh dim in the real layout (-1: that mesh dim has 1 rank)."""
    ranks: tuple[int, ...]
    """Ranks per mesh dim."""
    stages: tuple
    """The stages, in forward order."""
    spectral_split: tuple[int, ...]
    """Field index split by each mesh dim in the spectral layout (-1: none)."""
    spectral_extents: tuple[int, ...]
    """Global extents in the spectral layout (the halved axis has ``n // 2 + 1``)."""
    batch: int = 0
    """Local batch size when a transpose splits the samples (``BATCH``); 0 otherwise."""

    @property
    def n_transposes(self) -> int:
        return sum(isinstance(s, TransposeStage) for s in self.stages)


def _choose_target(candidates: Sequence[int], extents: Sequence[int], p: int, transformed: set,
                   prefer_outside: bool, what: str, batch: int = 0) -> int:
    ok = [i for i in candidates if extents[i] >= p]
    if not ok and batch >= p:
        return BATCH  # the last resort: split the samples
    if not ok:
        raise ValueError(f"fft: cannot {what}: no whole field axis has at least {p} cells to take the split "
                         f"(extents {tuple(extents)}, candidates {tuple(candidates)}"
                         + (f", local batch {batch}" if batch else "") + "); use fewer ranks, "
                         f"or split an axis that is not transformed")

    def score(i):
        inside = i in transformed
        return (extents[i] % p != 0, inside if prefer_outside else not inside, i)

    return min(ok, key=score)


def make_plan(extents: Sequence[int], axes: Sequence[int], split: Sequence[int], ranks: Sequence[int],
              batch: int = 0) -> FFTPlan:
    """Plan a distributed ``rfftn`` (see the module Notes). ``split[k]`` is the field index
    split by mesh dim ``k`` (with ``ranks[k]`` ranks); all indices are field axes ``0..d-1``.
    ``batch``: the local batch size, which takes a split when no field axis can (``BATCH``; 0: never)."""
    extents, axes = tuple(extents), tuple(sorted(axes))
    split, ranks = tuple(split), tuple(ranks)
    d = len(extents)
    owner = {k: a for k, (a, p) in enumerate(zip(split, ranks)) if p > 1}  # mesh dim -> field index
    ext = list(extents)
    stages = []
    h = axes[-1]

    def split_by(i):
        return next((k for k, a in owner.items() if a == i), None)

    def whole():
        return [i for i in range(d) if split_by(i) is None]

    if split_by(h) is not None:  # the halving needs h whole and real: transpose real data first
        k = split_by(h)
        t = _choose_target(whole(), ext, ranks[k], set(axes), True, f"make axis {h} whole for the real FFT", batch)
        stages.append(TransposeStage(k, h, ext[h], t, batch if t == BATCH else ext[t]))
        owner[k] = t
    todo = [i for i in axes if split_by(i) is not None]
    now = [i for i in axes if split_by(i) is None]
    stages.append(RFFTStage(tuple(i for i in now if i != h), h, ext[h]))
    ext[h] = ext[h] // 2 + 1
    done = set(now)
    for a in sorted(todo, reverse=True):
        k = split_by(a)
        cands = [i for i in whole() if i not in todo or i in done]
        t = _choose_target(cands, ext, ranks[k], done, False, f"transpose split axis {a}", batch)
        stages.append(TransposeStage(k, a, ext[a], t, batch if t == BATCH else ext[t]))
        owner[k] = t
        stages.append(FFTStage(a))
        done.add(a)
    spectral_split = tuple(owner.get(k, -1) for k in range(len(ranks)))
    uses_batch = any(isinstance(st, TransposeStage) and st.scatter == BATCH for st in stages)
    return FFTPlan(extents, axes, tuple(a if p > 1 else -1 for a, p in zip(split, ranks)), ranks,
                   tuple(stages), spectral_split, tuple(ext), batch if uses_batch else 0)


# ---- execution -------------------------------------------------------------------------------
def _transpose_config(st: TransposeStage, offset: int, ranks, coords, groups, inverse: bool) -> TransposeConfig:
    p, q = ranks[st.mesh_dim], coords[st.mesh_dim]
    cfg = TransposeConfig(_dim(st.gather, offset), block_sizes(st.gather_extent, p), _dim(st.scatter, offset),
                          block_sizes(st.scatter_extent, p), q, groups[st.mesh_dim])
    return cfg.reversed() if inverse else cfg


def plan_rfft(x: Tensor, plan: FFTPlan, offset: int, coords: Sequence[int], groups: Sequence) -> Tensor:
    """Run ``plan`` forward on the local real block ``x`` (field axis i is tensor dim offset+i)."""
    for st in plan.stages:
        if isinstance(st, TransposeStage):
            x = transpose(x, _transpose_config(st, offset, plan.ranks, coords, groups, False))
        elif isinstance(st, RFFTStage):
            x = rfftn(x, [offset + i for i in st.others] + [offset + st.axis])  # keeps no input for backward
        else:
            x = torch.fft.fft(x, dim=offset + st.axis)
    return x


def plan_irfft(xh: Tensor, plan: FFTPlan, offset: int, coords: Sequence[int], groups: Sequence) -> Tensor:
    """Run ``plan`` backward (the inverse transform) on the local spectral block ``xh``."""
    for st in reversed(plan.stages):
        if isinstance(st, TransposeStage):
            xh = transpose(xh, _transpose_config(st, offset, plan.ranks, coords, groups, True))
        elif isinstance(st, RFFTStage):
            dims = [offset + i for i in st.others] + [offset + st.axis]
            xh = torch.fft.irfftn(xh, s=[xh.shape[dm] for dm in dims[:-1]] + [st.n], dim=dims)
        else:
            xh = torch.fft.ifft(xh, dim=offset + st.axis)
    return xh


def spectral_blocks(plan: FFTPlan, coords: Sequence[int]) -> list[tuple[int, int]]:
    """Per field axis, ``(offset, extent)`` of this rank's block in the spectral layout."""
    out = [(0, n) for n in plan.spectral_extents]
    for k, a in enumerate(plan.spectral_split):
        if a >= 0:
            n, p = plan.spectral_extents[a], plan.ranks[k]
            out[a] = (block_offset(n, p, coords[k]), block_sizes(n, p)[coords[k]])
    return out


def transpose_bytes(plan: FFTPlan, batch_numel: int, itemsize: int, coords: Sequence[int],
                    direction: str = "forward") -> int:
    """Bytes this rank sends in ``plan``'s transposes: the all-to-all volume, i.e. every block it
    holds before a transpose except the one that stays (``direction``: "forward" for the rfft,
    "inverse" for the irfft, whose transposes send back what the forward ones received, or
    "both"), for ``batch_numel`` = B * C (* extra dims) and real ``itemsize``."""
    if direction not in ("forward", "inverse", "both"):
        raise ValueError(f"direction: expected 'forward', 'inverse' or 'both', got {direction!r}")
    ext, owner = dict(enumerate(plan.extents)), {k: a for k, a in enumerate(plan.split) if a >= 0}
    if plan.batch:  # the samples are an axis of their own here (batch_numel counts them once)
        ext[BATCH] = plan.batch
        batch_numel //= plan.batch
    total, complex_ = 0, False

    def local_cells() -> int:
        cells = 1
        for i, n in ext.items():
            k = next((m for m, a in owner.items() if a == i), None)
            cells *= block_sizes(n, plan.ranks[k])[coords[k]] if k is not None else n
        return cells

    for st in plan.stages:
        if isinstance(st, RFFTStage):
            ext[st.axis] = ext[st.axis] // 2 + 1
            complex_ = True
            continue
        if not isinstance(st, TransposeStage):
            continue
        p, q = plan.ranks[st.mesh_dim], coords[st.mesh_dim]
        scale = batch_numel * itemsize * (2 if complex_ else 1)
        before = local_cells()  # scatter axis whole, gather axis my block
        keep_t = block_sizes(st.scatter_extent, p)[q]
        if direction in ("forward", "both"):
            total += before // st.scatter_extent * (st.scatter_extent - keep_t) * scale
        owner[st.mesh_dim] = st.scatter
        after = local_cells()  # gather axis whole, scatter axis my block
        keep_a = block_sizes(st.gather_extent, p)[q]
        if direction in ("inverse", "both"):
            total += after // st.gather_extent * (st.gather_extent - keep_a) * scale
    return total
