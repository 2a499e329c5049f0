"""Physics metrics (sgfm_dist.eval.physics) on hand-made fields whose values are known in closed form.

Fields are [B, C, T, Y, X] with components (u_y, u_x) along the flow axes (y, x) = dims (3, 4)
on the 2*pi-periodic box, so every mode below is exactly resolved."""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.eval import physics as P

N = 16


def _grid(n: int = N):
    y, x = torch.meshgrid(torch.arange(n, dtype=torch.float64) * (2 * math.pi / n),
                          torch.arange(n, dtype=torch.float64) * (2 * math.pi / n), indexing="ij")
    return y, x


def _field(uy: torch.Tensor, ux: torch.Tensor, t: int = 1) -> torch.Tensor:
    """[1, 2, T, Y, X] from [Y, X] components, the same at every t."""
    return torch.stack([uy, ux])[None, :, None].expand(1, 2, t, *uy.shape).clone()


def _taylor_green() -> torch.Tensor:
    y, x = _grid()
    return _field(-torch.cos(x) * torch.sin(y), torch.sin(x) * torch.cos(y))


# ---- forecasts ------------------------------------------------------------------------------

def test_horizon_rmse_and_baselines():
    truth = torch.zeros(2, 2, 3, 4, 4, dtype=torch.float64)
    pred = torch.zeros_like(truth)
    pred[:, :, 0] = 1.0           # error 1 everywhere at horizon 1
    pred[0, :, 1] = 2.0           # error 2 in half of the samples at horizon 2: rmse sqrt(2)
    torch.testing.assert_close(P.horizon_rmse(pred, truth), torch.tensor([1.0, math.sqrt(2.0), 0.0],
                                                                         dtype=torch.float64))
    prompt = torch.arange(2, dtype=torch.float64).reshape(1, 1, 2, 1, 1).expand(2, 2, 2, 4, 4)  # frames 0, 1
    persist = P.persistence_forecast(prompt, 3)
    assert persist.shape == truth.shape and bool((persist == 1.0).all())  # the last given frame
    torch.testing.assert_close(P.horizon_rmse(persist, truth), torch.ones(3, dtype=torch.float64))
    clim = P.mean_field([torch.full((2, 2, 3, 4, 4), 3.0, dtype=torch.float64),
                         torch.full((1, 2, 5, 4, 4), -1.0, dtype=torch.float64)])
    # (6 windows-frames of 3 + 5 of -1) / 11
    torch.testing.assert_close(clim, torch.full((2, 4, 4), (18.0 - 5.0) / 11.0, dtype=torch.float64))
    assert P.climatology_forecast(clim, truth).shape == truth.shape


def test_forecast_inputs_are_checked():
    a = torch.zeros(1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="differs from truth"):
        P.horizon_rmse(a, torch.zeros(1, 2, 2, 4, 4))
    with pytest.raises(ValueError, match="at least 2 members"):
        P.ensemble_crps(a[None], a)
    with pytest.raises(ValueError, match="ensemble"):
        P.spread_skill_ratio(a, a)
    with pytest.raises(ValueError, match="does not broadcast"):
        P.climatology_forecast(torch.zeros(3, 4, 4), a)


# ---- spectra ----------------------------------------------------------------------------------

def test_spectrum_band_error_of_known_modes():
    """Truth: a |k| = 1 and a |k| = 3 mode of amplitude 1; the forecast doubles the |k| = 3 mode:
    band [1, 2) is exact, band [2, 4) holds 4x the energy (error 3), band [4, 8) has none (NaN)."""
    y, x = _grid()
    zero = torch.zeros_like(x)
    truth = _field(zero, torch.cos(y) + torch.cos(3 * y))
    pred = _field(zero, torch.cos(y) + 2 * torch.cos(3 * y))
    bands, err = P.spectrum_band_error(pred, truth)
    assert bands[:3] == [(1, 2), (2, 4), (4, 8)]
    torch.testing.assert_close(err[:2], torch.tensor([0.0, 3.0], dtype=torch.float64))
    assert all(math.isnan(v) for v in err[2:].tolist())
    # an ensemble's members flattened: more samples than the truth, same spectrum
    _, err2 = P.spectrum_band_error(pred.expand(3, -1, -1, -1, -1), truth)
    torch.testing.assert_close(err2[:2], err[:2])


# ---- incompressibility and vorticity ----------------------------------------------------------

def test_divergence_ratio():
    y, x = _grid()
    zero = torch.zeros_like(x)
    torch.testing.assert_close(P.divergence_ratio(_taylor_green()), torch.zeros(1, dtype=torch.float64),
                               atol=1e-14, rtol=0)
    # u_x = sin x: div u = cos x, with the same RMS as u
    torch.testing.assert_close(P.divergence_ratio(_field(zero, torch.sin(x))), torch.ones(1, dtype=torch.float64))
    # u_x = sin 3x: div = 3 cos 3x
    torch.testing.assert_close(P.divergence_ratio(_field(zero, torch.sin(3 * x))),
                               torch.full((1,), 3.0, dtype=torch.float64))


def test_enstrophy():
    # Taylor-Green: w = d_x u_y - d_y u_x = 2 sin x sin y, mean w^2 = 1, enstrophy 0.5
    torch.testing.assert_close(P.enstrophy(_taylor_green()), torch.full((1,), 0.5, dtype=torch.float64))
    y, x = _grid()
    # a shear u_x = sin(2y): w = -2 cos 2y, mean w^2 = 2, enstrophy 1
    u = _field(torch.zeros_like(x), torch.sin(2 * y), t=3)
    torch.testing.assert_close(P.enstrophy(u), torch.ones(1, dtype=torch.float64))


# ---- ensembles ---------------------------------------------------------------------------------

def test_crps_of_known_ensembles():
    truth = torch.ones(1, 1, 2, 2, 2, dtype=torch.float64)
    ens = torch.stack([torch.zeros_like(truth), 2 * torch.ones_like(truth)])  # members 0 and 2 around y = 1
    # E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1: CRPS = 0.5
    torch.testing.assert_close(P.ensemble_crps(ens, truth), torch.full((2,), 0.5, dtype=torch.float64))
    # identical members: the CRPS is the absolute error
    same = torch.full((3, 1, 1, 2, 2, 2), 3.5, dtype=torch.float64)
    torch.testing.assert_close(P.ensemble_crps(same, truth), torch.full((2,), 2.5, dtype=torch.float64))
    # against the O(M^2) definition on random members
    g = torch.Generator().manual_seed(0)
    ens = torch.randn(5, 2, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    pair = (ens[:, None] - ens[None]).abs().mean(dim=(0, 1))
    ref = ((ens - y).abs().mean(0) - 0.5 * pair).mean(dim=(0, 1, 3, 4))
    torch.testing.assert_close(P.ensemble_crps(ens, y), ref)


def test_spread_skill_of_known_ensembles():
    truth = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    ens = torch.stack([torch.ones_like(truth), 3 * torch.ones_like(truth)])  # mean 2, unbiased variance 2
    # sqrt(3/2) * sqrt(2) / 2 = sqrt(3) / 2
    torch.testing.assert_close(P.spread_skill_ratio(ens, truth),
                               torch.full((2,), math.sqrt(3.0) / 2, dtype=torch.float64))
    # a calibrated ensemble (truth one more draw from the members' distribution): ratio near 1
    g = torch.Generator().manual_seed(1)
    draws = torch.randn(9, 64, 1, 1, 8, 8, generator=g, dtype=torch.float64)
    ratio = P.spread_skill_ratio(draws[:8], draws[8])
    assert abs(float(ratio) - 1.0) < 0.05


def test_forecast_metrics_summary_is_json_ready():
    import json

    truth = _taylor_green().expand(2, -1, 3, -1, -1).contiguous()
    prompt = truth[:, :, :1]
    ens = truth[None] + 0.1 * torch.randn(4, *truth.shape, generator=torch.Generator().manual_seed(2),
                                          dtype=torch.float64)
    s = P.forecast_metrics(ens, truth, prompt, torch.zeros(2, N, N, dtype=torch.float64))
    json.dumps(s)
    assert s["horizons"] == [1, 2, 3] and len(s["rmse_mean"]) == 3 and len(s["crps"]) == 3
    assert s["rmse_persistence"] == [0.0, 0.0, 0.0]  # a steady truth: persistence is exact
    torch.testing.assert_close(torch.tensor(s["rmse_climatology"], dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64))
    assert s["divergence_ratio_truth"] < 1e-12 and s["enstrophy_truth"] == pytest.approx(0.5)
    assert "rmse mean" in P.format_physics_summary(s)
