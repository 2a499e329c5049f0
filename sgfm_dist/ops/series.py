"""A window of a multivariate time series as a periodic 1-D field, and back.

    series_field_length  N, the field length of a window of T steps (2T reflected, T periodic)
    series_to_field      windows [B, T, F] in [0, 1] -> field [B, F, N] (values 2x - 1)
    field_to_series      field [n, F, N] -> windows [n, T, F] in [0, 1] (the readout)

The periodized wavelets, periodic convolutions and FFT layers see a periodic t axis; a window's
ends are not joined in the data, so ``reflect`` appends the mirror image (continuous across the
wrap) and the readout averages the two halves, the orthogonal projection onto mirror-symmetric
fields. The data source (``sgfm_dist.data.timeseries``) builds the field before the sp ranks split
it; the model's readout (``model.modalities.TimeSeriesModality``) folds it back: both use these.
"""
from __future__ import annotations

import torch
from torch import Tensor


def series_field_length(length: int, padding: str, levels: int) -> int:
    """N, the field length of a window of ``length`` steps: 2T reflected, T periodic; it must be
    divisible by 2**levels (a ValueError naming the keys to change otherwise)."""
    if padding not in ("reflect", "periodic"):
        raise ValueError(f"model.series_padding: must be 'reflect' or 'periodic', got {padding!r}")
    n = 2 * length if padding == "reflect" else length
    if n % (2 ** levels):
        raise ValueError(f"data.frames: a window of T={length} steps is a field of N={n} cells "
                         f"({'2T, reflected' if padding == 'reflect' else 'T, periodic'}), not divisible by "
                         f"2**model.levels = {2 ** levels}; choose T (convert with another --length) or fewer levels")
    return n


def series_to_field(x: Tensor, padding: str, n: int | None = None) -> Tensor:
    """Windows ``x [B, T, F]`` in [0, 1] -> the field ``[B, F, N]``: values ``2x - 1`` (centred,
    O(1), what the VP diffusion's unit-variance prior expects), t made periodic by ``padding``
    (``ModelConfig.series_padding``). ``n``, if given, is checked against the padding."""
    u = (2.0 * x - 1.0).transpose(1, 2)  # [B, F, T]
    if padding == "reflect":
        u = torch.cat([u, u.flip(-1)], dim=-1)  # [B, F, 2T]: continuous across the wrap
    elif padding != "periodic":
        raise ValueError(f"model.series_padding: must be 'reflect' or 'periodic', got {padding!r}")
    if n is not None and u.shape[-1] != n:
        raise ValueError(f"series_to_field: {x.shape[1]} steps give {u.shape[-1]} cells, expected {n}")
    return u.contiguous()


def field_to_series(u: Tensor, padding: str) -> Tensor:
    """The readout of a whole field ``u [n, F, N]``: windows ``[n, T, F]`` in [0, 1]. Reflected
    fields average each step with its mirror (the orthogonal projection onto mirror-symmetric
    fields; exact on the data, where both halves agree); values ``(u + 1) / 2`` clipped to [0, 1],
    the range the data was normalized to."""
    if padding == "reflect":
        T = u.shape[-1] // 2
        v = 0.5 * (u[..., :T] + u[..., T:2 * T].flip(-1))  # [n, F, T]
    elif padding == "periodic":
        v = u
    else:
        raise ValueError(f"model.series_padding: must be 'reflect' or 'periodic', got {padding!r}")
    return ((v + 1.0) * 0.5).clamp(0.0, 1.0).transpose(1, 2).contiguous()  # [n, T, F]
