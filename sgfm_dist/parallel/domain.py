"""``SplitDomain``: the periodic domain of a field split over the sp ranks of a process mesh.

It has the methods of :class:`~sgfm_dist.ops.domain.LocalDomain`, so every operator in
``sgfm_dist/ops`` and every layer in ``sgfm_dist/model`` runs on a split field unchanged:

* ``pad``          halo exchange on split axes (dimension sweep), local wrap on whole axes;
* ``rfft/irfft``   the distributed FFT (:mod:`.fft`), leaving the *transposed* spectral
                   layout, with ``wavenumbers`` / ``hermitian_weight`` sliced to this rank's
                   spectral block;
* ``sum``          all-reduce over the sp group (backward: identity, see :mod:`.collectives`);
* ``global_extent``/``numel`` from the layout; ``shard``/``gather`` to and from global fields.

Notes
-----
Tensors: the *last* ``d = layout.ndim`` dims of a tensor are its field axes (a ``[B, C, *S]``
field, or e.g. wavelet detail bands ``[B, C, 2^d - 1, *S']``); leading dims are never split.
Extents: a tensor whose local extent along a split axis equals the layout's is a block of
the layout's global extent. Any other extent (a coarser wavelet level, say) is read as an
even split (global = local x ranks), which needs the layout itself to be even along that
axis; in an uneven layout such a tensor is a ValueError. Uneven splits therefore work for
the halo exchange, finite differences, convolutions and the FFT, and not for the DWT
(which needs every local extent divisible by 2^levels, hence equal blocks).
The rfft halves the last FFT axis, like ``torch.fft.rfftn``, whatever the split.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..ops.domain import TWO_PI, fft_frequencies, box_lengths, real_dtype, field_axes, normalize_axes
from .collectives import BlockGrid, all_reduce_replicated, gather_field, shard_field
from .fft import FFTPlan, make_plan, plan_irfft, plan_rfft, spectral_blocks
from .halo import HaloConfig, halo_pad
from .mesh import FieldLayout, ProcessMesh, block_sizes


class SplitDomain:
    """A field split over the sp ranks of ``mesh`` as ``layout`` says (this rank's view)."""

    is_split = True

    def __init__(self, mesh: ProcessMesh, layout: FieldLayout):
        if tuple(layout.ranks) != tuple(mesh.sp_grid):
            raise ValueError(f"layout: ranks {layout.ranks} per split axis do not match the mesh's "
                             f"sp_grid {mesh.sp_grid} (sp = {mesh.sp})")
        if tuple(layout.coords) != tuple(mesh.sp_coords):
            raise ValueError(f"layout: coords {layout.coords} are not this rank's mesh coords {mesh.sp_coords}")
        self.mesh, self.layout = mesh, layout
        self._plans: dict = {}

    @classmethod
    def create(cls, mesh: ProcessMesh, global_extents: Sequence[int], split_axes: Sequence[int]) -> "SplitDomain":
        """The domain of a field with extents ``global_extents`` split on ``split_axes``
        (tensor dims of ``[B, C, *S]``, one per mesh dim of ``mesh.sp_grid``)."""
        return cls(mesh, mesh.layout(global_extents, split_axes))

    def __repr__(self) -> str:
        lay = self.layout
        return (f"SplitDomain(S={lay.global_extents}, split_axes={lay.split_axes}, ranks={lay.ranks}, "
                f"coords={lay.coords}, local={lay.local_extents})")

    # ---- extents ----------------------------------------------------------------------------
    def _offset(self, x: Tensor) -> int:
        """Tensor dim of field axis 0 (field axes are the last ``d`` dims)."""
        d = self.layout.ndim
        if x.ndim < d + 2:
            raise ValueError(f"domain: expected a tensor [B, C, ..., *S] with {d} field axes, got shape {tuple(x.shape)}")
        return x.ndim - d

    def _split(self) -> list[tuple[int, int, int, int]]:
        """``(mesh dim, field index, ranks, coord)`` for every mesh dim with more than one rank."""
        lay = self.layout
        return [(k, a - 2, p, c) for k, (a, p, c) in enumerate(zip(lay.split_axes, lay.ranks, lay.coords)) if p > 1]

    def _global_extents(self, x: Tensor, shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """Global extents of the field axes of a local tensor of ``shape`` (default ``x.shape``)."""
        shape = tuple(x.shape if shape is None else shape)
        lay, off = self.layout, len(shape) - self.layout.ndim
        ext = list(shape[off:])
        for k, i, p, c in self._split():
            n = shape[off + i]
            if n == lay.local_extents[i]:
                ext[i] = lay.global_extents[i]
            elif lay.global_extents[i] % p == 0:
                ext[i] = n * p  # a derived field (coarser level) of an even split
            else:
                raise ValueError(
                    f"domain: axis {off + i} has local extent {n} on rank {c} of {p}, but the layout splits "
                    f"{lay.global_extents[i]} cells unevenly as {block_sizes(lay.global_extents[i], p)}; "
                    f"fields of other extents need an even split")
        return tuple(ext)

    def global_extent(self, x: Tensor, axis: int) -> int:
        """Extent of tensor dim ``axis`` over the whole domain."""
        off = self._offset(x)
        axis = axis + x.ndim if axis < 0 else axis
        if axis < off:
            return x.shape[axis]
        return self._global_extents(x)[axis - off]

    def numel(self, x: Tensor, axes: Sequence[int] | None = None) -> int:
        """Number of cells over ``axes`` (default: all field axes) in the whole domain."""
        axes = field_axes(x) if axes is None else normalize_axes(axes, x.ndim)
        return math.prod(self.global_extent(x, a) for a in axes)

    # ---- ghost cells ------------------------------------------------------------------------
    def halo_configs(self, x: Tensor, widths: Sequence[tuple[int, int]]) -> list[HaloConfig]:
        """The exchanges (one per padded axis, in dim order) that ``pad`` performs."""
        if len(widths) != x.ndim - 2:
            raise ValueError(f"pad: got {len(widths)} (left, right) pairs for {x.ndim - 2} field axes")
        off, lay, mesh = self._offset(x), self.layout, self.mesh
        ext = self._global_extents(x)
        split = {i: (k, p, c) for k, i, p, c in self._split()}
        configs = []
        for j, (lo, hi) in enumerate(widths):
            dim = 2 + j
            if lo == 0 and hi == 0:
                continue
            i = dim - off
            if i < 0:
                raise ValueError(f"pad: dim {dim} of shape {tuple(x.shape)} is not one of the {lay.ndim} field axes")
            if i not in split:
                configs.append(HaloConfig(dim, lo, hi, (x.shape[dim],)))
                continue
            k, p, c = split[i]
            coords = list(lay.coords)
            prev_c, next_c = coords.copy(), coords.copy()
            prev_c[k], next_c[k] = c - 1, c + 1
            configs.append(HaloConfig(dim, lo, hi, block_sizes(ext[i], p), c, mesh.global_rank(prev_c),
                                      mesh.global_rank(next_c), mesh.sp_axis_groups[k]))
        return configs

    def pad(self, x: Tensor, widths: Sequence[tuple[int, int]]) -> Tensor:
        """Periodic ghost cells: halo exchange on split axes, local wrap on whole ones."""
        return halo_pad(x, self.halo_configs(x, widths))

    # ---- spectral ---------------------------------------------------------------------------
    def plan(self, x_or_shape, axes: Sequence[int]) -> FFTPlan:
        """The distributed FFT plan for a real local tensor (or its shape) over ``axes``."""
        shape = tuple(x_or_shape.shape if isinstance(x_or_shape, Tensor) else x_or_shape)
        off = len(shape) - self.layout.ndim
        if off < 2:
            raise ValueError(f"domain: expected a tensor [B, C, ..., *S] with {self.layout.ndim} field axes, "
                             f"got shape {shape}")
        axes = normalize_axes(axes, len(shape))
        if any(a < off for a in axes):
            raise ValueError(f"axes: {axes} include dims before the field axes {tuple(range(off, len(shape)))}")
        ext = self._global_extents(None, shape)
        fidx = tuple(a - off for a in axes)
        key = (ext, fidx, shape[0])
        if key not in self._plans:
            split = [(a - 2) if p > 1 else -1 for a, p in zip(self.layout.split_axes, self.layout.ranks)]
            # the samples take a split only where no field axis can (a 1-D field split along t); a
            # batch smaller than the ranks is padded with zero samples to take it (``plan.batch``)
            batch = max(shape[0], max(self.layout.ranks))
            self._plans[key] = make_plan(ext, fidx, split, self.layout.ranks, batch=batch)
        return self._plans[key]

    def rfft(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        """Distributed forward real FFT (norm='backward') into the transposed spectral layout."""
        plan = self.plan(x, axes)
        if plan.batch > x.shape[0]:  # zero samples so that every rank holds one in the spectral layout
            x = torch.cat([x, x.new_zeros(plan.batch - x.shape[0], *x.shape[1:])])
        return plan_rfft(x, plan, self._offset(x), self.layout.coords, self.mesh.sp_axis_groups)

    def irfft(self, xh: Tensor, axes: Sequence[int], shape: Sequence[int]) -> Tensor:
        """Inverse of ``rfft``; ``shape`` is the real field's *local* shape (all dims)."""
        plan = self.plan(tuple(shape), axes)
        off = len(shape) - self.layout.ndim
        blocks = spectral_blocks(plan, self.layout.coords)
        expect = tuple(n for _, n in blocks)
        if tuple(xh.shape[off:]) != expect:
            raise ValueError(f"irfft: spectral block {tuple(xh.shape[off:])} does not match this rank's block "
                             f"{expect} of the layout for real shape {tuple(shape)}")
        u = plan_irfft(xh, plan, off, self.layout.coords, self.mesh.sp_axis_groups)
        return u[:shape[0]] if u.shape[0] > shape[0] else u  # the zero samples rfft added

    def wavenumbers(self, x: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None,
                    zero_nyquist: bool = False) -> list[Tensor]:
        """Angular wavenumbers of this rank's spectral block, broadcastable against ``rfft(x, axes)``."""
        axes = normalize_axes(axes, x.ndim)
        lengths = box_lengths(lengths, len(axes))
        plan, off = self.plan(x, axes), self._offset(x)
        blocks = spectral_blocks(plan, self.layout.coords)
        ks = []
        for j, (a, L) in enumerate(zip(axes, lengths)):
            n = plan.extents[a - off]
            k = fft_frequencies(n, j == len(axes) - 1, x.device) * (TWO_PI / L)
            if zero_nyquist and n % 2 == 0:
                k = torch.where(k.abs() == (n // 2) * (TWO_PI / L), torch.zeros_like(k), k)
            o, m = blocks[a - off]
            shape = [1] * x.ndim
            shape[a] = m
            ks.append(k[o:o + m].to(real_dtype(x)).reshape(shape))
        return ks

    def hermitian_weight(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        """Multiplicity (1 or 2) of each stored rfft cell of this rank's block, broadcastable."""
        axes = normalize_axes(axes, x.ndim)
        plan, off = self.plan(x, axes), self._offset(x)
        a = axes[-1]
        n = plan.extents[a - off]
        w = torch.full((n // 2 + 1,), 2.0, dtype=real_dtype(x), device=x.device)
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0
        o, m = spectral_blocks(plan, self.layout.coords)[a - off]
        shape = [1] * x.ndim
        shape[a] = m
        return w[o:o + m].reshape(shape)

    # ---- reductions and sharding ------------------------------------------------------------
    def sum(self, x: Tensor) -> Tensor:
        """Sum over the sp ranks of an already locally reduced tensor (replicated result)."""
        if self.mesh.sp == 1:
            return x
        return all_reduce_replicated(x, self.mesh.sp_group)

    def _grid(self, shape: Sequence[int], global_shape: bool) -> BlockGrid:
        off = len(shape) - self.layout.ndim
        if off < 2:
            raise ValueError(f"domain: expected a tensor [B, C, ..., *S] with {self.layout.ndim} field axes, "
                             f"got shape {tuple(shape)}")
        lay = self.layout
        if global_shape:
            ext = []
            for a, p in zip(lay.split_axes, lay.ranks):
                n, i = shape[off + a - 2], a - 2
                if n != lay.global_extents[i] and n % p:
                    raise ValueError(f"shard: axis {off + i} has extent {n}, which is neither the layout's "
                                     f"{lay.global_extents[i]} nor divisible by its {p} ranks")
                ext.append(n)
        else:
            g = self._global_extents(None, shape)
            ext = [g[a - 2] for a in lay.split_axes]
        return BlockGrid(tuple(off + a - 2 for a in lay.split_axes), tuple(ext), lay.ranks, lay.coords,
                         self.mesh.sp_group)

    def shard(self, x_global: Tensor) -> Tensor:
        """This rank's block of a global field (the same tensor on every sp rank)."""
        return shard_field(x_global, self._grid(x_global.shape, True))

    def gather(self, x_local: Tensor) -> Tensor:
        """The global field from every sp rank's block (collective; result on every sp rank)."""
        return gather_field(x_local, self._grid(x_local.shape, False))
