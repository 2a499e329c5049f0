"""Finite differences against textbook stencil tables, dense circulant matrices, the exact
discrete symbol on plane waves, observed convergence orders, autograd and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgfm_dist.ops.domain import LocalDomain
from sgfm_dist.ops.finite_diff import (
    central_stencil,
    fd_derivative,
    fd_divergence,
    fd_gradient,
    fd_laplacian,
    one_sided_stencils,
    stencil_halo,
)

# Textbook central stencils (Fornberg 1988, Table 1): (order, accuracy) -> {offset: coefficient}
TABLE = {
    (1, 2): {-1: -1 / 2, 1: 1 / 2},
    (1, 4): {-2: 1 / 12, -1: -2 / 3, 1: 2 / 3, 2: -1 / 12},
    (2, 2): {-1: 1.0, 0: -2.0, 1: 1.0},
    (2, 4): {-2: -1 / 12, -1: 4 / 3, 0: -5 / 2, 1: 4 / 3, 2: -1 / 12},
}
SIZES = {1: ((16,), (15,)), 2: ((12, 10), (11, 9)), 3: ((8, 10, 6), (7, 9, 5))}
BOXES = {"2pi": None, "other": (3.0, 5.5, 1.25)}
DTYPES = (torch.float64, torch.float32)


def _tol(dtype, scale=1.0):
    return (1e-12 if dtype == torch.float64 else 3e-5) * max(1.0, scale)


# ---- stencils ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order,accuracy", list(TABLE))
def test_central_stencil_matches_table(order, accuracy):
    offsets, coeffs = central_stencil(order, accuracy)
    assert dict(zip(offsets, coeffs)) == pytest.approx(TABLE[(order, accuracy)], abs=1e-15)
    assert list(offsets) == sorted(offsets)


@pytest.mark.parametrize("accuracy", [2, 4, 6])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_central_stencil_moments_and_halo(order, accuracy):
    """sum_j c_j o_j^q = q! [q == order] for every q below order + accuracy (exact on those
    polynomials, so truncation error O(h^accuracy)); the halo is the stencil's reach."""
    offsets, coeffs = central_stencil(order, accuracy)
    o = np.array(offsets, dtype=np.float64)
    c = np.array(coeffs)
    for q in range(order + accuracy):
        assert float((c * o ** q).sum()) == pytest.approx(math.factorial(q) * (q == order), abs=1e-9)
    assert stencil_halo(order, accuracy) == max(abs(x) for x in offsets)


@pytest.mark.parametrize("accuracy", [2, 4, 6])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_one_sided_stencils_moments(order, accuracy):
    rows = one_sided_stencils(order, accuracy)
    assert len(rows) == stencil_halo(order, accuracy)
    for j, (offsets, coeffs) in enumerate(rows):
        assert min(offsets) == -j  # never reaches before the first point
        o = np.array(offsets, dtype=np.float64)
        for q in range(order + accuracy):
            assert float((np.array(coeffs) * o ** q).sum()) == pytest.approx(math.factorial(q) * (q == order), abs=1e-8)


# ---- dense circulant reference and exact discrete symbol -------------------------------------
def _circulant(n, order, accuracy, h):
    """Dense periodic difference matrix from the textbook table (offsets wrapped mod n)."""
    M = np.zeros((n, n))
    for o, c in TABLE[(order, accuracy)].items():
        for r in range(n):
            M[r, (r + o) % n] += c
    return M / h ** order


@pytest.mark.parametrize("order,accuracy", list(TABLE))
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_fd_derivative_matches_dense_circulant(d, dtype, box, parity, order, accuracy):
    shape = SIZES[d][parity == "odd"]
    L = [2 * math.pi] * d if BOXES[box] is None else list(BOXES[box][:d])
    u = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    for i in range(d):
        h = L[i] / shape[i]
        M = _circulant(shape[i], order, accuracy, h)
        want = torch.from_numpy(np.moveaxis(np.moveaxis(u.numpy(), 2 + i, -1) @ M.T, -1, 2 + i))
        spacing = None if BOXES[box] is None else h  # default spacing is 2*pi / n
        got = fd_derivative(u.to(dtype), 2 + i, order, accuracy, spacing)
        assert got.dtype == dtype and got.shape == u.shape
        torch.testing.assert_close(got, want.to(dtype), atol=_tol(dtype, float(want.abs().max())), rtol=0)
        torch.testing.assert_close(fd_derivative(u.to(dtype), 2 + i - u.ndim, order, accuracy, spacing), got)


def _symbol(k, h, order, accuracy):
    """A central stencil maps exp(i k x) to sigma * exp(i k x)."""
    return sum(c * np.exp(1j * k * o * h) for o, c in TABLE[(order, accuracy)].items()) / h ** order


@pytest.mark.parametrize("accuracy", [2, 4])
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_fd_vector_operators_on_plane_waves(d, dtype, box, parity, accuracy):
    """fd_gradient / fd_divergence / fd_laplacian of cos(k.x + phi) equal Re(sigma e^{i theta})."""
    shape = SIZES[d][parity == "odd"]
    lengths = None if BOXES[box] is None else BOXES[box][:d]
    L = [2 * math.pi] * d if lengths is None else list(lengths)
    h = [Li / n for Li, n in zip(L, shape)]
    xs = []
    for i, n in enumerate(shape):
        s = [1, 1] + [1] * d
        s[2 + i] = n
        xs.append((torch.arange(n, dtype=torch.float64) * h[i]).reshape(s))
    m = [2, -1, 3][:d]
    k = [2 * math.pi * mi / Li for mi, Li in zip(m, L)]
    theta = sum(ki * x for ki, x in zip(k, xs)) + 0.4
    e = torch.exp(1j * theta)  # [1, 1, *S]
    u = torch.cos(theta)
    axes = tuple(range(2, 2 + d))
    s1 = [_symbol(ki, hi, 1, accuracy) for ki, hi in zip(k, h)]
    s2 = [_symbol(ki, hi, 2, accuracy) for ki, hi in zip(k, h)]
    tol = _tol(dtype, 4 * max(abs(x) for x in s2))

    g = fd_gradient(u.to(dtype), axes, lengths, accuracy)  # [1, d, *S]
    want_g = torch.cat([(s * e).real for s in s1], dim=1)
    torch.testing.assert_close(g, want_g.to(dtype), atol=tol, rtol=0)

    a = [0.7, -1.3, 0.4][:d]
    v = torch.cat([ai * u for ai in a] * 2, dim=1)  # two groups, [1, 2d, *S]
    want_div = (sum(ai * s for ai, s in zip(a, s1)) * e).real
    torch.testing.assert_close(fd_divergence(v.to(dtype), axes, lengths, accuracy),
                               torch.cat([want_div] * 2, 1).to(dtype), atol=tol, rtol=0)

    want_lap = (sum(s2) * e).real
    torch.testing.assert_close(fd_laplacian(u.to(dtype), axes, lengths, accuracy), want_lap.to(dtype), atol=tol, rtol=0)


# ---- observed convergence order -----------------------------------------------------------------
def _slope(ns, errs, length):
    return float(np.polyfit(np.log([length / n for n in ns]), np.log(errs), 1)[0])


@pytest.mark.parametrize("order,accuracy", list(TABLE))
@pytest.mark.parametrize("parity", ["even", "odd"])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("d", [1, 2, 3])
def test_periodic_convergence_order(d, box, parity, order, accuracy):
    """u = exp(sin(2 pi x / L)) along one axis (the others fixed and small): the max error
    falls like h^accuracy."""
    L = 2 * math.pi if BOXES[box] is None else BOXES[box][d - 1]
    ns = [24, 48, 96] if parity == "even" else [25, 49, 97]
    axis = 2 + (d - 1) if d != 2 else 2  # the last axis for d=1,3, the first field axis for d=2
    errs = []
    for n in ns:
        shape = [3] * d
        shape[axis - 2] = n
        s = [1, 1] + [1] * d
        s[axis] = n
        x = (torch.arange(n, dtype=torch.float64) * (L / n)).reshape(s)
        w = 2 * math.pi / L
        u = torch.exp(torch.sin(w * x)).expand(1, 2, *shape)
        if order == 1:
            want = w * torch.cos(w * x) * torch.exp(torch.sin(w * x))
        else:
            want = w * w * (torch.cos(w * x) ** 2 - torch.sin(w * x)) * torch.exp(torch.sin(w * x))
        got = fd_derivative(u, axis, order, accuracy, spacing=L / n)
        errs.append(float((got - want).abs().max()))
    assert abs(_slope(ns, errs, L) - accuracy) < 0.3, errs


@pytest.mark.parametrize("order,accuracy", list(TABLE))
@pytest.mark.parametrize("parity", ["even", "odd"])
def test_one_sided_convergence_order(order, accuracy, parity):
    """A non-periodic trajectory u(t) = sin(1.3 t + 0.4) + 0.5 exp(0.4 t) on [0, 2] (both ends
    sampled): the one-sided boundary rows keep the interior's order."""
    T = 2.0
    ns = [24, 48, 96] if parity == "even" else [25, 49, 97]
    errs = []
    for n in ns:
        t = torch.linspace(0, T, n, dtype=torch.float64).reshape(1, 1, n, 1)
        u = (torch.sin(1.3 * t + 0.4) + 0.5 * torch.exp(0.4 * t)).expand(1, 2, n, 4)  # [B, C, t, x]
        if order == 1:
            du = 1.3 * torch.cos(1.3 * t + 0.4) + 0.2 * torch.exp(0.4 * t)
        else:
            du = -1.69 * torch.sin(1.3 * t + 0.4) + 0.08 * torch.exp(0.4 * t)
        got = fd_derivative(u, 2, order, accuracy, spacing=T / (n - 1), boundary="one_sided")
        errs.append(float((got - du).abs().max()))
    assert abs(_slope([n - 1 for n in ns], errs, T) - accuracy) < 0.35, errs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order,accuracy", list(TABLE))
def test_one_sided_exact_on_polynomials(order, accuracy, dtype):
    p = stencil_halo(order, accuracy)
    W = max(2 * p + 1, order + accuracy)
    n = W + 3
    h = 1.0 / (n - 1)
    t = torch.arange(n, dtype=torch.float64) * h
    for q in range(order + accuracy):  # degrees the central interior is also exact on
        u = (t ** q).reshape(1, 1, 1, n)  # the time axis last here: any field axis works
        want = (math.factorial(q) / math.factorial(q - order) * t ** (q - order) if q >= order
                else torch.zeros_like(t)).reshape(1, 1, 1, n)
        got = fd_derivative(u.to(dtype), -1, order, accuracy, spacing=h, boundary="one_sided")
        torch.testing.assert_close(got, want.to(dtype), atol=(1e-8 if dtype == torch.float64 else 2e-1), rtol=0)


# ---- autograd ------------------------------------------------------------------------------------
@pytest.mark.parametrize("boundary", ["periodic", "one_sided"])
@pytest.mark.parametrize("order,accuracy", [(1, 2), (2, 4)])
def test_gradcheck(order, accuracy, boundary):
    u = torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fd_derivative(x, 2, order, accuracy, 0.3, boundary=boundary), (u,))
    if boundary == "periodic":
        assert torch.autograd.gradcheck(lambda x: fd_divergence(x, (2, 3), (2.0, 3.0), accuracy), (u,))
        assert torch.autograd.gradcheck(lambda x: fd_laplacian(x, (3, 2), None, accuracy), (u,))


def test_axis_order_and_channels():
    u = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = fd_gradient(u, (2, 3), (2.0, 3.0))  # channel c*2 + i = d u_c / d axes[i]
    torch.testing.assert_close(g[:, 1::2], torch.stack([fd_derivative(u[:, c:c + 1], 3, spacing=3.0 / 7)[:, 0]
                                                         for c in range(3)], 1))
    torch.testing.assert_close(fd_gradient(u, (3, 2), (3.0, 2.0)), g.unflatten(1, (3, 2)).flip(2).flatten(1, 2))


# ---- bad input -----------------------------------------------------------------------------------
class _SplitAlongTime(LocalDomain):
    """Reports a global extent twice the local one, as a rank holding half of the axis would."""

    def global_extent(self, x, axis):
        return 2 * x.shape[axis]


def test_bad_input():
    u = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"C=3 is not divisible by k=2"):
        fd_divergence(u, (2, 3))
    with pytest.raises(ValueError, match="accuracy"):
        central_stencil(1, 3)
    with pytest.raises(ValueError, match="order"):
        stencil_halo(0, 2)
    with pytest.raises(ValueError, match="boundary"):
        fd_derivative(u, 2, boundary="reflect")
    with pytest.raises(ValueError, match="spacing"):
        fd_derivative(u, 2, spacing=0.0)
    with pytest.raises(ValueError, match="fewer than the 6"):
        fd_derivative(u[:, :, :5], 2, 2, 4, boundary="one_sided")
    with pytest.raises(ValueError, match="split"):
        fd_derivative(u, 2, domain=_SplitAlongTime(), boundary="one_sided")
    with pytest.raises(ValueError, match="complex"):
        fd_laplacian(u.to(torch.complex64), (2, 3))
    with pytest.raises(ValueError, match="not a field axis"):
        fd_derivative(u, 1)
    with pytest.raises(ValueError, match="lengths"):
        fd_gradient(u, (2, 3), (1.0,))


# ---- CUDA -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    v = torch.randn(2, 6, 6, 8, 7, dtype=dtype, generator=torch.Generator().manual_seed(5))
    axes, L = (2, 3, 4), (1.0, 2.0, 3.0)
    for fn in (lambda x: fd_gradient(x, axes, L, 4), lambda x: fd_divergence(x, axes, L),
               lambda x: fd_laplacian(x, axes, L, 4), lambda x: fd_derivative(x, 2, 2, 4, 0.1, boundary="one_sided")):
        want = fn(v)
        torch.testing.assert_close(fn(v.cuda()).cpu(), want, atol=_tol(dtype, float(want.abs().max())), rtol=0)
