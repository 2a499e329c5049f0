"""Reverse-time samplers for the wavelet-space VP diffusion (paper section 6.4-6.5), as free
functions in the k-diffusion style.

Every sampler has the signature::

    sample_*(model, x, taus, alpha_fn, extra_args=None, callback=None, disable=None, *,
             noise_fn=None, generator=None, energy=None, eta=0.0, constraint=None, domain: Domain = LOCAL)

* ``model(x, tau, **extra_args) -> eps_hat`` (same shape as ``x``): the eps-predictor;
* ``x``: the state at ``taus[0]`` (coefficients ``[B, C, N]``, or any ``[B, ...]``);
* ``taus``: decreasing diffusion times ending at 0 (``get_taus``);
* ``alpha_fn(tau) -> alpha_bar`` broadcastable to ``x`` (per coefficient, so a per-level
  shifted schedule needs nothing special here); ``alpha_fn(0)`` must be 1;
* ``noise_fn(like) -> N(0, I) tensor shaped like like``: fresh noise (default: ``torch.randn``
  from ``generator``); the model passes one that draws a global field and shards it, so a
  sample does not depend on how the field is split;
* ``energy(x) -> [B]`` and ``eta``: the physics-guided correction of Eq. 24,
  ``x <- x - eta grad_x energy(x)``, applied after each step (the model passes
  ``E(W^-1 c)``, optionally plus the boundary energy L_BC of Eq. 44 as guidance);
* ``constraint(x, tau) -> x``: re-imposes known data at noise level ``tau`` after each step
  (inpainting of the prompt rows);
* ``callback({"i", "tau", "x", "denoised"})`` after each step; ``disable`` turns tqdm off.

Notes
-----
All samplers work in the variance-exploding variable ``y = x / sqrt(a)``, with
``sigma^2 = (1 - a) / a`` per coefficient; there the VP process is ``y = c0 + sigma eps`` and
the score is ``grad_y log p = -eps / sigma``. The last step (to ``tau = 0``, ``sigma = 0``)
is the deterministic denoising step ``c0_hat = y - sigma eps_hat`` in every sampler.

Stability of the physics guidance (Eq. 24). ``E`` is quartic in the state (the advection
term of the residual is quadratic), so its curvature grows with the square of the state's
amplitude and of the largest wavenumber, and a plain gradient step ``x - eta grad E``
diverges once ``eta`` exceeds about ``2 / lambda_max(Hessian E)`` at the states the sampler
visits. The stochastic samplers visit far larger states than ``heun`` when steps are few:
one Euler-Maruyama step from ``sigma`` to ``sigma' << sigma`` injects noise of std
``sqrt(sigma^2 - sigma'^2) ~ sigma`` instead of ``sigma'`` (a first-order discretisation,
exact only as steps -> infinity). Measured on the 32x16 text field of
``tests/distributed/exact_cases.py`` (float64, one process): unguarded guidance at 3 steps
blows up for eta >= 0.1 (heun: stable to eta = 1), at 10 steps it turns to NaN from
eta = 0.03, and at 30 steps from eta = 0.3; float32 rounding is amplified by the same
divergence (a split sample then drifts from the single-device one, although the two agree
to 1e-8 in float64). :func:`physics_correction` therefore limits each step to
``max_step_ratio`` (0.5) of the state's norm per sample (a trust region): steps below that
are exactly Eq. 24, larger ones are shortened along the same direction, and the measured
blow-ups all become energy decreases.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from ..ops.domain import LOCAL, Domain

Model = Callable[..., Tensor]


def get_taus(steps: int, rho: float = 1.0, tau_max: float = 1.0, device=None) -> Tensor:
    """``steps + 1`` diffusion times from ``tau_max`` down to 0: ``tau_max * (1 - i/steps)^rho``
    (rho > 1 spends more steps near the data)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be a positive int, got {steps!r}")
    if not rho > 0:
        raise ValueError(f"rho: must be > 0, got {rho}")
    if not 0 < tau_max <= 1:
        raise ValueError(f"tau_max: must lie in (0, 1], got {tau_max}")
    i = torch.arange(steps + 1, dtype=torch.float64, device=device)
    return tau_max * (1 - i / steps) ** rho


def ensemble_stats(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Per-cell ensemble mean and spread (unbiased std; 0 for one member) of ``[E, ...]``."""
    if samples.ndim < 1 or samples.shape[0] < 1:
        raise ValueError(f"samples: expected [E, ...] with E >= 1 members, got shape {tuple(samples.shape)}")
    mean = samples.mean(0)
    if samples.shape[0] == 1:
        return mean, torch.zeros_like(mean)
    return mean, samples.std(0, unbiased=True)


MAX_STEP_RATIO = 0.5
"""Default trust region of :func:`physics_correction`: a step is at most this fraction of ``||x||``."""


def _sample_norms(domain: Domain, *xs: Tensor) -> tuple[Tensor, ...]:
    """Per-sample Euclidean norms of each state over the whole (possibly split) domain, each
    broadcastable ``[B, 1, ...]``; one reduction over the split for all of them."""
    sq = torch.stack([x.flatten(1).pow(2).sum(1) for x in xs])  # [len(xs), B]
    return tuple(n.reshape((-1,) + (1,) * (x.ndim - 1)) for n, x in zip(domain.sum(sq).sqrt(), xs))


def physics_correction(x: Tensor, energy: Callable[[Tensor], Tensor], eta: float, domain: Domain = LOCAL,
                       max_step_ratio: float | None = MAX_STEP_RATIO) -> Tensor:
    """One physics-guided correction step ``x - eta * grad_x energy(x)`` (paper Eq. 24), per sample
    shortened to at most ``max_step_ratio * ||x||`` (None: no limit; see the module notes on why).

    ``energy`` returns the per-sample global energy ``[B]`` (replicated over a split), so its
    gradient is this rank's block of the single-device gradient; the norms are reduced with
    ``domain.sum``, so the limit does not depend on the split either.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(xg).sum(), xg)
    step = eta * grad
    if max_step_ratio is not None:
        if not max_step_ratio > 0:
            raise ValueError(f"max_step_ratio: must be > 0 or None, got {max_step_ratio}")
        # a continuous shrink factor (no branch), so rounding differences cannot flip a decision
        x_norm, step_norm = _sample_norms(domain, x, step)
        step = step * (max_step_ratio * x_norm / step_norm.clamp(min=torch.finfo(x.dtype).tiny)).clamp(max=1.0)
    return x - step


def _sigma(alpha: Tensor) -> Tensor:
    """VE noise level ``sqrt((1 - a) / a)`` (0 where a = 1)."""
    return ((1 - alpha) / alpha).clamp(min=0).sqrt()


def _noise(like: Tensor, noise_fn, generator) -> Tensor:
    if noise_fn is not None:
        return noise_fn(like)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                       device=generator.device if generator is not None else like.device).to(like.device)


def _reverse_sde_step(y: Tensor, eps: Tensor, s: Tensor, s_next: Tensor, noise: Tensor) -> Tensor:
    """One Euler-Maruyama step of the VE reverse SDE from ``sigma = s`` to ``s_next > 0``:
    drift ``(s^2 - s'^2) grad_y log p = -(s^2 - s'^2) eps / s``, diffusion ``sqrt(s^2 - s'^2)``
    (the predictor of both stochastic samplers)."""
    ds2 = (s ** 2 - s_next ** 2).clamp(min=0)
    return y - ds2 / s * eps + ds2.sqrt() * noise


def _finish_step(x: Tensor, tau: float, energy, eta: float, constraint, domain: Domain) -> Tensor:
    """The per-step corrections shared by all samplers: Eq. 24 guidance, then the constraint."""
    if energy is not None and eta > 0:
        x = physics_correction(x, energy, eta, domain)
    if constraint is not None:
        x = constraint(x, tau)
    return x


def _check(x: Tensor, taus: Tensor, alpha_fn) -> None:
    if not isinstance(taus, Tensor) or taus.ndim != 1 or taus.numel() < 2:
        raise ValueError("taus: expected a 1-D tensor of at least 2 decreasing times (get_taus)")
    if bool((taus[1:] >= taus[:-1]).any()) or float(taus[-1]) != 0.0:
        raise ValueError(f"taus: must decrease strictly and end at 0, got {taus.tolist()}")
    a0 = alpha_fn(0.0)
    if not bool((torch.as_tensor(a0) == 1).all()):
        raise ValueError("alpha_fn: alpha_fn(0) must be exactly 1 (the data), so the last step denoises fully")


def _run_sampler(move, model: Model, x: Tensor, taus: Tensor, alpha_fn, extra_args, callback, disable,
                 energy, eta: float, constraint, domain: Domain) -> Tensor:
    """The loop all samplers share; ``move(net, x, y, eps, tau_next, a_next, s, s_next)`` is what
    differs: the state at ``tau_next > 0`` (VP variable) from ``x`` at ``tau``, with ``y = x /
    sqrt(a)`` and ``eps = net(x, tau)``. The step to ``tau = 0`` is the denoising step for all."""
    _check(x, taus, alpha_fn)
    extra_args = extra_args or {}

    def net(x_: Tensor, tau_: float) -> Tensor:
        return model(x_, tau_, **extra_args)

    for i in trange(len(taus) - 1, disable=disable):
        tau, tau_next = float(taus[i]), float(taus[i + 1])
        a, a_next = alpha_fn(tau), alpha_fn(tau_next)
        s, s_next = _sigma(a), _sigma(a_next)
        eps = net(x, tau)
        y = x / a.sqrt()
        denoised = y - s * eps
        x = denoised if tau_next == 0.0 else move(net, x, y, eps, tau_next, a_next, s, s_next)
        x = _finish_step(x, tau_next, energy, eta, constraint, domain)
        if callback is not None:
            callback({"i": i, "tau": tau_next, "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler_maruyama(model: Model, x: Tensor, taus: Tensor, alpha_fn, extra_args=None, callback=None,
                          disable=None, *, noise_fn=None, generator=None, energy=None, eta: float = 0.0,
                          constraint=None, domain: Domain = LOCAL) -> Tensor:
    """Euler-Maruyama discretisation of the reverse-time SDE (paper Eq. 21-22; Song et al. 2021, VP form)."""

    def move(net, x, y, eps, tau_next, a_next, s, s_next):
        return _reverse_sde_step(y, eps, s, s_next, _noise(x, noise_fn, generator)) * a_next.sqrt()

    return _run_sampler(move, model, x, taus, alpha_fn, extra_args, callback, disable, energy, eta, constraint,
                        domain)


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, taus: Tensor, alpha_fn, extra_args=None, callback=None,
                disable=None, *, noise_fn=None, generator=None, energy=None, eta: float = 0.0,
                constraint=None, domain: Domain = LOCAL) -> Tensor:
    """Heun's method on the probability-flow ODE dy/dsigma = eps (Algorithm 1 of Karras et al. 2022; paper section 6.4)."""

    def move(net, x, y, eps, tau_next, a_next, s, s_next):
        y_euler = y + (s_next - s) * eps
        # trapezoid correction with the slope at the Euler end point
        eps_next = net(y_euler * a_next.sqrt(), tau_next)
        return (y + (s_next - s) * 0.5 * (eps + eps_next)) * a_next.sqrt()

    return _run_sampler(move, model, x, taus, alpha_fn, extra_args, callback, disable, energy, eta, constraint,
                        domain)


@torch.no_grad()
def sample_pc(model: Model, x: Tensor, taus: Tensor, alpha_fn, extra_args=None, callback=None,
              disable=None, *, noise_fn=None, generator=None, energy=None, eta: float = 0.0,
              constraint=None, domain: Domain = LOCAL, snr: float = 0.16, corrector_steps: int = 1) -> Tensor:
    """Predictor-corrector: reverse-SDE predictor plus preconditioned Langevin corrector (Algorithms 2 and 5 of Song et al. 2021; paper section 6.4).

    The corrector runs Langevin dynamics on p_tau in the VP variable, preconditioned by the
    per-coefficient noise variance ``1 - a``; its step ``2 (snr ||z|| / ||eps_hat||)^2`` uses
    per-sample norms over the whole (possibly split) state, reduced with ``domain.sum``.
    With ``corrector_steps=0`` it is :func:`sample_euler_maruyama`.
    """
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps: must be >= 0, got {corrector_steps}")

    def move(net, x, y, eps, tau_next, a_next, s, s_next):
        x = _reverse_sde_step(y, eps, s, s_next, _noise(x, noise_fn, generator)) * a_next.sqrt()
        var = 1 - a_next
        for _ in range(corrector_steps):
            eps_c = net(x, tau_next)
            z = _noise(x, noise_fn, generator)
            z_norm, eps_norm = _sample_norms(domain, z, eps_c)
            step = 2 * (snr * z_norm / eps_norm.clamp(min=1e-12)) ** 2
            # preconditioned Langevin: x += step * M * score + sqrt(2 step M) z, M = 1 - a,
            # score = -eps / sqrt(1 - a)
            x = x - step * var.sqrt() * eps_c + (2 * step * var).sqrt() * z
        return x

    return _run_sampler(move, model, x, taus, alpha_fn, extra_args, callback, disable, energy, eta, constraint,
                        domain)


SAMPLERS = {"euler_maruyama": sample_euler_maruyama, "heun": sample_heun, "pc": sample_pc}
"""Sampler name -> function (the names ``SGFM.generate`` accepts)."""
