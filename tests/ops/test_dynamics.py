"""Navier-Stokes dynamics against exact references: the Taylor-Green vortex (analytic advection,
pressure, drift and viscous decay), plane-wave fields with analytic derivatives, a zero-padded
(alias-free) product, convergence orders of the residual and the integrators, the statistics of
the projected noise, gradcheck and bad input.

Component convention: with flow axes (y, x) = (dims 3, 4) or (2, 3), channel 0 is u_y and
channel 1 is u_x (component i points along flow_axes[i]).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from sgfm_dist.ops import dynamics as D
from sgfm_dist.ops.dynamics import FlowSpec
from sgfm_dist.ops.spectral import divergence, leray_project

TWO_PI = 2.0 * math.pi


@pytest.fixture(autouse=True)
def _one_thread():
    """These fields are tiny: a second intra-op thread only adds contention on the shared 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- fields ---------------------------------------------------------------------------------
def _grid(n: int, length: float = TWO_PI) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) * (length / n)


def _tg_spatial(ny: int, nx: int) -> torch.Tensor:
    """Taylor-Green U = (u_y, u_x) = (-cos x sin y, sin x cos y), [2, Y, X] float64."""
    y, x = torch.meshgrid(_grid(ny), _grid(nx), indexing="ij")
    return torch.stack([-torch.cos(x) * torch.sin(y), torch.sin(x) * torch.cos(y)])


def _tg_advection(ny: int, nx: int) -> torch.Tensor:
    """(U.grad)U of Taylor-Green = (sin 2y / 2, sin 2x / 2), [2, Y, X] (= -grad p, p = -(cos 2x + cos 2y)/4)."""
    y, x = torch.meshgrid(_grid(ny), _grid(nx), indexing="ij")
    return torch.stack([0.5 * torch.sin(2 * y), 0.5 * torch.sin(2 * x)])


def _tg_trajectory(nt: int, dt: float, nu: float, n: int = 8) -> torch.Tensor:
    """Exact decaying Taylor-Green u = U e^{-2 nu t} on a (t, y, x) grid, [1, 2, T, Y, X]."""
    t = torch.arange(nt, dtype=torch.float64) * dt
    return (_tg_spatial(n, n)[:, None] * torch.exp(-2 * nu * t)[:, None, None])[None]


def _random_solenoidal(shape, n_modes: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A smooth random divergence-free field [B, G*k, *S] over all field axes: random Fourier
    coefficients with integer |n_i| <= n_modes, then P."""
    g = torch.Generator().manual_seed(seed)
    b, c, *s = shape
    axes = tuple(range(2, 2 + len(s)))
    xh = torch.fft.rfftn(torch.randn(shape, generator=g, dtype=torch.float64), dim=axes)
    for i, n in enumerate(s):
        f = torch.fft.rfftfreq(n, 1.0 / n) if i == len(s) - 1 else torch.fft.fftfreq(n, 1.0 / n)
        keep = (f.abs() <= n_modes).to(torch.float64)
        xh = xh * keep.reshape([-1 if j == i else 1 for j in range(len(s))])
    u = torch.fft.irfftn(xh, s=s, dim=axes)
    u = leray_project(u, axes)
    return (u / u.std()).to(dtype)


# ---- FlowSpec and bad input ---------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(flow_axes=3), "flow_axes"),
    (dict(flow_axes=()), "flow_axes"),
    (dict(flow_axes=(1, 2)), "flow_axes"),
    (dict(flow_axes=(3, 2)), "strictly increasing"),
    (dict(flow_axes=(2, 3, 4, 5)), "flow_axes"),
    (dict(flow_axes=(3, 4), time_axis=1), "time_axis"),
    (dict(flow_axes=(3, 4), lengths=(1.0,)), "lengths"),
    (dict(flow_axes=(3, 4), lengths=(1.0, -2.0)), "lengths"),
    (dict(flow_axes=(3, 4), dt=0.0), "dt"),
    (dict(flow_axes=(3, 4), nu=-1.0), "nu"),
    (dict(flow_axes=(3, 4), nu=float("nan")), "nu"),
    (dict(flow_axes=(3, 4), derivative="fd6"), "derivative"),
    (dict(flow_axes=(3, 4), time_derivative="central"), "time_derivative"),
    (dict(flow_axes=(3, 4), dealias=1), "dealias"),
])
def test_flowspec_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowSpec(**kwargs)


def test_bad_inputs():
    spec = FlowSpec((2, 3))
    u = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="C=3 is not divisible by k=2"):
        D.advection(torch.zeros(1, 3, 8, 8), spec)
    with pytest.raises(ValueError, match="float32 or float64"):
        D.projected_drift(u.half(), spec)
    with pytest.raises(ValueError, match="real floating"):
        D.projected_drift(u.long(), spec)
    with pytest.raises(ValueError, match="real floating"):
        D.projected_drift(u.to(torch.complex128), spec)
    with pytest.raises(ValueError, match="spec.flow_axes"):
        D.advection(u, FlowSpec((3, 4)))
    with pytest.raises(ValueError, match="spec.time_axis"):
        D.residual(u, spec)  # no time axis
    with pytest.raises(ValueError, match="spec.time_axis"):
        D.physics_energy(torch.zeros(1, 2, 4, 8, 8), FlowSpec((3, 4), time_axis=5))
    with pytest.raises(ValueError, match="forcing: shape"):
        D.projected_drift(u, spec, forcing=torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="forcing"):
        D.projected_drift(u, spec, forcing=lambda v: 1.0)
    with pytest.raises(ValueError, match="spec: expected a FlowSpec"):
        D.advection(u, {"flow_axes": (2, 3)})
    st = FlowSpec((3, 4), time_axis=2)
    with pytest.raises(ValueError, match="spec.time_axis: the integrators"):
        D.rk4_step(torch.zeros(1, 2, 4, 8, 8), 0.1, st)
    for bad_dt in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="dt"):
            D.rk4_step(u, bad_dt, spec)
    with pytest.raises(ValueError, match="noise_std"):
        D.euler_maruyama_step(u, 0.1, spec, noise_std=-1.0)
    with pytest.raises(ValueError, match="noise: expected"):
        D.euler_maruyama_step(u, 0.1, spec, noise_std=1.0, noise=torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="method"):
        D.integrate(u, 2, 0.1, spec, method="heun")
    with pytest.raises(ValueError, match="noise_std"):
        D.integrate(u, 2, 0.1, spec, method="rk4", noise_std=0.1)
    with pytest.raises(ValueError, match="n_steps"):
        D.integrate(u, -1, 0.1, spec)
    with pytest.raises(ValueError, match="coefficients"):
        D.etdrk4_step(u, 0.1, spec, coefficients=D.etdrk4_coefficients(u, 0.2, spec))


# ---- advection, drift and the viscous term --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dealias", [False, True])
@pytest.mark.parametrize("n", [16, 15])
def test_taylor_green_advection_and_drift(n, dealias, dtype):
    """(u.grad)u = (sin 2y, sin 2x)/2 (a pure gradient), so P[-(u.grad)u + nu Lap u] = -2 nu u = d_t u."""
    nu = 0.07
    spec = FlowSpec((2, 3), nu=nu, dealias=dealias)
    u = _tg_spatial(n, n)[None].to(dtype)                                   # [1, 2, Y, X]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    adv = D.advection(u, spec)
    assert adv.dtype == dtype
    torch.testing.assert_close(adv, _tg_advection(n, n)[None].to(dtype), atol=tol, rtol=0)
    torch.testing.assert_close(D.viscous_term(u, spec), -2 * nu * u, atol=tol, rtol=0)
    # the analytic time derivative of u = U e^{-2 nu t} at t = 0
    torch.testing.assert_close(D.projected_drift(u, spec), -2 * nu * u, atol=tol, rtol=0)
    # P removes the advection entirely: it is -grad p
    assert D.project(adv, spec).abs().max() < tol


@pytest.mark.parametrize("forcing_kind", [None, "tensor", "callable"])
@pytest.mark.parametrize("dealias", [False, True])
@pytest.mark.parametrize("derivative", ["spectral", "fd4"])
def test_fused_drift_and_residual_match_termwise(derivative, dealias, forcing_kind):
    """The FFT-fused drift and projected residual equal P applied to the separately computed terms."""
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 4, 6, 10, 9, generator=g, dtype=torch.float64)       # G = 2 groups, (t, y, x)
    f = torch.randn(1, 4, 1, 10, 9, generator=g, dtype=torch.float64)       # broadcasts over B and t
    forcing = {None: None, "tensor": f, "callable": lambda v: f * v.tanh()}[forcing_kind]
    fval = 0 if forcing is None else (f if forcing_kind == "tensor" else f * u.tanh())
    spec = FlowSpec((3, 4), time_axis=2, lengths=(3.0, 4.5), dt=0.3, nu=0.2, derivative=derivative,
                    dealias=dealias, time_derivative="one_sided4")
    terms = -D.advection(u, spec) + D.viscous_term(u, spec) + fval
    torch.testing.assert_close(D.projected_drift(u, spec, forcing), D.project(terms, spec), atol=1e-12, rtol=0)
    torch.testing.assert_close(D.projected_residual(u, spec, forcing), D.project(D.residual(u, spec, forcing), spec),
                               atol=1e-11, rtol=0)
    torch.testing.assert_close(D.residual(u, spec, forcing), D.time_derivative(u, spec) - terms, atol=1e-12, rtol=0)


def _plane_wave_field(shape, flow_axes, lengths, seed):
    """u with analytic derivatives: component c = sum_m a_cm sin(k_m . x + phi_cm), two waves.

    Returns (u, grad) with grad[b, c, j] = d u_c / d flow_axes[j], float64, waves well below
    the 2/3 band so the dealiased product is also exact."""
    rng = np.random.default_rng(seed)
    b, c, *s = shape
    xs = []
    for dim in range(2, len(shape)):
        n = shape[dim]
        length = lengths[flow_axes.index(dim)] if dim in flow_axes else TWO_PI
        sh = [1] * len(shape)
        sh[dim] = n
        xs.append(_grid(n, length).reshape(sh))
    u = torch.zeros(shape, dtype=torch.float64)
    grad = torch.zeros((b, c, len(flow_axes), *s), dtype=torch.float64)
    for _ in range(2):
        modes = rng.integers(-1, 2, size=len(s))
        modes[0] = 1  # never the zero vector
        k = []
        for i, dim in enumerate(range(2, len(shape))):
            length = lengths[flow_axes.index(dim)] if dim in flow_axes else TWO_PI
            k.append(TWO_PI * modes[i] / length)
        theta = sum(ki * x for ki, x in zip(k, xs))
        for ch in range(c):
            a, phi = rng.normal(), rng.uniform(0, TWO_PI)
            u[:, ch] += (a * torch.sin(theta + phi))[:, 0]
            for j, dim in enumerate(flow_axes):
                grad[:, ch, j] += (a * k[dim - 2] * torch.cos(theta + phi))[:, 0]
    return u, grad


CASES = {  # name -> (field shape, flow axes, time axis, lengths)
    "2d_two_groups": ((2, 4, 12, 10), (2, 3), None, (3.0, 5.5)),
    "3d": ((1, 3, 8, 10, 7), (2, 3, 4), None, (TWO_PI, 2.0, 4.0)),
    "space_time": ((1, 2, 5, 12, 10), (3, 4), 2, (TWO_PI, 7.0)),
}


@pytest.mark.parametrize("derivative", ["spectral", "fd4"])
@pytest.mark.parametrize("dealias", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_advection_plane_waves(case, dealias, derivative):
    """(u.grad)u against analytic derivatives, per channel group, anisotropic boxes, k = 2 and 3,
    and flow axes that are a subset of the field axes."""
    shape, flow_axes, time_axis, lengths = CASES[case]
    if derivative == "fd4":  # refine so the O(h^4) stencil error is small
        shape = shape[:2] + tuple(4 * n if 2 + i in flow_axes else n for i, n in enumerate(shape[2:]))
    u, grad = _plane_wave_field(shape, flow_axes, lengths, seed=len(case))
    spec = FlowSpec(flow_axes, time_axis=time_axis, lengths=lengths, derivative=derivative, dealias=dealias)
    b, c, *s = shape
    k = len(flow_axes)
    vel = u.reshape(b, c // k, 1, k, *s)
    expected = (vel * grad.reshape(b, c // k, k, k, *s)).sum(3).reshape(shape)    # [B, G*k, *S]
    tol = 1e-11 if derivative == "spectral" else 2e-3
    torch.testing.assert_close(D.advection(u, spec), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("n", [48, 64, 15])
def test_dealias_mask_and_alias_free_product(n):
    """The mask keeps exactly 3|m| < N, and the dealiased advection equals the exact product of
    the truncated field computed without aliasing on a 2x grid (zero padding), truncated again."""
    spec = FlowSpec((2, 3), dealias=True)
    u = torch.zeros(1, 2, n, n, dtype=torch.float64)
    mask = D.dealias_mask(u, (2, 3))
    fy = torch.fft.fftfreq(n, 1.0 / n).reshape(-1, 1)
    fx = torch.fft.rfftfreq(n, 1.0 / n).reshape(1, -1)
    expected = ((3 * fy.abs() < n) & (3 * fx.abs() < n)).to(torch.float64)
    torch.testing.assert_close(mask.reshape(expected.shape), expected, atol=0, rtol=0)

    g = torch.Generator().manual_seed(n)
    u = leray_project(torch.randn(1, 2, n, n, generator=g, dtype=torch.float64), (2, 3))  # full band
    uh = torch.fft.rfftn(u, dim=(2, 3)) * expected                              # truncated spectrum
    u = torch.fft.irfftn(uh, s=(n, n), dim=(2, 3))
    # the same band-limited field on a 2n grid (zero padding): there the product of two fields
    # with |m| < n/3 has |m| < 2n/3 < n, below the fine Nyquist, so it is computed without aliasing
    rows_small = torch.cat([torch.arange((n + 1) // 2), torch.arange(n - n // 2, n)])
    rows_big = torch.cat([torch.arange((n + 1) // 2), torch.arange(2 * n - n // 2, 2 * n)])
    big = torch.zeros(1, 2, 2 * n, n + 1, dtype=torch.complex128)
    big[:, :, rows_big, : n // 2 + 1] = uh[:, :, rows_small]
    ub = torch.fft.irfftn(big, s=(2 * n, 2 * n), dim=(2, 3)) * 4                 # norm 1/N: 4x more cells
    adv_hat = torch.fft.rfftn(D.advection(ub, FlowSpec((2, 3))), dim=(2, 3)) / 4
    ref_hat = adv_hat[:, :, rows_big, : n // 2 + 1] * expected                   # back to n, truncated
    ref = torch.fft.irfftn(ref_hat, s=(n, n), dim=(2, 3))
    torch.testing.assert_close(D.advection(u, spec), ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("derivative", ["spectral", "fd2", "fd4"])
def test_laplacian_symbol_matches_operator(derivative):
    """The ETDRK4 linear symbol is exactly the configured discrete Laplacian."""
    spec = FlowSpec((2, 3), lengths=(3.0, 5.0), derivative=derivative)
    u = torch.randn(2, 2, 12, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sym = D._laplacian_symbol(u, spec, D.LOCAL)
    via_symbol = torch.fft.irfftn(torch.fft.rfftn(u, dim=(2, 3)) * sym, s=(12, 9), dim=(2, 3))
    torch.testing.assert_close(via_symbol, D.viscous_term(u, dataclasses.replace(spec, nu=1.0)),
                               atol=1e-10, rtol=0)


def test_phi_functions_against_mpmath():
    """phi_1..3 used by ETDRK4, on both sides of the series/recurrence switch, against 50 digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    zs = [0.0, -1e-12, -1e-6, -0.3, -0.999, -1.0, -1.001, -2.5, -17.0, -300.0, -1e5]
    got = D._phi_functions(torch.tensor(zs, dtype=torch.float64))

    def phi(k, z):
        z = mpmath.mpf(z)
        if z == 0:
            return mpmath.mpf(1) / mpmath.factorial(k)
        taylor = sum(z ** n / mpmath.factorial(n) for n in range(k))
        return (mpmath.exp(z) - taylor) / z ** k

    for k, values in zip((1, 2, 3), got):
        ref = torch.tensor([float(phi(k, z)) for z in zs], dtype=torch.float64)
        torch.testing.assert_close(values, ref, rtol=1e-14, atol=0)


# ---- residual and physics energy -----------------------------------------------------------
def _slope(dts, errs) -> float:
    return float(np.polyfit(np.log(dts), np.log(errs), 1)[0])


@pytest.mark.parametrize("time_derivative,order", [("one_sided2", 2), ("one_sided4", 4)])
def test_taylor_green_residual_converges(time_derivative, order):
    """On the exact decaying vortex R(u) = -grad p is O(1) but P R(u) -> 0 at the order of the
    time stencil as dt is refined."""
    nu, t_end = 0.5, 1.0
    dts, errs = [], []
    for nt in (9, 17, 33, 65):
        dt = t_end / (nt - 1)
        u = _tg_trajectory(nt, dt, nu)
        spec = FlowSpec((3, 4), time_axis=2, dt=dt, nu=nu, time_derivative=time_derivative)
        r = D.residual(u, spec)
        assert r.square().mean().sqrt() > 0.1                              # the pressure gradient
        dts.append(dt)
        # max norm: the one-sided end rows dominate, and an RMS would credit their shrinking
        # share of the cells with an extra half order
        errs.append(D.projected_residual(u, spec).abs().max().item())
    assert errs[-1] < (2e-4 if order == 2 else 5e-8)
    assert _slope(dts, errs) == pytest.approx(order, abs=0.3)


@pytest.mark.parametrize("forcing_kind", ["tensor", "callable"])
@pytest.mark.parametrize("time_derivative,order", [("periodic2", 2), ("periodic4", 4)])
def test_forced_periodic_residual_converges(time_derivative, order, forcing_kind):
    """u = cos(t) U with forcing f = (-sin t + 2 nu cos t) U solves the forced equation with
    pressure; P R -> 0 at the periodic stencil's order."""
    nu = 0.3
    dts, errs = [], []
    for nt in (8, 16, 32, 64):
        dt = TWO_PI / nt
        t = torch.arange(nt, dtype=torch.float64) * dt
        U = _tg_spatial(8, 8)[:, None]                                      # [2, 1, Y, X]
        u = (U * torch.cos(t)[:, None, None])[None]                         # [1, 2, T, Y, X]
        f = (U * (-torch.sin(t) + 2 * nu * torch.cos(t))[:, None, None])[None]
        forcing = f if forcing_kind == "tensor" else (lambda v, f=f: f + 0 * v)
        spec = FlowSpec((3, 4), time_axis=2, dt=dt, nu=nu, time_derivative=time_derivative)
        dts.append(dt)
        errs.append(D.projected_residual(u, spec, forcing).abs().max().item())
    assert _slope(dts, errs) == pytest.approx(order, abs=0.3)


def test_physics_energy_is_mean_and_resolution_independent():
    """E = mean over cells and channels of (P R)^2, and the same band-limited field on a 2x finer
    spatial grid gives the same E."""
    g = torch.Generator().manual_seed(3)
    amps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.arange(6, dtype=torch.float64) * 0.2

    def field(n):
        y, x = torch.meshgrid(_grid(n), _grid(n), indexing="ij")
        ch = [amps[c, 0] * torch.sin(x + c) + amps[c, 1] * torch.cos(y - c) + amps[c, 2] * torch.sin(x + y)
              for c in range(4)]
        return torch.stack([c[None] * (1 + t[:, None, None] ** 2) for c in ch])[None]  # [1, 4, T, n, n]

    spec = FlowSpec((3, 4), time_axis=2, dt=0.2, nu=0.1)
    e8, e16 = D.physics_energy(field(8), spec), D.physics_energy(field(16), spec)
    pr = D.projected_residual(field(8), spec)
    torch.testing.assert_close(e8, pr.square().mean(dim=(1, 2, 3, 4)), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(e8, e16, atol=1e-12, rtol=1e-10)
    assert e8.shape == (1,) and e8.item() > 1e-3


@pytest.mark.parametrize("derivative,time_derivative", [("spectral", "one_sided2"), ("fd2", "periodic4")])
def test_physics_energy_gradcheck(derivative, time_derivative):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 5, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    f = torch.randn(1, 2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)  # broadcast in t
    spec = FlowSpec((3, 4), time_axis=2, dt=0.5, nu=0.2, derivative=derivative,
                    time_derivative=time_derivative, dealias=derivative == "spectral")
    assert torch.autograd.gradcheck(lambda u, f: D.physics_energy(u, spec, f), (u, f))
    w = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: D.rk4_step(w, 0.1, FlowSpec((2, 3), nu=0.1)), (w,))


# ---- deterministic integrators -------------------------------------------------------------
@pytest.mark.parametrize("dealias", [False, True])
@pytest.mark.parametrize("method", ["rk4", "etdrk4"])
def test_taylor_green_energy_decay(method, dealias):
    """Energy of the vortex decays as E0 exp(-4 nu t) to ~1e-8 relative over 100 steps."""
    nu, dt, steps = 0.05, 0.1, 100
    spec = FlowSpec((2, 3), nu=nu, dealias=dealias)
    u0 = _tg_spatial(12, 12)[None]
    seen = []
    u = D.integrate(u0, steps, dt, spec, method=method, callback=lambda d: seen.append((d["i"], d["t"])))
    assert [i for i, _ in seen] == list(range(steps)) and seen[-1][1] == pytest.approx(steps * dt)
    ratio = (u.square().mean() / u0.square().mean()).item()
    assert ratio / math.exp(-4 * nu * steps * dt) - 1 == pytest.approx(0, abs=1e-8)
    torch.testing.assert_close(u, u0 * math.exp(-2 * nu * steps * dt), atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", ["rk4", "etdrk4"])
def test_divergence_stays_at_roundoff(method):
    """100 dealiased steps of a random divergence-free field keep div u at round-off."""
    u = _random_solenoidal((1, 2, 16, 16), n_modes=4, seed=5)
    spec = FlowSpec((2, 3), nu=0.01, dealias=True)
    u = D.integrate(u, 100, 0.02, spec, method=method)
    assert torch.isfinite(u).all() and u.abs().max() > 0.1
    assert divergence(u, (2, 3)).abs().max() < 1e-11


@functools.lru_cache(maxsize=None)
def _order_problem(derivative: str):
    """A nonlinear flow with a gradient part (which the projected drift leaves unchanged), and
    its reference solution at t = 1 by fine-step RK4 (128 steps)."""
    spec = FlowSpec((2, 3), nu=0.05, derivative=derivative, dealias=derivative == "spectral")
    u0 = _random_solenoidal((1, 2, 16, 16), n_modes=2, seed=7)
    y, x = torch.meshgrid(_grid(16), _grid(16), indexing="ij")
    u0 = u0 + 0.3 * torch.stack([torch.cos(y), torch.cos(x)])[None]      # grad of (sin y + sin x)
    return spec, u0, D.integrate(u0, 128, 1.0 / 128, spec, method="rk4")


@pytest.mark.parametrize("derivative", ["spectral", "fd2"])
@pytest.mark.parametrize("method", ["rk4", "etdrk4"])
def test_integrator_fourth_order(method, derivative):
    """Both schemes converge at order 4 (halving dt divides the error by ~16) to the same
    reference, so ETDRK4 integrates the same semi-discrete system as RK4."""
    spec, u0, ref = _order_problem(derivative)
    errs = [(D.integrate(u0, n, 1.0 / n, spec, method=method) - ref).abs().max().item() for n in (8, 16)]
    assert math.log2(errs[0] / errs[1]) == pytest.approx(4.0, abs=0.5)
    assert errs[1] < 1e-3


def test_etdrk4_is_stable_beyond_rk4_limit():
    """With a stiff viscous term (nu k_max^2 dt >> 2.8) RK4 blows up, ETDRK4 follows the exact decay."""
    spec = FlowSpec((2, 3), nu=1.0)
    u0 = _tg_spatial(32, 32)[None]
    u = D.integrate(u0, 10, 0.1, spec, method="etdrk4")                 # nu k_max^2 dt = 51
    torch.testing.assert_close(u, u0 * math.exp(-2.0), atol=1e-12, rtol=0)
    noisy = u0 + 1e-6 * torch.randn(u0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    blown = D.integrate(noisy, 10, 0.1, spec, method="rk4")
    assert not (torch.isfinite(blown).all() and blown.abs().max() < 10)
    # the perturbation stays a perturbation (its gradient part is carried, the rest decays)
    torch.testing.assert_close(D.integrate(noisy, 10, 0.1, spec, method="etdrk4"), u, atol=1e-5, rtol=0)


def test_float32_integrators_keep_dtype():
    u0 = _random_solenoidal((2, 2, 16, 16), n_modes=3, seed=2, dtype=torch.float32)
    spec = FlowSpec((2, 3), nu=0.02, dealias=True)
    for method in ("rk4", "etdrk4", "euler_maruyama"):
        u = D.integrate(u0, 5, 0.05, spec, method=method)
        assert u.dtype == torch.float32
        torch.testing.assert_close(u.double(), D.integrate(u0.double(), 5, 0.05, spec, method=method),
                                   atol=2e-5, rtol=0)


# ---- Euler-Maruyama ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(400, 2, 15, 15), (120, 3, 7, 9, 5)])
def test_euler_maruyama_noise_statistics(shape):
    """With zero drift the increment is sqrt(dt) sigma P(xi): divergence-free, each divergence-free
    Fourier mode has variance dt sigma^2 N, and the per-cell variance is dt sigma^2 times the
    projected fraction (sum_k tr P_k) / (k N). Odd extents: no signless Nyquist modes."""
    dt, sigma = 0.01, 0.7
    b, c, *s = shape
    axes = tuple(range(2, 2 + len(s)))
    k, n = len(s), math.prod(s)
    spec = FlowSpec(axes, nu=0.0)
    u = torch.zeros(shape, dtype=torch.float64)
    inc = D.euler_maruyama_step(u, dt, spec, noise_std=sigma, generator=torch.Generator().manual_seed(11)) - u
    assert divergence(inc, axes).abs().max() < 1e-12

    var = dt * sigma ** 2
    # per cell: the zero mode (mean) passes P whole (trace k), every other mode keeps k-1 of k
    fraction = ((n - 1) * (k - 1) + k) / (k * n)
    cells = b * c * n
    assert inc.square().mean().item() == pytest.approx(var * fraction, rel=4 * math.sqrt(2 / cells) + 0.01)

    ih = torch.fft.fftn(inc, dim=axes)                                          # [B, k, *S]
    kv = torch.meshgrid(*[torch.fft.fftfreq(m, 1.0 / m, dtype=torch.float64) for m in s], indexing="ij")
    k2 = sum(q * q for q in kv)
    nonzero = k2 > 0
    # energy of the increment per nonzero mode = (k - 1) divergence-free directions x var N
    power = ih.abs().square().sum(1)[:, nonzero]                               # [B, modes]
    assert power.mean().item() / (var * n) == pytest.approx(k - 1, rel=0.03)
    k_dot = sum(q * ih[:, i] for i, q in enumerate(kv))[:, nonzero]            # longitudinal part
    assert k_dot.abs().max().item() < 1e-10


def test_euler_maruyama_drift_noise_and_reproducibility():
    u = _random_solenoidal((2, 2, 12, 12), n_modes=3, seed=4)
    spec = FlowSpec((2, 3), nu=0.03, dealias=True)
    forcing = lambda v: 0.1 * torch.roll(v, 1, dims=2)                      # a callable "network"
    xi = torch.randn(u.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = D.euler_maruyama_step(u, 0.05, spec, forcing, noise_std=0.4, noise=xi)
    expected = u + 0.05 * D.projected_drift(u, spec, forcing) + math.sqrt(0.05) * 0.4 * leray_project(xi, (2, 3))
    torch.testing.assert_close(out, expected, atol=1e-13, rtol=0)
    # noise from the generator is the same xi (global field, sharded: identity on one device)
    drawn = D.euler_maruyama_step(u, 0.05, spec, forcing, noise_std=0.4,
                                  generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(drawn, out, atol=1e-13, rtol=0)
    a = D.integrate(u, 3, 0.05, spec, "euler_maruyama", forcing, noise_std=0.4,
                    generator=torch.Generator().manual_seed(1))
    b = D.integrate(u, 3, 0.05, spec, "euler_maruyama", forcing, noise_std=0.4,
                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # without noise it is the explicit Euler step of the same drift
    torch.testing.assert_close(D.euler_maruyama_step(u, 0.05, spec, forcing),
                               u + 0.05 * D.projected_drift(u, spec, forcing), atol=1e-14, rtol=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    u = _random_solenoidal((2, 2, 16, 16), n_modes=3, seed=8)
    spec = FlowSpec((2, 3), nu=0.02, dealias=True)
    for method in ("rk4", "etdrk4"):
        cpu = D.integrate(u, 4, 0.05, spec, method=method)
        gpu = D.integrate(u.cuda(), 4, 0.05, spec, method=method)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-12, rtol=0)
    st = FlowSpec((3, 4), time_axis=2, dt=0.1, nu=0.1, time_derivative="one_sided4")
    v = _tg_trajectory(9, 0.1, 0.1)
    torch.testing.assert_close(D.physics_energy(v.cuda(), st).cpu(), D.physics_energy(v, st), atol=1e-14, rtol=1e-10)
    g = torch.Generator(device="cuda").manual_seed(0)
    inc = D.euler_maruyama_step(u.cuda(), 0.1, FlowSpec((2, 3), nu=0.0), noise_std=1.0, generator=g)
    assert divergence(inc, (2, 3)).abs().max() < 1e-10


def test_time_axis_may_be_a_flow_axis_text_field():
    """Text (Eq. 25-29): u = (u_t, u_x) on (t, x), the time axis is also a flow axis; R is the
    literal sum of its terms with d_t from the time stencil."""
    torch.manual_seed(0)
    spec = FlowSpec(flow_axes=(2, 3), time_axis=2, nu=0.05, time_derivative="periodic2")
    u = torch.randn(2, 4, 16, 32, dtype=torch.float64)
    from sgfm_dist.ops import dynamics as dyn
    expected = dyn.time_derivative(u, spec) + dyn.advection(u, spec) - dyn.viscous_term(u, spec)
    torch.testing.assert_close(dyn.residual(u, spec), expected, rtol=1e-12, atol=1e-12)
    assert dyn.physics_energy(u, spec).shape == (2,)


@pytest.mark.parametrize("derivative", ["spectral", "fd2", "fd4"])
def test_flow_time_derivative_is_the_gradients_own_d_t(derivative):
    """``time_derivative="flow"``: the lone d_t u equals the gradient's component along the time
    axis (one discretisation for both), checked against fd_gradient / the spectral gradient."""
    from sgfm_dist.ops import dynamics as dyn
    from sgfm_dist.ops.finite_diff import fd_gradient
    from sgfm_dist.ops.spectral import gradient
    torch.manual_seed(0)
    lengths = (3.0, 5.0)
    spec = FlowSpec(flow_axes=(2, 3), time_axis=2, lengths=lengths, derivative=derivative, time_derivative="flow")
    u = torch.randn(2, 4, 16, 32, dtype=torch.float64)
    if derivative == "spectral":
        grad = gradient(u, (2, 3), lengths)
    else:
        grad = fd_gradient(u, (2, 3), lengths, accuracy=int(derivative[-1]))
    d_t = grad.reshape(2, 4, 2, 16, 32)[:, :, 0]
    torch.testing.assert_close(dyn.time_derivative(u, spec), d_t, rtol=1e-12, atol=1e-12)
    # and on a sine along t it is the stencil's analytic symbol: k (spectral), sin(kh)/h (fd2),
    # (8 sin(kh) - sin(2kh)) / 6h (fd4), times cos(kt)
    h, k = lengths[0] / 16, 2 * math.pi / lengths[0]
    t = torch.arange(16, dtype=torch.float64) * h
    w = torch.sin(k * t)[None, None, :, None].expand(1, 2, 16, 4).contiguous()
    symbol = {"spectral": k, "fd2": math.sin(k * h) / h,
              "fd4": (8 * math.sin(k * h) - math.sin(2 * k * h)) / (6 * h)}[derivative]
    exact = symbol * torch.cos(k * t)[None, None, :, None].expand(1, 2, 16, 4)
    torch.testing.assert_close(dyn.time_derivative(w, spec), exact, rtol=0, atol=1e-12)


def test_flow_time_derivative_needs_the_time_axis_among_flow_axes():
    with pytest.raises(ValueError, match="time_derivative: 'flow'"):
        FlowSpec(flow_axes=(3, 4), time_axis=2, time_derivative="flow")


@pytest.mark.parametrize("derivative", ["spectral", "fd4"])
def test_flow_projected_residual_is_the_projection_of_the_residual(derivative):
    """The fused P R(u) (spectral 'flow' d_t read off u's spectrum) equals P applied to the
    term-by-term residual."""
    from sgfm_dist.ops import dynamics as dyn
    torch.manual_seed(1)
    spec = FlowSpec(flow_axes=(2, 3), time_axis=2, lengths=(3.0, 5.0), nu=0.05, derivative=derivative,
                    time_derivative="flow")
    u = torch.randn(2, 4, 16, 32, dtype=torch.float64)
    f = torch.randn(2, 4, 16, 32, dtype=torch.float64)
    expected = dyn.project(dyn.residual(u, spec, f), spec)
    torch.testing.assert_close(dyn.projected_residual(u, spec, f), expected, rtol=1e-12, atol=1e-12)


# ---- per-sample physics: each sample's nu and dt ---------------------------------------------
def _tg_k(n: int, k: int) -> torch.Tensor:
    """Taylor-Green of wavenumber k, (u_y, u_x) = (-cos kx sin ky, sin kx cos ky), [2, Y, X] float64:
    Lap U = -2 k^2 U, and (U.grad)U is a gradient, so U e^{-2 nu k^2 t} solves Navier-Stokes."""
    y, x = torch.meshgrid(_grid(n), _grid(n), indexing="ij")
    return torch.stack([-torch.cos(k * x) * torch.sin(k * y), torch.sin(k * x) * torch.cos(k * y)])


def _tg_batch(nus, dts, k: int = 2, nt: int = 9, n: int = 12) -> torch.Tensor:
    """One batch of exact decaying vortices, sample b at viscosity nus[b] sampled every dts[b]:
    [B, 2, T, Y, X]."""
    out = []
    for nu, dt in zip(nus, dts):
        t = torch.arange(nt, dtype=torch.float64) * dt
        out.append(_tg_k(n, k)[:, None] * torch.exp(-2 * nu * k * k * t)[:, None, None])
    return torch.stack(out)


def test_taylor_green_residual_at_two_viscosities_in_one_batch():
    """The analytic check of per-sample physics: a batch of two decaying vortices at nu = 0.02 and
    0.2 (and different frame spacings) has P R = 0 with each sample's own (nu, dt), and with the
    viscosities swapped exactly the known residual P R = -2 k^2 (nu_true - nu_used) u. One nu for
    the whole batch (what the model did before) gets one of the two samples wrong."""
    k, nus, dts = 2, (0.02, 0.2), (0.01, 0.005)
    u = _tg_batch(nus, dts, k)                                            # [2, 2, T, Y, X]
    nu_t, dt_t = torch.tensor(nus, dtype=torch.float64), torch.tensor(dts, dtype=torch.float64)
    spec = FlowSpec((3, 4), time_axis=2, nu=nu_t, dt=dt_t, time_derivative="one_sided4")
    # 4th-order time stencil with a dt = 2 nu k^2 dt <= 0.016: (a dt)^4 a ~ 1e-8 of |u|
    tol = 1e-7
    assert D.projected_residual(u, spec).abs().max() < tol
    swapped = dataclasses.replace(spec, nu=nu_t.flip(0))
    scale = (-2 * k * k * (nu_t - nu_t.flip(0))).reshape(2, 1, 1, 1, 1)   # [B, 1, 1, 1, 1]
    torch.testing.assert_close(D.projected_residual(u, swapped), scale * u, atol=tol, rtol=0)
    # the energy sees it per sample: ~0 for the right nu, (2 k^2 dnu)^2 mean u^2 for the wrong one
    e_right, e_wrong = D.physics_energy(u, spec), D.physics_energy(u, swapped)
    assert e_right.max() < tol ** 2
    torch.testing.assert_close(e_wrong, scale.flatten() ** 2 * u.square().mean(dim=(1, 2, 3, 4)), rtol=1e-6, atol=0)
    # the wrong dt is wrong too: d_t u scales with 1/dt
    assert D.physics_energy(u, dataclasses.replace(spec, dt=dt_t.flip(0))).min() > 1e-4
    # a per-sample spec equals each sample alone with a float spec
    for b in range(2):
        alone = dataclasses.replace(spec, nu=nus[b], dt=dts[b])
        torch.testing.assert_close(D.residual(u, spec)[b:b + 1], D.residual(u[b:b + 1], alone), rtol=1e-13, atol=1e-13)
    # one viscosity for the batch cannot be right for both samples
    for nu in nus:
        assert D.physics_energy(u, dataclasses.replace(spec, nu=nu)).max() > 1e6 * e_right.max()


@pytest.mark.parametrize("time_derivative", ["one_sided2", "periodic2", "flow"])
def test_per_sample_equals_float_spec_bit_for_bit(time_derivative):
    """Per-sample tensors holding the float values of a one-value spec give the very same bits
    (float32): a corpus whose metadata repeats the config keeps a recorded loss trace."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(3, 2, 6, 8, 8, generator=g)
    axes = (2, 3, 4) if time_derivative == "flow" else (3, 4)
    u = torch.randn(3, 3, 6, 8, 8, generator=g) if time_derivative == "flow" else u
    base = FlowSpec(axes, time_axis=2, nu=1e-3, dt=0.1, time_derivative=time_derivative)
    per = dataclasses.replace(base, nu=torch.full((3,), 1e-3), dt=torch.full((3,), 0.1))
    f = torch.randn(3, u.shape[1], 6, 8, 8, generator=g)
    for fn in (D.residual, D.projected_residual, D.physics_energy):
        assert torch.equal(fn(u, base, f), fn(u, per, f)), fn.__name__
    if time_derivative != "flow":
        assert torch.equal(D.time_derivative(u, base), D.time_derivative(u, per))


@pytest.mark.parametrize("method", ["rk4", "etdrk4", "euler_maruyama"])
def test_integrators_decay_each_sample_at_its_viscosity(method):
    """A batch of two vortices at nu = 0.05 and 0.5 stepped together decays each at its own rate,
    e^{-2 nu k^2 t} (Euler: (1 - 2 nu k^2 dt)^n)."""
    k, steps, dt = 1, 20, 0.02
    nu = torch.tensor([0.05, 0.5], dtype=torch.float64)
    u0 = _tg_k(12, k)[None].expand(2, -1, -1, -1).clone()                # [2, 2, Y, X]
    u = D.integrate(u0, steps, dt, FlowSpec((2, 3), nu=nu, dealias=True), method=method)
    if method == "euler_maruyama":  # the drift is -2 nu k^2 u: Euler's factor per step, exactly
        decay = (1 - 2 * nu * k * k * dt) ** steps
    else:
        decay = torch.exp(-2 * nu * k * k * steps * dt)
    torch.testing.assert_close(u, u0 * decay.reshape(2, 1, 1, 1), atol=1e-9, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(nu=torch.tensor([1e-3, -1.0])), "nu"),
    (dict(nu=torch.tensor([1e-3, float("nan")])), "nu"),
    (dict(dt=torch.tensor([0.1, 0.0])), "dt"),
    (dict(dt=torch.tensor([[0.1]])), "1-D float tensor"),
    (dict(nu=torch.tensor([1, 2])), "1-D float tensor"),
    (dict(nu="0.1"), "float or a \\[B\\] tensor"),
])
def test_per_sample_parameters_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowSpec((3, 4), time_axis=2, **kwargs)


def test_per_sample_batch_size_must_match():
    spec = FlowSpec((3, 4), time_axis=2, nu=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="3 per-sample values for a batch of 2"):
        D.physics_energy(torch.zeros(2, 2, 4, 8, 8), spec)
