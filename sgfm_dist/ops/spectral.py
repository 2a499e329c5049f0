"""Fourier-space differential operators on periodic fields: derivatives, gradient, divergence,
Laplacian, Leray-Helmholtz projection (paper Eq. 43), vorticity (Eq. 29 / 36) and the
isotropic energy spectrum.

Every operator is ``rfft -> multiply by a function of the wavenumbers -> irfft`` and goes
through the ``Domain`` seam (``domain.rfft / irfft / wavenumbers / hermitian_weight / sum``),
never through ``torch.fft`` on the field directly, so the distributed FFT (which returns a
transposed spectral layout with matching wavenumbers) plugs in unchanged. The Fourier-space
kernels (``*_hat``) only multiply elementwise by broadcast wavenumbers, so the distributed
code reuses them on its own layouts.

Notes
-----
Conventions (shared with ``finite_diff.py``):

* fields are ``[B, C, *S]``; ``axes`` are tensor dims of the flow / differentiated axes
  (negatives allowed); ``lengths[i]`` is the periodic box length along ``axes[i]``
  (default ``2*pi``, so wavenumbers are integers);
* vector fields group channels ``C = G * k`` with ``k = len(axes)``: component ``i`` of
  group ``g`` is channel ``g*k + i`` and points along ``axes[i]`` *in the order given*
  (``axes=(-1, -2)`` makes component 0 the x-component of a ``(.., y, x)`` field).

Nyquist: a real field's Nyquist mode (even extents) has no sign, so ``i k`` on it would
make the result complex. Odd derivatives, divergence, vorticity and the projection use
``k`` with the Nyquist mode zeroed (``zero_nyquist=True``); even derivatives and the
Laplacian keep it (``-k^2`` is real). With zeroed Nyquist the projection is a real
symmetric idempotent matrix at every mode and equal at ``k`` and ``-k``, hence an
orthogonal projector on real fields. Modes whose (zeroed) wavenumber vector is 0 are
passed through unchanged (the mean flow, and pure-Nyquist modes).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from .domain import LOCAL, TWO_PI, Domain, box_lengths, check_real_field, normalize_axes

SpectralFn = Callable[[Tensor, list[Tensor]], Tensor]
"""``fn(u_hat, ks) -> out_hat``: a Fourier-space kernel; ``ks[i]`` broadcasts against ``u_hat``."""


# ---- axes and vector channels (shared with finite_diff.py) ------------------------------
def flow_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``axes`` as positive tensor dims *in the order given* (checked: field axes, no repeats)."""
    if isinstance(axes, int) or not isinstance(axes, Sequence) or len(axes) == 0:
        raise ValueError(f"axes: expected a non-empty sequence of field-axis dims, got {axes!r}")
    if any(isinstance(a, bool) or not isinstance(a, Integral) for a in axes):
        raise ValueError(f"axes: expected ints (tensor dims), got {tuple(axes)!r}")
    axes = tuple(int(a) for a in axes)
    normalize_axes(axes, ndim)  # range and repeat checks, with their messages
    return tuple(a + ndim if a < 0 else a for a in axes)


def vector_components(v: Tensor, k: int, axes: Sequence[int], name: str = "v") -> Tensor:
    """View ``[B, G*k, ...]`` as ``[B, G, k, ...]`` (component i of group g is channel g*k+i)."""
    C = v.shape[1]
    if C % k != 0:
        raise ValueError(f"{name}: channel count C={C} is not divisible by k={k}, the number of "
                         f"flow axes {tuple(axes)} (vector fields group channels as C = G*k)")
    return v.unflatten(1, (C // k, k))  # [B, G, k, ...]


def axis_dim(axis: int, ndim: int) -> int:
    """One field axis (negatives allowed) as a positive tensor dim, checked."""
    if isinstance(axis, bool) or not isinstance(axis, Integral):
        raise ValueError(f"axis: expected an int tensor dim, got {axis!r}")
    return normalize_axes((int(axis),), ndim)[0]


def _check_order(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order: expected a positive int derivative order, got {order!r}")


# ---- Fourier-space kernels ----------------------------------------------------------------
def _times_i_power(x: Tensor, p: int) -> Tensor:
    """``x * i**p`` without a complex multiply for the real powers."""
    p %= 4
    if p == 0:
        return x
    if p == 1:
        return x * 1j
    if p == 2:
        return -x
    return x * -1j


def derivative_hat(u_hat: Tensor, k: Tensor, order: int = 1) -> Tensor:
    """``(i k)^order u_hat``. Pass ``k`` with the Nyquist mode zeroed for odd orders."""
    return _times_i_power(u_hat * k ** order, order)


def gradient_hat(u_hat: Tensor, ks: Sequence[Tensor]) -> Tensor:
    """``[B, C, ...] -> [B, C*k, ...]``, channel ``c*k + i`` = ``i ks[i] u_hat_c``."""
    g = torch.stack([k * u_hat for k in ks], dim=2)  # [B, C, k, ...]
    return g.flatten(1, 2) * 1j  # [B, C*k, ...]


def divergence_hat(v_hat: Tensor, ks: Sequence[Tensor]) -> Tensor:
    """``[B, G*k, ...] -> [B, G, ...]``: ``i sum_i ks[i] v_hat_i`` per group."""
    comps = vector_components(v_hat, len(ks), range(len(ks)), "v_hat").unbind(2)  # k x [B, G, ...]
    return sum(k * c for k, c in zip(ks, comps)) * 1j  # [B, G, ...]


def laplacian_hat(u_hat: Tensor, ks: Sequence[Tensor]) -> Tensor:
    """``-|k|^2 u_hat`` (pass ks with the Nyquist mode kept: ``-k^2`` is real there)."""
    return u_hat * -sum(k * k for k in ks)


def leray_project_hat(v_hat: Tensor, ks: Sequence[Tensor]) -> Tensor:
    """``(I - k k^T / |k|^2) v_hat`` per group (Eq. 43); modes with ``|k| = 0`` pass through.

    ``ks`` should have the Nyquist mode zeroed (see the module Notes).
    """
    comps = vector_components(v_hat, len(ks), range(len(ks)), "v_hat").unbind(2)  # k x [B, G, ...]
    k2 = sum(k * k for k in ks)  # |k|^2, broadcastable
    # 1/|k|^2 with the |k| = 0 modes mapped to 0 so they are left unchanged (k k^T = 0 there)
    inv_k2 = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, torch.ones_like(k2)), torch.zeros_like(k2))
    k_dot_v = sum(k * c for k, c in zip(ks, comps)) * inv_k2  # [B, G, ...]
    out = torch.stack([c - k * k_dot_v for k, c in zip(ks, comps)], dim=2)  # [B, G, k, ...]
    return out.flatten(1, 2)  # [B, G*k, ...]


def vorticity_hat(v_hat: Tensor, ks: Sequence[Tensor]) -> Tensor:
    """Curl in Fourier space, same sign convention as ``vorticity`` (ks with Nyquist zeroed).

    k=2: ``[B, 2G, ...] -> [B, G, ...]``, ``i (ks[1] v_0 - ks[0] v_1)``;
    k=3: ``[B, 3G, ...] -> [B, 3G, ...]``, component i = ``i (ks[i+2] v_{i+1} - ks[i+1] v_{i+2})``.
    """
    k = len(ks)
    if k not in (2, 3):
        raise ValueError(f"ks: vorticity needs 2 or 3 flow axes, got {k}")
    v = vector_components(v_hat, k, range(k), "v_hat").unbind(2)  # k x [B, G, ...]
    if k == 2:
        return (ks[1] * v[0] - ks[0] * v[1]) * 1j  # [B, G, ...]
    w = [ks[(i + 2) % 3] * v[(i + 1) % 3] - ks[(i + 1) % 3] * v[(i + 2) % 3] for i in range(3)]
    return torch.stack(w, dim=2).flatten(1, 2) * 1j  # [B, 3G, ...]


# ---- the one round trip ----------------------------------------------------------------
def spectral_apply(u: Tensor, axes: Sequence[int], fn: SpectralFn, lengths: Sequence[float] | None = None,
                   zero_nyquist: bool = False, domain: Domain = LOCAL) -> Tensor:
    """``irfft(fn(rfft(u), ks))`` over ``axes``: the one place that round-trips.

    ``ks[i]`` are the angular wavenumbers along ``axes[i]`` (order as given), for box
    lengths ``lengths`` (default ``2*pi``), Nyquist zeroed if ``zero_nyquist``, shaped to
    broadcast against the spectral layout. ``fn`` may change the batch and channel dims
    (e.g. gradient: C -> C*k) but not the spectral ones.
    """
    check_real_field(u, "u")
    dims = flow_axes(axes, u.ndim)
    lengths = box_lengths(lengths, len(dims))
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # the FFT wants increasing dims
    sorted_dims = [dims[i] for i in order]
    ks_sorted = domain.wavenumbers(u, sorted_dims, [lengths[i] for i in order], zero_nyquist=zero_nyquist)
    ks = [None] * len(dims)
    for j, i in enumerate(order):
        ks[i] = ks_sorted[j]
    u_hat = domain.rfft(u, sorted_dims)  # [B, C, *spectral layout]
    out_hat = fn(u_hat, ks)  # [B', C', *spectral layout]
    if out_hat.shape[2:] != u_hat.shape[2:]:
        raise ValueError(f"fn: must keep the spectral dims {tuple(u_hat.shape[2:])}, "
                         f"returned shape {tuple(out_hat.shape)}")
    shape = (*out_hat.shape[:2], *u.shape[2:])  # the real output's local shape
    return domain.irfft(out_hat, sorted_dims, shape)  # [B', C', *S]


# ---- public operators ----------------------------------------------------------------
def derivative(u: Tensor, axis: int, order: int = 1, length: float = TWO_PI, domain: Domain = LOCAL) -> Tensor:
    """``d^order u / d x^order`` along tensor dim ``axis`` of a periodic box of ``length``.

    Odd orders use the Nyquist-zeroed wavenumber so the result stays real.
    """
    check_real_field(u, "u")
    _check_order(order)
    dim = axis_dim(axis, u.ndim)
    if isinstance(length, bool) or not isinstance(length, Real) or not length > 0:
        raise ValueError(f"length: expected a positive box length, got {length!r}")
    return spectral_apply(u, (dim,), lambda uh, ks: derivative_hat(uh, ks[0], order), (length,),
                          zero_nyquist=order % 2 == 1, domain=domain)


def gradient(f: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, domain: Domain = LOCAL) -> Tensor:
    """``[B, C, *S] -> [B, C*k, *S]``: channel ``c*k + i`` is ``d f_c / d axes[i]``."""
    return spectral_apply(f, axes, gradient_hat, lengths, zero_nyquist=True, domain=domain)


def divergence(v: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None,
               domain: Domain = LOCAL) -> Tensor:
    """``[B, G*k, *S] -> [B, G, *S]``: ``sum_i d v_i / d axes[i]`` per group."""
    check_real_field(v, "v")
    vector_components(v, len(flow_axes(axes, v.ndim)), axes)  # channel check before any FFT
    return spectral_apply(v, axes, divergence_hat, lengths, zero_nyquist=True, domain=domain)


def laplacian(u: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, domain: Domain = LOCAL) -> Tensor:
    """``sum_i d^2 u / d axes[i]^2``, same shape as ``u`` (Nyquist mode kept)."""
    return spectral_apply(u, axes, laplacian_hat, lengths, zero_nyquist=False, domain=domain)


def leray_project(v: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None,
                  domain: Domain = LOCAL) -> Tensor:
    """Leray-Helmholtz projection onto divergence-free fields, ``I - k k^T/|k|^2`` per group (Eq. 43).

    ``[B, G*k, *S] -> [B, G*k, *S]``. Idempotent and self-adjoint on real fields; the ``k = 0``
    mode (mean flow) is passed through unchanged.
    """
    with record_function("sgfm.projection"):  # profiler range (tools/benchmarks/profile.py); changes no value
        check_real_field(v, "v")
        vector_components(v, len(flow_axes(axes, v.ndim)), axes)
        return spectral_apply(v, axes, leray_project_hat, lengths, zero_nyquist=True, domain=domain)


def vorticity(v: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None, domain: Domain = LOCAL) -> Tensor:
    """Curl of a vector field in tensor (numpy) axis order: ``(axes[0], .., axes[-1])`` read as
    ``(.., y, x)``, so the right-handed frame is the *reversed* axis order ``(x, y[, z])``.

    k=2: ``[B, 2G, *S] -> [B, G, *S]``, ``w = d v_0/d a_1 - d v_1/d a_0``: for axes ``(y, x)``
    with components ``(v_y, v_x)`` this is the usual ``w_z = d_x v_y - d_y v_x``, and for the
    text axes ``(t, x)`` it is the paper's Eq. 29, ``w = d_x u_t - d_t u_x``.
    k=3: ``[B, 3G, *S] -> [B, 3G, *S]``, component i = ``d v_{i+1}/d a_{i+2} - d v_{i+2}/d a_{i+1}``
    (indices mod 3): on axes ``(z, y, x)`` this is the usual curl, component i along ``a_i``.
    """
    check_real_field(v, "v")
    k = len(flow_axes(axes, v.ndim))
    if k not in (2, 3):
        raise ValueError(f"axes: vorticity needs 2 or 3 flow axes, got {tuple(axes)}")
    vector_components(v, k, axes)
    return spectral_apply(v, axes, vorticity_hat, lengths, zero_nyquist=True, domain=domain)


def energy_spectrum(u: Tensor, axes: Sequence[int], lengths: Sequence[float] | None = None,
                    domain: Domain = LOCAL) -> tuple[Tensor, Tensor]:
    """Isotropic shell spectrum ``(k_shell [K], E [B, K])`` over the flow ``axes``.

    ``E[b, s]`` sums ``0.5 |u_hat|^2`` over channels and over every stored mode whose
    ``|k|``, in units of ``dk = 2*pi / min(lengths)``, rounds to ``s``; ``k_shell = s * dk``.
    Other field axes (e.g. t for a spatial spectrum of a (t, y, x) field) are averaged.
    Normalised (Parseval, with ``domain.hermitian_weight``) so that
    ``E.sum(-1) == 0.5 * (u**2).sum(channels).mean(cells)``. ``K`` comes from the global
    extents and ``E`` is reduced with ``domain.sum``, so it is the same when split.
    """
    check_real_field(u, "u")
    dims = flow_axes(axes, u.ndim)
    lengths = box_lengths(lengths, len(dims))
    dk = TWO_PI / min(lengths)
    # the largest |k| is the corner mode (n_i // 2 on every axis): K fixed by global extents
    k_max = math.sqrt(sum(((domain.global_extent(u, a) // 2) * TWO_PI / L) ** 2 for a, L in zip(dims, lengths)))
    K = int(round(k_max / dk)) + 1

    order = sorted(range(len(dims)), key=lambda i: dims[i])
    sorted_dims = [dims[i] for i in order]
    ks = domain.wavenumbers(u, sorted_dims, [lengths[i] for i in order])  # Nyquist kept: shells are magnitudes
    u_hat = domain.rfft(u, sorted_dims)  # [B, C, *spectral layout]
    w = domain.hermitian_weight(u, sorted_dims)  # [1, 1, *spec] with 1/2 multiplicities
    density = (w * (u_hat.real ** 2 + u_hat.imag ** 2)).sum(1)  # [B, *spec]
    k_mag = torch.sqrt(sum(k * k for k in ks))[:, 0]  # [1, *spec] (size 1 on untransformed axes)
    shell = torch.round(k_mag / dk).long().expand_as(density)  # [B, *spec]
    B = u.shape[0]
    E = torch.zeros(B, K, dtype=u.dtype, device=u.device)
    E = E.scatter_add(1, shell.reshape(B, -1), density.reshape(B, -1))  # [B, K]
    # Parseval (norm='backward'): mean over all cells of u^2 = sum |u_hat|^2 / (N_flow * N_all)
    E = domain.sum(E) * (0.5 / (domain.numel(u, sorted_dims) * domain.numel(u)))  # [B, K]
    k_shell = torch.arange(K, dtype=u.dtype, device=u.device) * dk  # [K]
    return k_shell, E
