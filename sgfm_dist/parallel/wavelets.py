"""Distributed DWT / inverse: ``ops.wavelets`` on a :class:`SplitDomain`, with the split checked first.

Each rank transforms its own block: every level pads its input by the filter's reach through
``domain.pad`` (a halo exchange on split axes) and then filters locally, so coefficients stay
shard-local (a rank holds the coefficients of its block at every level). That needs, on
every split axis,

* every local extent divisible by ``2**levels`` (each level halves the block exactly; with
  balanced splits this means an even split: blocks that differ by one cell cannot both be
  even), and
* a halo no wider than a neighbour's block at every level: ``filter_reach`` fine cells on
  level ``j``'s input (local extent ``n / 2**(j-1)``), and ``inverse_filter_reach`` coarse
  cells on its output (``n / 2**j``) for the inverse.

:func:`check_dwt_split` tests both from the layout alone, so every rank raises the same
ValueError (naming the axis, the extents and the rank count) before any communication;
:func:`split_dwt` / :func:`split_idwt` run the check and then the single-device code.
"""
from __future__ import annotations

from ..ops import wavelets
from .domain import SplitDomain
from .mesh import FieldLayout


def _problem(layout: FieldLayout, wavelet: str, levels: int) -> str | None:
    """Why ``levels`` levels of ``wavelet`` cannot run on ``layout`` (None when they can)."""
    reach, inv_reach = wavelets.filter_reach(wavelet), wavelets.inverse_filter_reach(wavelet)
    for a, n in enumerate(layout.global_extents):
        dim = 2 + a
        jmax = wavelets.max_levels(n, wavelet)
        if levels > jmax:
            return (f"levels: {levels} is too many for axis {dim} of global extent {n} with wavelet "
                    f"{wavelet!r}: max_levels = {jmax}")
        p = layout.ranks_along(dim)
        if p == 1:
            continue
        blocks = layout.blocks_along(dim)
        bad = [b for b in blocks if b % 2 ** levels]
        if bad:
            return (f"dwt: axis {dim} has local extents {blocks} (global {n} over {p} ranks), not all divisible "
                    f"by 2**levels = {2 ** levels}; choose an extent divisible by {p * 2 ** levels}")
        thin = min(blocks)
        for j in range(1, levels + 1):
            n_in, n_out = thin >> (j - 1), thin >> j
            if reach > n_in or inv_reach > n_out:
                return (f"dwt: level {j} of {wavelet!r} needs a halo of {reach} cells on axis {dim} (inverse: "
                        f"{inv_reach} coarse cells) but a neighbour's slab there has only {n_in} cells "
                        f"({n_out} coarse): local extents {blocks} (global {n} over {p} ranks); "
                        f"use fewer levels or fewer ranks on this axis")
    return None


def check_dwt_split(layout: FieldLayout, wavelet: str, levels: int) -> None:
    """ValueError (axis, extents, rank count) unless ``levels`` levels of ``wavelet`` fit ``layout``."""
    msg = _problem(layout, wavelet, levels)
    if msg is not None:
        raise ValueError(msg)


def max_split_levels(layout: FieldLayout, wavelet: str) -> int:
    """Most levels of ``wavelet`` the split allows (0: none)."""
    j = 0
    while _problem(layout, wavelet, j + 1) is None:
        j += 1
    return j


def _layout_of(domain: SplitDomain, shape) -> FieldLayout:
    """The layout of a field of local ``shape`` (a derived field of an even split is allowed)."""
    ext = domain._global_extents(None, tuple(shape))
    lay = domain.layout
    return FieldLayout(ext, lay.split_axes, lay.ranks, lay.coords)


def split_dwt(u, domain: SplitDomain, wavelet: str = "db4", levels: int = 1) -> wavelets.WaveletCoeffs:
    """:func:`sgfm_dist.ops.wavelets.dwt` of this rank's block ``u``, after :func:`check_dwt_split`."""
    check_dwt_split(_layout_of(domain, u.shape), wavelet, levels)
    return wavelets.dwt(u, wavelet, levels, domain=domain)


def split_idwt(coeffs: wavelets.WaveletCoeffs, domain: SplitDomain):
    """:func:`sgfm_dist.ops.wavelets.idwt` of this rank's coefficients, after :func:`check_dwt_split`."""
    shape = (*coeffs.approx.shape[:2], *coeffs.field_shape)
    check_dwt_split(_layout_of(domain, shape), coeffs.wavelet, coeffs.levels)
    return wavelets.idwt(coeffs, domain=domain)
