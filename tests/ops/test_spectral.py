"""Spectral operators against analytic plane waves, a dense DFT-matrix reference, the algebraic
properties of the Leray projector (Eq. 43), Parseval, autograd and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgfm_dist.ops.spectral import (
    derivative,
    divergence,
    energy_spectrum,
    gradient,
    laplacian,
    leray_project,
    spectral_apply,
    vorticity,
)

SIZES = {  # d -> (even extents, odd extents); mixed so axes are not interchangeable
    1: ((16,), (15,)),
    2: ((12, 10), (11, 9)),
    3: ((8, 10, 6), (7, 9, 5)),
}
BOXES = {"2pi": None, "other": (3.0, 5.5, 1.25)}
MODES = ((2, -1, 1), (-1, 3, -2))  # integer mode vectors of two plane waves (clipped below Nyquist)
DTYPES = (torch.float64, torch.float32)


def _tol(dtype, scale=1.0):
    """Absolute tolerance for results of magnitude ~scale (float64 to ~1e-12)."""
    return (1e-12 if dtype == torch.float64 else 2e-5) * max(1.0, scale)


def _setup(d, parity, box, dtype):
    shape = SIZES[d][parity == "odd"]
    lengths = None if BOXES[box] is None else BOXES[box][:d]
    L = [2 * math.pi] * d if lengths is None else list(lengths)
    # coordinates x_i = L_i j / n_i, each [1, 1, *S]-broadcastable
    xs = []
    for i, n in enumerate(shape):
        s = [1, 1] + [1] * d
        s[2 + i] = n
        xs.append((torch.arange(n, dtype=torch.float64) * (L[i] / n)).reshape(s))
    return shape, lengths, L, xs


def _wave(xs, L, shape, mode, phase=0.3):
    """theta = k.x + phase and the wavevector k (angular), mode clipped below Nyquist."""
    m = [max(-((n - 1) // 2), min((n - 1) // 2, mi)) for mi, n in zip(mode, shape)]
    k = [2 * math.pi * mi / Li for mi, Li in zip(m, L)]
    theta = sum(ki * x for ki, x in zip(k, xs)) + phase
    return theta, k


# ---- analytic plane waves -------------------------------------------------------------------
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_derivative_of_plane_wave(d, dtype, box, parity):
    shape, lengths, L, xs = _setup(d, parity, box, dtype)
    theta, k = _wave(xs, L, shape, MODES[0][:d])
    u = torch.sin(theta).to(dtype)  # [1, 1, *S]
    for i in range(d):
        for order in (1, 2, 3):
            # d^m/dx^m sin(theta) = k^m sin(theta + m pi/2)
            want = (k[i] ** order * torch.sin(theta + order * math.pi / 2)).to(dtype)
            got = derivative(u, 2 + i, order, length=L[i])
            assert got.dtype == dtype and got.shape == u.shape
            torch.testing.assert_close(got, want, atol=_tol(dtype, abs(k[i]) ** order), rtol=0)
            # negative axis index names the same axis
            torch.testing.assert_close(derivative(u, 2 + i - u.ndim, order, length=L[i]), got)


@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_gradient_divergence_laplacian_of_plane_waves(d, dtype, box, parity):
    shape, lengths, L, xs = _setup(d, parity, box, dtype)
    axes = tuple(range(2, 2 + d))
    waves = [_wave(xs, L, shape, m[:d], phase=0.3 + j) for j, m in enumerate(MODES)]
    f = torch.cat([torch.cos(t) for t, _ in waves], dim=1).to(dtype)  # [1, 2, *S]
    kmax2 = max(sum(ki * ki for ki in k) for _, k in waves)

    g = gradient(f, axes, lengths)  # [1, 2d, *S], channel c*d + i = d f_c / d axes[i]
    want_g = torch.cat([-k[i] * torch.sin(t) for t, k in waves for i in range(d)], dim=1).to(dtype)
    torch.testing.assert_close(g, want_g, atol=_tol(dtype, math.sqrt(kmax2)), rtol=0)

    # divergence of v_i = cos(theta) * a_i is -(k.a) sin(theta), one group per wave
    a = [0.7, -1.3, 0.4][:d]
    v = torch.cat([torch.cos(t) * ai for t, _ in waves for ai in a], dim=1).to(dtype)  # [1, 2d, *S]
    want_div = torch.cat([-sum(ki * ai for ki, ai in zip(k, a)) * torch.sin(t) for t, k in waves], 1).to(dtype)
    torch.testing.assert_close(divergence(v, axes, lengths), want_div, atol=_tol(dtype, 3 * math.sqrt(kmax2)), rtol=0)

    want_lap = torch.cat([-sum(ki * ki for ki in k) * torch.cos(t) for t, k in waves], dim=1).to(dtype)
    torch.testing.assert_close(laplacian(f, axes, lengths), want_lap, atol=_tol(dtype, kmax2), rtol=0)


@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,axes", [(2, (2, 3)), (3, (3, 4)), (3, (2, 3, 4))])
def test_vorticity_of_plane_waves(d, axes, dtype, box, parity):
    shape, _, L, xs = _setup(d, parity, box, dtype)
    k_flow = len(axes)
    lengths = tuple(L[a - 2] for a in axes)
    theta, k_full = _wave(xs, L, shape, MODES[1][:d])
    k = [k_full[a - 2] for a in axes]
    c = [0.5, -1.5, 2.0][:k_flow]
    v = torch.cat([ci * torch.cos(theta) for ci in c], dim=1).to(dtype)  # [1, k, *S]
    # d_j v_i = -c_i k_j sin(theta)
    if k_flow == 2:
        want = (c[1] * k[0] - c[0] * k[1]) * torch.sin(theta)  # d v_0/d a_1 - d v_1/d a_0
    else:
        want = torch.cat([(k[(i + 1) % 3] * c[(i + 2) % 3] - k[(i + 2) % 3] * c[(i + 1) % 3]) * torch.sin(theta)
                          for i in range(3)], dim=1)  # (k x c) sin(theta), left-handed index order
    got = vorticity(v, axes, lengths)
    torch.testing.assert_close(got, want.to(dtype), atol=_tol(dtype, 4 * max(map(abs, k))), rtol=0)


def test_vorticity_sign_for_y_x_axes():
    """Documents the convention: on (y, x) axes with components (v_y, v_x), vorticity returns
    the usual w_z = d_x v_y - d_y v_x (tensor axis order is (.., y, x))."""
    n = 16
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    v_y = torch.sin(x).expand(n, n)  # varies along x only: w_z = d_x v_y = cos x
    v = torch.stack([v_y, torch.zeros_like(v_y)])[None]  # [1, 2, y, x]
    w = vorticity(v, (-2, -1))
    torch.testing.assert_close(w[0, 0], torch.cos(x).expand(n, n), atol=1e-12, rtol=0)


# ---- dense DFT reference --------------------------------------------------------------------
def _dense_derivative_matrix(n, order, length):
    """F^-1 diag((i k)^order) F built from an explicit DFT matrix (Nyquist dropped for odd order)."""
    j = np.arange(n)
    F = np.exp(-2j * np.pi * np.outer(j, j) / n)  # [n, n]
    m = np.fft.fftfreq(n, 1.0 / n).round()
    if order % 2 == 1 and n % 2 == 0:
        m[n // 2] = 0.0
    sym = (1j * 2 * np.pi * m / length) ** order
    return (np.conj(F).T / n) @ np.diag(sym) @ F  # [n, n], real up to round-off


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_derivative_matches_dense_dft_matrix(d, dtype, box, parity, order):
    shape, _, L, _ = _setup(d, parity, box, dtype)
    u = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(d + order))
    for i in range(d):
        D = _dense_derivative_matrix(shape[i], order, L[i])
        assert np.abs(D.imag).max() < 1e-9
        want = torch.from_numpy(np.moveaxis(np.moveaxis(u.numpy(), 2 + i, -1) @ D.real.T, -1, 2 + i))
        got = derivative(u.to(dtype), 2 + i, order, length=L[i])
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want.to(dtype), atol=_tol(dtype, scale) * 10, rtol=0)


@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,axes", [(2, (2, 3)), (3, (3, 4)), (3, (2, 3, 4)), (3, (4, 2))])
def test_vector_operators_compose_single_axis_derivatives(d, axes, dtype, parity):
    """On random fields (Nyquist content included) gradient / divergence / vorticity / Laplacian
    equal their definitions in terms of ``derivative`` (itself checked against the dense DFT)."""
    shape, _, _, _ = _setup(d, parity, "other", dtype)
    lengths = tuple(BOXES["other"][a - 2] for a in axes)
    k = len(axes)
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(2, 2 * k, *shape, dtype=dtype, generator=gen)  # two groups
    D = lambda x, i, m=1: derivative(x, axes[i], m, length=lengths[i])  # noqa: E731
    tol = _tol(dtype, 100.0)
    grad_want = torch.stack([D(v, i) for i in range(k)], dim=2).flatten(1, 2)  # channel c*k + i
    torch.testing.assert_close(gradient(v, axes, lengths), grad_want, atol=tol, rtol=0)
    comps = v.unflatten(1, (2, k))  # [B, G, k, *S]
    div_want = sum(D(comps[:, :, i], i) for i in range(k))
    torch.testing.assert_close(divergence(v, axes, lengths), div_want, atol=tol, rtol=0)
    torch.testing.assert_close(laplacian(v, axes, lengths), sum(D(v, i, 2) for i in range(k)), atol=tol, rtol=0)
    c = [comps[:, :, i] for i in range(k)]
    if k == 2:
        w_want = D(c[0], 1) - D(c[1], 0)
    else:
        w_want = torch.stack([D(c[(i + 1) % 3], (i + 2) % 3) - D(c[(i + 2) % 3], (i + 1) % 3) for i in range(3)],
                             dim=2).flatten(1, 2)
    torch.testing.assert_close(vorticity(v, axes, lengths), w_want, atol=tol, rtol=0)


# ---- Leray projection ------------------------------------------------------------------------
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_leray_projection_properties(d, dtype, box, parity):
    shape, lengths, L, xs = _setup(d, parity, box, dtype)
    axes = tuple(range(2, 2 + d))
    gen = torch.Generator().manual_seed(7 + d)
    v = torch.randn(2, 2 * d, *shape, dtype=dtype, generator=gen)  # two groups of d components
    w = torch.randn(2, 2 * d, *shape, dtype=dtype, generator=gen)
    tol = _tol(dtype, 10.0)

    pv = leray_project(v, axes, lengths)
    assert pv.shape == v.shape and pv.dtype == dtype
    torch.testing.assert_close(leray_project(pv, axes, lengths), pv, atol=tol, rtol=0)  # idempotent
    lhs = (pv * w).sum(dtype=torch.float64)
    rhs = (v * leray_project(w, axes, lengths)).sum(dtype=torch.float64)
    assert abs(float(lhs - rhs)) < tol * v.numel()  # self-adjoint
    div = divergence(pv, axes, lengths)
    assert float(div.abs().max()) < _tol(dtype, 10 * max(shape) * 2 * math.pi / min(L))  # divergence-free

    # gradients project to zero; the mean flow is passed through unchanged
    phi = torch.randn(2, 2, *shape, dtype=dtype, generator=gen)
    torch.testing.assert_close(leray_project(gradient(phi, axes, lengths), axes, lengths),
                               torch.zeros_like(v), atol=tol, rtol=0)
    mean = torch.randn(2, 2 * d, *[1] * d, dtype=dtype, generator=gen).expand_as(v)
    torch.testing.assert_close(leray_project(mean, axes, lengths), mean, atol=tol, rtol=0)

    # an analytic divergence-free field a cos(k.x) with a perpendicular to k is unchanged
    theta, k = _wave(xs, L, shape, MODES[0][:d])
    if d == 1:
        a = [0.0]  # in 1-D only the mean is divergence-free: a*cos(kx) with a != 0 projects to 0
        torch.testing.assert_close(leray_project(torch.cos(theta).to(dtype), axes, lengths),
                                   torch.zeros(1, 1, *shape, dtype=dtype), atol=tol, rtol=0)
    elif d == 2:
        a = [k[1], -k[0]]
    else:
        a = [k[1], -k[0], 0.0] if (k[0] or k[1]) else [1.0, 0.0, 0.0]
    sol = torch.cat([ai * torch.cos(theta) for ai in a], dim=1).to(dtype)  # [1, d, *S]
    torch.testing.assert_close(leray_project(sol, axes, lengths), sol, atol=tol, rtol=0)


def test_leray_projection_on_flow_subset_and_axis_order():
    """Flow axes a subset of the field axes (spatial (y, x) of a (t, y, x) field), given in
    either order: component i follows axes[i]."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 4, 5, 8, 6, dtype=torch.float64, generator=gen)  # [B, G*2, t, y, x]
    p_yx = leray_project(v, (-2, -1), (2.0, 3.0))
    swap = [1, 0, 3, 2]  # (v_y, v_x) -> (v_x, v_y) per group
    p_xy = leray_project(v[:, swap], (-1, -2), (3.0, 2.0))
    torch.testing.assert_close(p_xy[:, swap], p_yx, atol=1e-12, rtol=0)
    # each time slice is projected on its own
    torch.testing.assert_close(leray_project(v[:, :, 2:3], (-2, -1), (2.0, 3.0)), p_yx[:, :, 2:3])
    g_yx = gradient(v[:, :1], (3, 4))
    g_xy = gradient(v[:, :1], (4, 3))
    torch.testing.assert_close(g_xy, g_yx[:, [1, 0]], atol=1e-12, rtol=0)


# ---- energy spectrum --------------------------------------------------------------------------
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_energy_spectrum(d, dtype, box, parity):
    shape, lengths, L, xs = _setup(d, parity, box, dtype)
    axes = tuple(range(2, 2 + d))
    u = torch.randn(3, 2, *shape, dtype=dtype, generator=torch.Generator().manual_seed(d))
    k_shell, E = energy_spectrum(u, axes, lengths)
    dk = 2 * math.pi / min(L)
    K = round(math.sqrt(sum(((n // 2) * 2 * math.pi / Li) ** 2 for n, Li in zip(shape, L))) / dk) + 1
    assert E.shape == (3, K) and k_shell.shape == (K,) and E.dtype == dtype
    torch.testing.assert_close(k_shell, torch.arange(K, dtype=dtype) * dk)
    assert float(E.min()) >= 0
    parseval = 0.5 * (u.double() ** 2).sum(1).flatten(1).mean(1)  # [B]
    torch.testing.assert_close(E.double().sum(-1), parseval, atol=_tol(dtype), rtol=_tol(dtype))

    # a single mode lands in shell round(|k|/dk) with all of its energy
    theta, k = _wave(xs, L, shape, MODES[1][:d])
    one = (2.0 * torch.cos(theta)).to(dtype)  # energy 0.5 * mean(4 cos^2) = 1
    _, E1 = energy_spectrum(one, axes, lengths)
    s = round(math.sqrt(sum(ki * ki for ki in k)) / dk)
    want = torch.zeros(1, K, dtype=dtype)
    want[0, s] = 1.0
    torch.testing.assert_close(E1, want, atol=_tol(dtype, 10), rtol=0)


def test_energy_spectrum_of_spatial_axes_averages_time():
    """A (t, y, x) field with the spectrum over (y, x): the mean of per-slice spectra."""
    u = torch.randn(2, 3, 4, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k, E = energy_spectrum(u, (-2, -1))
    per_slice = torch.stack([energy_spectrum(u[:, :, t], (-2, -1))[1] for t in range(4)])
    torch.testing.assert_close(E, per_slice.mean(0), atol=1e-14, rtol=0)


# ---- autograd ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axes", [((6,), (2,)), ((5, 4), (2, 3)), ((2, 3, 4), (3, 4)), ((3, 2, 4), (2, 3, 4))])
def test_gradcheck(shape, axes):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(1, 1, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    L = 3.0
    assert torch.autograd.gradcheck(lambda x: derivative(x, axes[-1], 1, length=L), (u,))
    assert torch.autograd.gradcheck(lambda x: derivative(x, axes[0], 2, length=L), (u,))
    v = torch.randn(1, len(axes), *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: leray_project(x, axes, [L] * len(axes)), (v,))
    assert torch.autograd.gradcheck(lambda x: energy_spectrum(x, axes)[1], (u,))


# ---- bad input --------------------------------------------------------------------------------
def test_bad_input():
    v = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"C=3 is not divisible by k=2"):
        leray_project(v, (2, 3))
    with pytest.raises(ValueError, match=r"C=3 is not divisible by k=2"):
        divergence(v, (2, 3))
    with pytest.raises(ValueError, match=r"C=3 is not divisible by k=2"):
        vorticity(v, (-2, -1))
    with pytest.raises(ValueError, match="complex"):
        derivative(torch.randn(1, 1, 8, dtype=torch.complex64), 2)
    with pytest.raises(ValueError, match="floating"):
        laplacian(torch.ones(1, 1, 8, dtype=torch.int64), (2,))
    with pytest.raises(ValueError, match="not a field axis"):
        derivative(v, 1)  # the channel dim
    with pytest.raises(ValueError, match="not a field axis"):
        gradient(v, (2, 4))
    with pytest.raises(ValueError, match="repeats"):
        gradient(v, (2, -2))
    with pytest.raises(ValueError, match="order"):
        derivative(v, 2, order=0)
    with pytest.raises(ValueError, match="2 or 3 flow axes"):
        vorticity(v, (2,))
    with pytest.raises(ValueError, match="lengths"):
        laplacian(v, (2, 3), lengths=(1.0,))
    with pytest.raises(ValueError, match="lengths"):
        laplacian(v, (2, 3), lengths=(1.0, -2.0))
    with pytest.raises(ValueError, match="axes"):
        laplacian(v, 2)
    with pytest.raises(ValueError, match="spectral dims"):
        spectral_apply(v, (2, 3), lambda uh, ks: uh[..., :1])


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(2, 6, 6, 8, 7, dtype=dtype, generator=gen)  # [B, G*3, *S]
    axes, L = (2, 3, 4), (1.0, 2.0, 3.0)
    tol = _tol(dtype, 100.0)
    for fn in (lambda x: derivative(x, 3, 1, 2.0), lambda x: gradient(x, axes, L), lambda x: divergence(x, axes, L),
               lambda x: laplacian(x, axes, L), lambda x: leray_project(x, axes, L), lambda x: vorticity(x, axes, L),
               lambda x: energy_spectrum(x, axes, L)[1]):
        torch.testing.assert_close(fn(v.cuda()).cpu(), fn(v), atol=tol, rtol=tol)
