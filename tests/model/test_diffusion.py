"""Wavelet-space VP diffusion: schedules, per-level shifts, parameterisations, and the eps-DSM
loss of the exact eps-predictor of Gaussian data at its analytic minimum."""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.model import diffusion as D
from sgfm_dist.ops.wavelets import coeff_layout, dwt, flatten_coeffs


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_monotone_with_exact_ends(schedule):
    tau = torch.linspace(0, 1, 101, dtype=torch.float64)
    lam = D.level_logsnr(tau, schedule, levels=2, level_shift=0.0, logsnr_min=-10.0, logsnr_max=None)  # [101, 3]
    a = D.alpha_from_logsnr(lam)
    assert torch.all(a[0] == 1.0), "tau = 0 must be the data exactly"
    assert torch.all(a[1:] <= a[:-1]), "alpha_bar must decrease with tau"
    assert float(a[-1].max()) < 1e-3, "tau = 1 must be (almost) pure noise"


@pytest.mark.parametrize("shift", [0.0, 1.5, 4.0])
def test_level_shift_noises_coarse_scales_less(shift):
    tau = torch.tensor([0.3, 0.6], dtype=torch.float64)
    lam = D.level_logsnr(tau, "cosine", levels=3, level_shift=shift, logsnr_min=-30.0, logsnr_max=None)  # [2, 4]
    base = D.base_logsnr(tau, "cosine")
    torch.testing.assert_close(lam[:, -1], base)  # the finest scale follows the base schedule
    torch.testing.assert_close(lam[:, 0] - base, torch.full_like(base, shift))  # approximation: full shift
    assert torch.all(lam[:, :-1] >= lam[:, 1:]), "coarser scales must have higher SNR"


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_parameterisations_invert_the_forward_process(parameterization):
    g = torch.Generator().manual_seed(0)
    c0, eps = torch.randn(2, 3, 2, 40, generator=g, dtype=torch.float64)
    alpha = torch.rand(3, 1, 40, generator=g, dtype=torch.float64) * 0.98 + 0.01
    c_tau = D.q_sample(c0, alpha, eps)
    raw = eps if parameterization == "eps" else alpha.sqrt() * eps - (1 - alpha).sqrt() * c0
    eps_hat, c0_hat = D.eps_and_c0(raw, c_tau, alpha, parameterization)
    torch.testing.assert_close(eps_hat, eps)
    torch.testing.assert_close(c0_hat, c0)


@pytest.mark.parametrize("level_shift", [0.0, 2.0])
@pytest.mark.parametrize("data_var", [0.25, 1.0, 4.0])
def test_dsm_of_exact_gaussian_predictor_is_at_analytic_minimum(data_var, level_shift):
    """Gaussian fields u0 ~ N(0, s^2 I) -> c0 = W u0 is N(0, s^2 I) too (W orthonormal); the exact
    eps-predictor's DSM loss equals E[a s^2 / (a s^2 + 1 - a)], and any other predictor does worse."""
    g = torch.Generator().manual_seed(1)
    B, C, S, J = 64, 2, (16, 16), 2
    u0 = math.sqrt(data_var) * torch.randn(B, C, *S, generator=g, dtype=torch.float64)
    c0 = flatten_coeffs(dwt(u0, "db2", J))  # [B, C, N]
    sidx = coeff_layout(S, J, "db2").scale_index()
    tau = (torch.rand(1, generator=g, dtype=torch.float64) + torch.arange(B) / B) % 1.0
    lam = D.level_logsnr(tau.clamp(min=1e-4), "cosine", J, level_shift, -10.0, 12.0)
    alpha = D.per_coefficient(D.alpha_from_logsnr(lam), sidx)  # [B, 1, N]
    eps = torch.randn(c0.shape, generator=g, dtype=torch.float64)
    c_tau = D.q_sample(c0, alpha, eps)
    eps_star = D.gaussian_eps_predictor(c_tau, alpha, data_var)
    loss = D.dsm_loss(eps_star, eps)  # [B]
    minimum = D.gaussian_dsm_minimum(alpha, data_var).expand_as(c0).flatten(1).mean(1)  # [B]
    # per-sample Monte-Carlo error of a mean of C*N squared Gaussians: a few percent
    torch.testing.assert_close(loss.mean(), minimum.mean(), rtol=0.02, atol=0.0)
    for worse in (1.1 * eps_star, 0.9 * eps_star, eps_star + 0.05):
        assert D.dsm_loss(worse, eps).mean() > loss.mean()


def test_dsm_mask_restricts_to_selected_coefficients():
    eps = torch.zeros(2, 3, 10)
    eps_hat = torch.zeros(2, 3, 10)
    eps_hat[:, :, :4] = 2.0  # error only outside the mask
    mask = torch.zeros(2, 1, 10)
    mask[:, :, 4:] = 1
    assert torch.all(D.dsm_loss(eps_hat, eps, mask) == 0)
    assert torch.allclose(D.dsm_loss(eps_hat, eps), torch.full((2,), 4.0 * 4 / 10))


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="schedule"):
        D.base_logsnr(torch.tensor([0.5]), "quadratic")
    with pytest.raises(ValueError, match="parameterization"):
        D.eps_and_c0(torch.zeros(1), torch.zeros(1), torch.ones(1) * 0.5, "x0")
