"""Central finite differences on periodic fields, with same-accuracy one-sided stencils for a
non-periodic axis (the time axis of a trajectory).

Periodic stencils get their ghost cells from ``domain.pad`` (a local wrap here, the halo
exchange when the field is split), then run as a sum of shifted slices; ``stencil_halo``
is the width that exchange needs. Channel conventions (vector groups ``C = G*k``, component
``i`` along ``axes[i]``) are those of ``spectral.py``.

Notes
-----
Stencil weights are solved exactly in rationals from the Taylor conditions
``sum_j c_j o_j^q / q! = [q == order]`` for ``q < #points``, then rounded once to float.
A central stencil of derivative order ``m`` and (even) accuracy ``a`` has half-width
``p = (m + 1)//2 + a//2 - 1`` (Fornberg). The one-sided boundary rows (``boundary=
"one_sided"``) use a window of ``W = max(2p + 1, m + a)`` consecutive points touching the
end, which is exact on polynomials of degree ``W - 1`` and so also of accuracy ``a``; the
interior keeps the central stencil. Such an axis is read whole (no padding, no halo), so
it must not be split across ranks: a ValueError says so.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from numbers import Real
from typing import Literal, Sequence

import torch
from torch import Tensor

from .domain import LOCAL, TWO_PI, Domain, box_lengths, check_real_field
from .spectral import axis_dim, flow_axes, vector_components

Boundary = Literal["periodic", "one_sided"]


# ---- stencils ----------------------------------------------------------------------------
def _check_order_accuracy(order: int, accuracy: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order: expected a positive int derivative order, got {order!r}")
    if isinstance(accuracy, bool) or not isinstance(accuracy, int) or accuracy < 2 or accuracy % 2:
        raise ValueError(f"accuracy: expected an even int >= 2 (order of the truncation error), got {accuracy!r}")


@lru_cache(maxsize=None)
def _weights(offsets: tuple[int, ...], order: int) -> tuple[Fraction, ...]:
    """Exact weights of the derivative of ``order`` on ``offsets`` (unit spacing)."""
    n = len(offsets)
    # Taylor matching: row q is o^q / q!, right-hand side e_order; solve by Gauss-Jordan in Q
    fact = [Fraction(1)]
    for q in range(1, n):
        fact.append(fact[-1] * q)
    a = [[Fraction(o) ** q / fact[q] for o in offsets] + [Fraction(int(q == order))] for q in range(n)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col] != 0)  # distinct offsets: Vandermonde is regular
        a[col], a[piv] = a[piv], a[col]
        inv = 1 / a[col][col]
        a[col] = [x * inv for x in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0:
                f = a[r][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
    return tuple(a[r][n] for r in range(n))


def stencil_halo(order: int, accuracy: int) -> int:
    """Ghost cells needed per side by the central stencil (the halo exchange width)."""
    _check_order_accuracy(order, accuracy)
    return (order + 1) // 2 + accuracy // 2 - 1


def central_stencil(order: int, accuracy: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(offsets, coefficients)`` of the central difference for ``d^order/dx^order`` at unit
    spacing with truncation error ``O(h^accuracy)``; zero coefficients are dropped
    (e.g. order 1, accuracy 2 -> ``((-1, 1), (-0.5, 0.5))``)."""
    p = stencil_halo(order, accuracy)
    offsets = tuple(range(-p, p + 1))
    pairs = [(o, float(c)) for o, c in zip(offsets, _weights(offsets, order)) if c != 0]
    return tuple(o for o, _ in pairs), tuple(c for _, c in pairs)


def one_sided_stencils(order: int, accuracy: int) -> tuple[tuple[tuple[int, ...], tuple[float, ...]], ...]:
    """Stencils of the ``p = stencil_halo`` rows at the *left* end, row ``j`` first.

    Row ``j`` uses offsets ``-j .. W-1-j`` (never reaching before index 0). The right end's
    row ``n-1-j`` uses the negated offsets with coefficients times ``(-1)**order``.
    """
    p = stencil_halo(order, accuracy)
    W = max(2 * p + 1, order + accuracy)
    rows = []
    for j in range(p):
        offsets = tuple(range(-j, W - j))
        rows.append((offsets, tuple(float(c) for c in _weights(offsets, order))))
    return tuple(rows)


# ---- derivatives ---------------------------------------------------------------------------
def _stencil_sum(x: Tensor, dim: int, start: int, length: int, offsets, coeffs) -> Tensor:
    """``sum_j c_j x[start + o_j : start + o_j + length]`` along ``dim``."""
    out = None
    for o, c in zip(offsets, coeffs):
        term = x.narrow(dim, start + o, length) * c
        out = term if out is None else out + term
    return out


def fd_derivative(u: Tensor, axis: int, order: int = 1, accuracy: int = 2, spacing: float | None = None,
                  domain: Domain = LOCAL, boundary: Boundary = "periodic") -> Tensor:
    """``d^order u / dx^order`` along tensor dim ``axis`` by central differences.

    ``spacing`` defaults to ``2*pi / n`` with ``n = domain.global_extent(u, axis)``.
    ``boundary="periodic"`` pads with ``domain.pad`` (halo exchange when split);
    ``"one_sided"`` (a non-periodic axis, e.g. time) uses same-accuracy one-sided stencils
    at both ends and no padding, so that axis must not be split.
    """
    check_real_field(u, "u")
    _check_order_accuracy(order, accuracy)
    dim = axis_dim(axis, u.ndim)
    n_global = domain.global_extent(u, dim)
    if spacing is None:
        spacing = TWO_PI / n_global
    if isinstance(spacing, bool) or not isinstance(spacing, Real) or not spacing > 0:
        raise ValueError(f"spacing: expected a positive grid spacing, got {spacing!r}")
    offsets, coeffs = central_stencil(order, accuracy)
    p = stencil_halo(order, accuracy)
    n = u.shape[dim]
    scale = 1.0 / float(spacing) ** order

    if boundary == "periodic":
        widths = [(0, 0)] * (u.ndim - 2)
        widths[dim - 2] = (p, p)
        padded = domain.pad(u, widths)  # [B, C, .., n + 2p, ..]
        return _stencil_sum(padded, dim, p, n, offsets, coeffs) * scale  # [B, C, *S]

    if boundary == "one_sided":
        if n != n_global:
            raise ValueError(f"boundary: 'one_sided' reads axis {axis} whole, but it is split "
                             f"(local extent {n} of {n_global}); do not split a non-periodic axis")
        rows = one_sided_stencils(order, accuracy)
        W = len(rows[0][0]) if rows else 2 * p + 1
        if n < W:
            raise ValueError(f"u: axis {axis} has {n} points, fewer than the {W} that a one-sided "
                             f"order-{order} accuracy-{accuracy} stencil needs")
        sign = (-1.0) ** order  # mirroring x -> -x flips odd derivatives
        left = [_stencil_sum(u, dim, j, 1, offs, cs) for j, (offs, cs) in enumerate(rows)]
        interior = _stencil_sum(u, dim, p, n - 2 * p, offsets, coeffs)  # [.., n - 2p, ..]
        right = [_stencil_sum(u, dim, n - 1 - j, 1, tuple(-o for o in offs), tuple(sign * c for c in cs))
                 for j, (offs, cs) in reversed(list(enumerate(rows)))]
        return torch.cat(left + [interior] + right, dim) * scale  # [B, C, *S]

    raise ValueError(f"boundary: expected 'periodic' or 'one_sided', got {boundary!r}")


def _spacings(u: Tensor, dims: Sequence[int], lengths, domain: Domain) -> list[float]:
    lengths = box_lengths(lengths, len(dims))
    return [L / domain.global_extent(u, d) for d, L in zip(dims, lengths)]


def fd_gradient(u: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, accuracy: int = 2,
                domain: Domain = LOCAL) -> Tensor:
    """``[B, C, *S] -> [B, C*k, *S]``: channel ``c*k + i`` is ``d u_c / d axes[i]`` (periodic)."""
    check_real_field(u, "u")
    dims = flow_axes(axes, u.ndim)
    hs = _spacings(u, dims, lengths, domain)
    g = torch.stack([fd_derivative(u, d, 1, accuracy, h, domain) for d, h in zip(dims, hs)], dim=2)  # [B, C, k, *S]
    return g.flatten(1, 2)  # [B, C*k, *S]


def fd_divergence(v: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, accuracy: int = 2,
                  domain: Domain = LOCAL) -> Tensor:
    """``[B, G*k, *S] -> [B, G, *S]``: ``sum_i d v_i / d axes[i]`` per group (periodic)."""
    check_real_field(v, "v")
    dims = flow_axes(axes, v.ndim)
    hs = _spacings(v, dims, lengths, domain)
    comps = vector_components(v, len(dims), axes).unbind(2)  # k x [B, G, *S]
    return sum(fd_derivative(c, d, 1, accuracy, h, domain) for c, d, h in zip(comps, dims, hs))  # [B, G, *S]


def fd_laplacian(u: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, accuracy: int = 2,
                 domain: Domain = LOCAL) -> Tensor:
    """``sum_i d^2 u / d axes[i]^2``, same shape as ``u`` (periodic)."""
    check_real_field(u, "u")
    dims = flow_axes(axes, u.ndim)
    hs = _spacings(u, dims, lengths, domain)
    return sum(fd_derivative(u, d, 2, accuracy, h, domain) for d, h in zip(dims, hs))  # [B, C, *S]
