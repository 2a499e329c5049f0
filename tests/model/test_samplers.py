"""Samplers against known distributions: with the analytic score of a noised Gaussian mixture
as the model, every sampler must reproduce the mixture's mean and (co)variance; the
physics-guided correction must lower the energy monotonically; ensembles and schedules."""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.model import diffusion as D
from sgfm_dist.model.samplers import SAMPLERS, ensemble_stats, get_taus, physics_correction

# two well separated components; 1-D and a correlated-looking 2-D case (diagonal components,
# different means per axis, so the mixture itself has off-diagonal covariance)
MIXTURES = {
    "1d": dict(w=[0.3, 0.7], mu=[[-2.0], [1.5]], sd=[[0.5], [0.8]]),
    "2d": dict(w=[0.4, 0.6], mu=[[-1.5, 1.0], [1.0, -0.5]], sd=[[0.4, 0.7], [0.6, 0.3]]),
}


def _mixture(name):
    m = MIXTURES[name]
    w = torch.tensor(m["w"], dtype=torch.float64)  # [K]
    mu = torch.tensor(m["mu"], dtype=torch.float64)  # [K, d]
    sd = torch.tensor(m["sd"], dtype=torch.float64)  # [K, d]
    mean = (w[:, None] * mu).sum(0)  # [d]
    second = (w[:, None, None] * (torch.diag_embed(sd ** 2) + mu[:, :, None] * mu[:, None, :])).sum(0)
    return w, mu, sd, mean, second - torch.outer(mean, mean)


def _alpha_fn(shift: float, d: int):
    """Per-coordinate schedules (coordinate i shifted by shift*i): exercises per-coefficient alpha."""
    shifts = torch.arange(d, dtype=torch.float64) * shift

    def fn(tau: float) -> torch.Tensor:
        lam = D.base_logsnr(torch.tensor(float(tau), dtype=torch.float64), "cosine") + shifts
        return D.alpha_from_logsnr(lam.clamp(min=-10.0)).reshape(1, d, 1)  # [1, d, 1]

    return fn


def _analytic_eps(w, mu, sd, alpha_fn):
    """eps(x) = -sqrt(1 - a) grad log p_tau(x) for the VP-noised mixture; x is [1, d, M]."""

    def model(x: torch.Tensor, tau: float) -> torch.Tensor:
        a = alpha_fn(tau)[0, :, 0]  # [d]
        m = a.sqrt() * mu  # [K, d]
        v = a * sd ** 2 + 1 - a  # [K, d]
        z = x[0].T[:, None, :]  # [M, 1, d]
        logp = w.log() - 0.5 * (((z - m) ** 2 / v) + v.log()).sum(-1)  # [M, K]
        r = torch.softmax(logp, dim=1)  # [M, K]
        score = (r[:, :, None] * (-(z - m) / v)).sum(1)  # [M, d]
        return (-(1 - a).sqrt() * score).T[None]  # [1, d, M]

    return model


@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("mixture", ["1d", "2d"])
@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun", "pc"])
def test_sampler_recovers_gaussian_mixture(sampler, mixture, shift):
    w, mu, sd, mean, cov = _mixture(mixture)
    d = mu.shape[1]
    alpha_fn = _alpha_fn(shift, d)
    g = torch.Generator().manual_seed(0)
    M = 4000
    x = (1 - alpha_fn(1.0)).sqrt() * torch.randn(1, d, M, generator=g, dtype=torch.float64)
    steps = {"euler_maruyama": 200, "heun": 60, "pc": 100}[sampler]
    out = SAMPLERS[sampler](_analytic_eps(w, mu, sd, alpha_fn), x, get_taus(steps), alpha_fn, disable=True,
                            generator=g)
    samples = out[0].T  # [M, d]
    # Monte-Carlo standard error of the mean ~ sqrt(var / M) ~ 0.03; discretisation adds a little
    torch.testing.assert_close(samples.mean(0), mean, atol=0.12, rtol=0.0)
    torch.testing.assert_close(torch.cov(samples.T).reshape(d, d), cov, atol=0.25, rtol=0.08)
    # the mixture's weights: fraction of samples nearer the first component
    near_first = ((samples - mu[0]).norm(dim=1) < (samples - mu[1]).norm(dim=1)).double().mean()
    assert abs(float(near_first) - float(w[0])) < 0.06


@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun", "pc"])
def test_constraint_and_callback_are_applied(sampler):
    """A constraint pinning coordinate 0 to 0.7 holds in the output; the callback sees every step."""
    w, mu, sd, _, _ = _mixture("2d")
    alpha_fn = _alpha_fn(0.0, 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 50, generator=g, dtype=torch.float64)
    seen = []

    def pin(x, tau):
        x = x.clone()
        x[:, 0] = 0.7 * alpha_fn(tau)[0, 0, 0].sqrt()
        return x

    out = SAMPLERS[sampler](_analytic_eps(w, mu, sd, alpha_fn), x, get_taus(5), alpha_fn, disable=True,
                            generator=g, constraint=pin, callback=lambda info: seen.append(info["i"]))
    assert torch.all(out[:, 0] == 0.7)
    assert seen == list(range(5))


@pytest.mark.parametrize("eta", [1e-3, 1e-2])
def test_physics_correction_lowers_energy_monotonically(eta):
    """Eq. 24 on the model's physics energy E(W^-1 c) of a random field: small steps decrease E."""
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.model.sgfm import build_model

    torch.manual_seed(2)
    model = build_model(ModelConfig(modality="physics", channels=2, width=8, n_blocks=1, spectral_modes=2,
                                    forcing_width=8, forcing_blocks=1, wavelet="haar", levels=1, nu=0.05),
                        DiffusionConfig())
    model = model.double()
    with torch.no_grad():  # a non-zero forcing network, so the energy includes f_theta
        model.forcing_net.out.weight.normal_(0, 0.1)
    shape = (8, 8, 8)
    u = torch.randn(2, 2, *shape, dtype=torch.float64)
    c = model.to_coeffs(u)

    def energy(c_):
        return model.physics_energy(model.to_field(c_, shape))

    values = [energy(c)]
    for _ in range(8):
        c = physics_correction(c, energy, eta)
        values.append(energy(c))
    values = torch.stack(values)  # [9, B]
    assert torch.all(values[1:] < values[:-1]), values


def test_physics_correction_is_a_gradient_step():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    out = physics_correction(x, lambda v: (v ** 2).sum(1), 0.1)  # grad = 2x
    torch.testing.assert_close(out, x * 0.8)


def test_physics_correction_shortens_steps_past_the_trust_region():
    """A step longer than max_step_ratio * ||x|| (per sample) is cut to that length along -grad;
    shorter steps are exactly Eq. 24; None turns the limit off."""
    x = torch.tensor([[1.0, -2.0], [0.1, 0.1]], dtype=torch.float64)
    quartic = lambda v: (v ** 4).sum(1)  # noqa: E731  grad = 4 v^3: [4, -32] and [0.004, 0.004]
    grad = 4 * x ** 3
    out = physics_correction(x, quartic, 1.0, max_step_ratio=0.5)
    step = x - out
    torch.testing.assert_close(step[0].norm(), 0.5 * x[0].norm())
    torch.testing.assert_close(step[0] / step[0].norm(), grad[0] / grad[0].norm())
    torch.testing.assert_close(out[1], x[1] - grad[1])  # 0.0057 < 0.5 * 0.14: untouched
    torch.testing.assert_close(physics_correction(x, quartic, 1.0, max_step_ratio=None), x - grad)
    with pytest.raises(ValueError, match="max_step_ratio"):
        physics_correction(x, quartic, 1.0, max_step_ratio=0.0)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc"])
def test_guided_stochastic_sampling_stays_bounded(sampler):
    """A stiff (quartic) guidance energy at a step size where the plain gradient step diverges
    from the first, noisiest step: the limited step keeps the samples finite and lowers E."""
    w, mu, sd, _, _ = _mixture("1d")
    alpha_fn = _alpha_fn(0.0, 1)
    quartic = lambda v: (v ** 4).flatten(1).sum(1)  # noqa: E731

    def run(eta):
        g = torch.Generator().manual_seed(4)
        x = (1 - alpha_fn(1.0)).sqrt() * torch.randn(1, 1, 200, generator=g, dtype=torch.float64)
        return SAMPLERS[sampler](_analytic_eps(w, mu, sd, alpha_fn), x, get_taus(5), alpha_fn, disable=True,
                                 generator=g, energy=quartic, eta=eta)

    free, guided = run(0.0), run(5.0)
    # the plain step at this eta overshoots a state of the mixture's scale 180-fold (3 -> -537)
    x0 = torch.full((1, 1, 1), 3.0, dtype=torch.float64)
    assert float(physics_correction(x0, quartic, 5.0, max_step_ratio=None).abs()) > 100
    assert torch.isfinite(guided).all()
    assert float(quartic(guided)) < float(quartic(free))


def test_ensemble_stats():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 2, 3, 4, generator=g)
    mean, spread = ensemble_stats(s)
    torch.testing.assert_close(mean, s.mean(0))
    torch.testing.assert_close(spread, s.std(0))
    m1, s1 = ensemble_stats(s[:1])
    assert torch.all(s1 == 0) and torch.equal(m1, s[0])
    with pytest.raises(ValueError, match="samples"):
        ensemble_stats(torch.zeros(0, 3))


def test_get_taus_and_bad_schedules():
    t = get_taus(10, rho=2.0)
    assert t.shape == (11,) and float(t[0]) == 1.0 and float(t[-1]) == 0.0 and torch.all(t[1:] < t[:-1])
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            get_taus(bad)
    model = lambda x, tau: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match="taus"):
        SAMPLERS["heun"](model, torch.zeros(1, 1, 2), torch.tensor([1.0, 0.5]), _alpha_fn(0.0, 1), disable=True)
    with pytest.raises(ValueError, match="alpha_fn"):
        SAMPLERS["pc"](model, torch.zeros(1, 1, 2), get_taus(2), lambda tau: torch.full((1, 1, 1), 0.5),
                       disable=True)
