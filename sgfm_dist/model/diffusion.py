"""Variance-preserving diffusion on wavelet coefficients (paper Eq. 17-22, 40): noise
schedules, per-level schedule shifts, the forward process and the eps-DSM loss.

Forward process (Eq. 40), per coefficient i with its own ``alpha_bar_i(tau)``::

    c_tau = sqrt(a) c_0 + sqrt(1 - a) eps,      eps ~ N(0, I),   tau in [0, 1].

Schedules are written in log-SNR ``lambda = log(a / (1 - a))`` so a per-level shift is an
addition: level ``i`` (0 = approximation, 1 = coarsest detail, ..., J = finest detail) gets
``lambda_i(tau) = lambda(tau) + level_shift * (J - i) / J``: coarse scales are noised less
(paper section 5.3), the finest scale follows the base schedule. Because the wavelet
transform W is orthonormal, uniform noise on coefficients is the same white noise on the
field, so with ``level_shift = 0`` this is ordinary field-space diffusion seen in a
multiscale basis.

Parameterisations: the network's raw output is eps or ``v = sqrt(a) eps - sqrt(1 - a) c_0``
(Salimans & Ho 2022); both are turned into ``eps_hat`` and the clean estimate
``c0_hat = (c_tau - sqrt(1 - a) eps_hat) / sqrt(a)`` by the elementwise maps below, so the
loss is always the eps-DSM of Eq. 40.

Notes
-----
The paper's forward SDE (Eq. 17) is written as ``dc = sqrt(2) dW + s dtau``; we use the VP
form that its own loss (Eq. 40) implies. The samplers (``samplers.py``) integrate the
corresponding reverse SDE / probability-flow ODE in the variance-exploding variable
``y = c / sqrt(a)`` with ``sigma^2 = (1 - a) / a``, which is the same process.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.domain import Domain

LINEAR_BETA_MIN, LINEAR_BETA_MAX = 0.1, 20.0
"""beta(tau) range of the linear VP schedule (Song et al. 2021)."""


def base_logsnr(tau: Tensor, schedule: str) -> Tensor:
    """log(a / (1 - a)) of the base schedule at ``tau`` in [0, 1] (+inf at tau = 0 for cosine)."""
    if schedule == "cosine":
        # a = cos^2(pi tau / 2)  =>  a / (1 - a) = cot^2(pi tau / 2)
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * tau))
    if schedule == "linear":
        log_a = -(LINEAR_BETA_MIN * tau + 0.5 * (LINEAR_BETA_MAX - LINEAR_BETA_MIN) * tau ** 2)
        # log(a / (1 - a)) = log_a - log(1 - exp(log_a)), stable near both ends
        return log_a - torch.log(-torch.expm1(log_a))
    raise ValueError(f"schedule: must be 'cosine' or 'linear', got {schedule!r}")


def level_shifts(levels: int, level_shift: float) -> Tensor:
    """Log-SNR shift per scale index ``[J + 1]``: ``level_shift * (J - i) / J`` (0 at the finest)."""
    i = torch.arange(levels + 1, dtype=torch.float64)
    return level_shift * (levels - i) / levels


def level_logsnr(tau: Tensor, schedule: str, levels: int, level_shift: float,
                 logsnr_min: float, logsnr_max: float | None = None, logsnr_shift: float = 0.0) -> Tensor:
    """Per-level log-SNR ``[*tau.shape, J + 1]``: base schedule + ``logsnr_shift`` (all levels)
    + the per-level shift, clamped to ``[logsnr_min, logsnr_max]``.

    ``logsnr_max=None`` leaves the top open so ``tau = 0`` reaches ``a = 1`` exactly (sampling).
    """
    lam = base_logsnr(tau.to(torch.float64), schedule).unsqueeze(-1) + logsnr_shift  # [*, 1]
    lam = lam + level_shifts(levels, level_shift).to(lam.device)  # [*, J+1]
    return lam.clamp(min=logsnr_min, max=logsnr_max)


def alpha_from_logsnr(lam: Tensor) -> Tensor:
    """alpha_bar = sigmoid(lambda)."""
    return torch.sigmoid(lam)


def per_coefficient(level_values: Tensor, scale_index: Tensor) -> Tensor:
    """Spread per-level values ``[B, J + 1]`` onto coefficients ``[B, 1, N]`` by scale index ``[N]``."""
    return level_values[:, scale_index].unsqueeze(1)  # [B, 1, N]


def q_sample(c0: Tensor, alpha: Tensor, eps: Tensor) -> Tensor:
    """Forward process Eq. 40: ``sqrt(a) c0 + sqrt(1 - a) eps`` (alpha broadcast against c0)."""
    return alpha.sqrt() * c0 + (1 - alpha).sqrt() * eps


def eps_and_c0(raw: Tensor, c_tau: Tensor, alpha: Tensor, parameterization: str) -> tuple[Tensor, Tensor]:
    """(eps_hat, c0_hat) from the network's raw output (eps or v) at noise level ``alpha``.

    With v: ``eps = sqrt(1-a) c_tau + sqrt(a) v``, ``c0 = sqrt(a) c_tau - sqrt(1-a) v``, both
    bounded at every noise level. With eps: ``c0 = (c_tau - sqrt(1-a) eps) / sqrt(a)``.
    """
    sa, s1a = alpha.sqrt(), (1 - alpha).sqrt()
    if parameterization == "v":
        return s1a * c_tau + sa * raw, sa * c_tau - s1a * raw
    if parameterization == "eps":
        return raw, (c_tau - s1a * raw) / sa
    raise ValueError(f"parameterization: must be 'eps' or 'v', got {parameterization!r}")


def dsm_loss(eps_hat: Tensor, eps: Tensor, mask: Tensor | None = None, domain: Domain | None = None) -> Tensor:
    """Eq. 40 per sample: mean over channels and coefficients of ``(eps - eps_hat)^2`` -> ``[B]``.

    ``mask`` ([B, 1, N] of 0/1, broadcastable) restricts the mean to selected coefficients
    (cascade mode: the scale being generated). With a split field the sums and counts are
    global through ``domain.sum``.
    """
    sq = (eps - eps_hat).pow(2)  # [B, C, N]
    if mask is None:
        mask = torch.ones_like(sq[:, :1])
    mask = mask.to(sq.dtype)
    num = (sq * mask).flatten(1).sum(1)  # [B]
    den = (mask.expand_as(sq[:, :1]) * sq.shape[1]).flatten(1).sum(1)  # [B]
    if domain is not None:
        num, den = domain.sum(num), domain.sum(den)
    return num / den.clamp(min=1)


def gaussian_dsm_minimum(alpha: Tensor, data_var: float) -> Tensor:
    """Analytic minimum of Eq. 40 per coefficient for data c0 ~ N(0, data_var):
    ``1 - (1-a) / (a data_var + 1 - a) = a data_var / (a data_var + 1 - a)``."""
    return alpha * data_var / (alpha * data_var + 1 - alpha)


def gaussian_eps_predictor(c_tau: Tensor, alpha: Tensor, data_var: float) -> Tensor:
    """The exact eps-predictor E[eps | c_tau] for data c0 ~ N(0, data_var I)."""
    return (1 - alpha).sqrt() * c_tau / (alpha * data_var + 1 - alpha)
