"""Generation from small wrappers around the model, k-diffusion style (paper Eq. 20-24, 44).

    cascade_estimate   Eq. 20, one cascade stage: a scale denoised given the clean coarser ones;
                       the one coarse-to-fine estimate that training, evaluation and sampling share
    clean_coefficients c0_hat of noised coefficients: joint (one call) or stage by stage
    Stage              what one sampler run generates: every coefficient, or one cascade scale
    Denoiser           ``(x, tau) -> eps_hat`` for the samplers, optionally rounding text to the vocabulary
                       and with the L_BC guidance of Eq. 44 on its clean estimate
    PromptConstraint   inpainting of the prompt after every step (noise-free for prompt-trained models)
    GuidanceEnergy     physics energy (Eq. 23), stepped on by Eq. 24
    CoefficientNoise   N(0, I) coefficients drawn as a global white field (split-independent)
    make_prompt        the prompt's mask, field and ids from prompt tokens / a prompt field
    sample_stage       one sampler run over a stage, from the prior to tau = 0

``SGFM.generate`` composes these; the samplers themselves are the free functions of
``samplers.py``, which know nothing of wavelets, stages or prompts.

Notes
-----
A cascade sample (Eq. 20) is J + 1 sampler runs: scale 0 (the approximation) first, then each
finer scale conditioned on the reconstruction of the coarser ones, finer scales absent (zero).
Training draws one stage per sample and teacher-forces the coarser scales with the data;
evaluation and sampling feed the previous stages' own estimates. All three call
:func:`cascade_estimate`, which sees only "clean coarser coefficients" and "noisy coefficients
of this scale", so the three differ only in where those come from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..ops import dynamics
from ..ops.domain import LOCAL, Domain
from ..ops.wavelets import max_levels
from . import diffusion as D
from .losses import boundary_loss, first_rows_mask
from .samplers import SAMPLERS, get_taus

# ``model`` below is an ``sgfm_dist.model.sgfm.SGFM``; it is typed as an nn.Module because
# sgfm.py imports this module (SGFM.generate composes these wrappers), not the other way round.


# ---------------------------------------------------------------------------- the cascade estimate
def cascade_estimate(model: nn.Module, c_clean: Tensor, c_noisy: Tensor, alpha: Tensor, logsnr: Tensor, lam: Tensor,
                     stage: Tensor, shape: tuple[int, ...], coarse: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """One cascade stage per sample (paper Eq. 20): ``(eps_hat, c0_hat, target)`` of scale ``stage``.

    Scale ``stage [B]`` is denoised from ``c_noisy`` given the clean coarser scales of ``c_clean``.

    ``c_clean``/``c_noisy`` ``[B, C, N]`` are read only on the scales coarser than / equal to each
    sample's ``stage [B]``; ``alpha`` is the noise level of ``c_noisy`` (broadcastable), used in
    its own dtype; ``logsnr [B, J+1]`` and ``lam [B, 2]`` condition the network. ``coarse`` is
    ``W^-1`` of the clean coarser coefficients when the caller already has it (a sampler run
    keeps it fixed). ``c0_hat`` holds the clean coarser scales plus this scale's estimate (finer
    scales zero); ``target [B, 1, N]`` marks this scale (the coefficients the DSM loss sees).
    """
    sidx = model._scale_index(shape, c_noisy.device)  # [N]
    clean = (sidx[None, :] < stage[:, None]).unsqueeze(1).to(c_noisy.dtype)  # [B, 1, N]
    target = (sidx[None, :] == stage[:, None]).unsqueeze(1).to(c_noisy.dtype)  # [B, 1, N]
    c_in = clean * c_clean + target * c_noisy  # [B, C, N]: coarser clean, this scale noisy, finer zero
    if coarse is None:
        coarse = model.to_field(clean * c_clean, shape)  # [B, C, *S]
    raw = model.score_coeffs(c_in, model._conditions(logsnr, lam, stage), shape, coarse)  # [B, C, N]
    eps_hat, c0_hat = D.eps_and_c0(raw, c_in, alpha, model.dcfg.parameterization)  # [B, C, N] each
    return eps_hat, clean * c_clean + target * c0_hat, target


def clean_coefficients(model: nn.Module, c_tau: Tensor, alpha: Tensor, logsnr: Tensor, lam: Tensor,
                       shape: tuple[int, ...]) -> Tensor:
    """``c0_hat [B, C, N]`` of ``c_tau`` noised at ``alpha`` (Eq. 40): one network call, or coarse to fine (Eq. 20).

    A cascade model runs every stage in turn, each conditioned on the previous stages' estimates.
    """
    if not model.cascade:
        return model.eps_network(c_tau, alpha, model._conditions(logsnr, lam, None), shape)[1]
    est = torch.zeros_like(c_tau)  # [B, C, N]: nothing estimated yet
    for s in range(model.cfg.levels + 1):
        stage = torch.full((c_tau.shape[0],), s, device=c_tau.device)  # [B]
        _, est, _ = cascade_estimate(model, est, c_tau, alpha, logsnr, lam, stage, shape)
    return est


# ---------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """What one sampler run generates: every coefficient (joint), or one cascade scale (Eq. 20)."""

    select: slice
    """The run's block of the flattened coefficients (a scale is contiguous there); all for joint."""
    alpha: Callable[[float], Tensor]
    """``tau -> alpha_bar`` broadcastable to the block (per coefficient, or the scale's one value)."""
    last: bool
    """Whether the whole field exists once this run is done (only then can text be rounded)."""
    index: int | None = None
    """Cascade stage s (0 = approximation .. J = finest detail); None for joint."""
    base: Tensor | None = None
    """``[n, C, N]`` the coefficients around the block: coarser scales generated, finer zero (cascade)."""
    coarse: Tensor | None = None
    """``[n, C, *S]`` ``W^-1 base``, the coarse field the cascade network is conditioned on."""

    @classmethod
    def build(cls, model: nn.Module, shape: tuple[int, ...], index: int | None, c: Tensor) -> Stage:
        """The stage ``index`` (None: joint) of a sample whose coefficients so far are ``c [n, C, N]``."""
        dev = c.device
        if index is None:
            return cls(slice(None), model.alpha_fn(shape, dev), True)
        idx = (model._scale_index(shape, dev) == index).nonzero().flatten()
        return cls(slice(int(idx[0]), int(idx[-1]) + 1), model.alpha_fn(shape, dev, scale=index),
                   index == model.cfg.levels, index, c, model.to_field(c, shape))

    def full(self, x: Tensor) -> Tensor:
        """The full coefficients ``[n, C, N]`` with the block ``x`` in place."""
        if self.base is None:
            return x
        out = self.base.clone()
        out[:, :, self.select] = x
        return out

    def part(self, c: Tensor) -> Tensor:
        """The block of full coefficients ``c [n, C, N]``."""
        return c if self.base is None else c[:, :, self.select]


# ---------------------------------------------------------------------------- wrappers
def round_to_vocab(model: nn.Module, c0: Tensor, logsnr: Tensor, shape: tuple[int, ...], temperature: float) -> Tensor:
    """``W sum_b p(b | u_hat) e_b``, ``u_hat = W^-1 c0``: rounding to the vocabulary (Diffusion-LM's clamping).

    ``p`` is the readout softmax at noise level ``logsnr [n]``, logits divided by ``temperature``.
    """
    logits = model.text.logits(model.to_field(c0, shape), logsnr)  # [n, T, L, V]
    if temperature != 1.0:
        logits = logits / temperature
    p = torch.softmax(logits, dim=-1)  # [n, T, L, V]
    u = torch.einsum("n...v,vc->nc...", p, model.text.vectors().to(p.dtype))  # [n, C, T, L]
    return model.to_coeffs(u)


class Denoiser:
    """The eps-network as a sampler's ``model(x, tau) -> eps_hat`` over one stage's block (Eq. 20-22).

    With a ``temperature`` (text), the clean estimate the sampler sees is replaced by the
    readout's expected embedding (:func:`round_to_vocab`) and eps re-derived from it; only a
    stage after which the whole field exists rounds (a coarse cascade stage has no text to read).

    With a ``prompt`` and ``bc_eta > 0``: the L_BC guidance of Eq. 44 on the clean estimate
    (reconstruction guidance, Ho et al. 2022, "Video Diffusion Models", Eq. 7):
    ``c0_hat <- c0_hat - bc_eta sqrt(a) / 2 grad_x S``, ``S`` the sum over the prompt cells of
    ``(u_hat - u0)^2`` (``bc_eta * count / 2`` times L_BC), i.e. ``eps_hat += bc_eta a / (2 sqrt(1 - a))
    grad_x S``. It is the gradient through the network that moves the generated frames towards
    agreeing with the given ones; the same penalty stepped on the noisy state itself would only
    move the prompt cells, which the inpainting constraint overwrites at once.
    """

    def __init__(self, model: nn.Module, stage: Stage, shape: tuple[int, ...], lam: Tensor,
                 temperature: float | None = None, prompt: Prompt | None = None, bc_eta: float = 0.0):
        self.model, self.stage, self.shape, self.lam = model, stage, shape, lam
        self.temperature = temperature if stage.last else None
        n = lam.shape[0]
        self.stage_ids = None if stage.index is None else torch.full((n,), stage.index, device=lam.device)  # [n]
        self.prompt, self.bc_eta = (prompt, float(bc_eta)) if prompt is not None and bc_eta > 0 else (None, 0.0)
        # the clean prompt as network inputs (diffusion.prompt_condition; None otherwise)
        self.given = None if prompt is None or stage.index is not None else model.prompt_inputs(prompt.field, prompt.mask)
        if self.prompt is not None:
            # channels x prompt cells of the whole field: L_BC (a mean) times this is the sum S
            cells = model.domain.sum(self.prompt.mask.sum().reshape(1))
            self.count = cells * self.prompt.field.shape[1]  # [1]

    def _estimate(self, x: Tensor, a: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps_hat [n, C, N_block], c0_hat [n, C, N])`` of the block ``x``."""
        m, st = self.model, self.stage
        if st.index is None:
            return m.eps_network(x, a, m._conditions(logsnr, self.lam, None), self.shape, self.given)  # [n, C, N] each
        eps, c0, _ = cascade_estimate(m, st.base, st.full(x), a, logsnr, self.lam, self.stage_ids, self.shape,
                                      st.coarse)
        return st.part(eps), c0  # [n, C, N_s], [n, C, N]

    def __call__(self, x: Tensor, tau: float) -> Tensor:
        m, st = self.model, self.stage
        a, logsnr = st.alpha(tau), m._logsnr_at(tau, x.shape[0], self.lam.device)  # logsnr [n, J+1]
        grad = None
        if self.prompt is not None:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                eps, c0 = self._estimate(xg, a, logsnr)
                u = m.to_field(c0, self.shape)  # [n, C, *S]
                misfit = boundary_loss(u, self.prompt.field, self.prompt.mask, m.domain) * self.count  # [n]: S
                (grad,) = torch.autograd.grad(misfit.sum(), xg)
            eps, c0 = eps.detach(), c0.detach()
        else:
            eps, c0 = self._estimate(x, a, logsnr)
        if self.temperature is not None:
            # the readout temperature follows the noisiest level (the finest), as in training
            c0 = st.part(round_to_vocab(m, c0, logsnr[:, -1], self.shape, self.temperature))
            eps = (x - a.sqrt() * c0) / (1 - a).sqrt()
        if grad is not None:
            eps = eps + self.bc_eta * a / (2 * (1 - a).sqrt()) * grad
        return eps


@dataclass
class Prompt:
    """The known part of a sample: the initial condition ``u0`` of Eq. 44 on the prompt cells."""

    mask: Tensor
    """``[1, 1, *S_local]`` 1.0 on the prompt cells, 0.0 elsewhere."""
    field: Tensor
    """``[n, C, *S_local]`` the prompt's field (zero outside the mask)."""
    ids: Tensor | None = None
    """``[n or 1, *S_local]`` the prompt's token ids (text), written into the tokens at the end."""

    def paste(self, u: Tensor, value: Tensor | None = None) -> Tensor:
        """``u [n, C, *S]`` with the prompt cells replaced by ``value`` (default: the prompt itself)."""
        return self.mask * (self.field if value is None else value) + (1 - self.mask) * u


class CoefficientNoise:
    """N(0, I) coefficients ``[n, C, N]`` (Eq. 40's eps) as ``W`` of a global white field, sharded.

    Drawn globally and sharded so a sample does not depend on how the field is split; W is
    orthonormal, so white noise in space is white noise in coefficients.
    """

    def __init__(self, model: nn.Module, like: Tensor, generator: torch.Generator | None):
        self.model, self.like, self.generator = model, like, generator

    def __call__(self, x: Tensor | None = None) -> Tensor:
        return self.model.to_coeffs(dynamics.white_noise(self.like, self.generator, self.model.domain))


class PromptConstraint:
    """Inpainting of the prompt (RePaint, Lugmayr et al. 2022) after every sampler step, on one stage's block.

    A model trained with noise-free prompts (``diffusion.prompt_training > 0``) gets them as in
    training: the prompt cells hold ``sqrt(a) u0`` with no noise at every step, from the prior on
    (``start``), so its network continues the prompt instead of reconciling a noised copy of it.
    """

    def __init__(self, model: nn.Module, stage: Stage, shape: tuple[int, ...], prompt: Prompt, noise: CoefficientNoise):
        self.model, self.stage, self.shape, self.prompt, self.noise = model, stage, shape, prompt, noise
        self.c_known = model.to_coeffs(prompt.field) if stage.index is None else None  # [n, C, N]
        self.noise_free = stage.index is None and model.dcfg.prompt_training > 0

    def start(self, x: Tensor) -> Tensor:
        """The prior state ``x`` at tau = 1 as the first network call should see it."""
        return self(x, 1.0) if self.noise_free else x

    def __call__(self, x: Tensor, tau: float) -> Tensor:
        m, st, shape = self.model, self.stage, self.shape
        a = st.alpha(tau)
        if self.noise_free:
            known = m.to_field(a.sqrt() * self.c_known, shape)  # [n, C, *S]: the prompt's state at tau, no noise
            return m.to_coeffs(self.prompt.paste(m.to_field(x, shape), known))
        if st.index is None:
            # every coefficient is at noise level tau: noise the prompt to tau and paste it in
            noisy_known = m.to_field(a.sqrt() * self.c_known + (1 - a).sqrt() * self.noise(x), shape)  # [n, C, *S]
            return m.to_coeffs(self.prompt.paste(m.to_field(x, shape), noisy_known))
        # only this scale is noisy (coarser ones clean, finer absent): noising the pasted field
        # would noise the clean scales too, so paste the clean prompt into the current field
        # and noise just this scale's coefficients of the result
        target = st.part(m.to_coeffs(self.prompt.paste(m.to_field(st.full(x), shape))))  # [n, C, N_s]
        return a.sqrt() * target + (1 - a).sqrt() * st.part(self.noise(x)) if tau > 0 else target


class GuidanceEnergy:
    """Guidance energy ``physics_eta E(W^-1 c)`` ``[n]`` (Eq. 23; stepped on by Eq. 24). The L_BC
    guidance of Eq. 44 acts on the clean estimate instead (:class:`Denoiser`)."""

    def __init__(self, model: nn.Module, stage: Stage, shape: tuple[int, ...], xi: Tensor | None, lam: Tensor,
                 physics_eta: float, shift: Tensor | None = None):
        self.model, self.stage, self.shape, self.xi, self.lam = model, stage, shape, xi, lam
        self.physics_eta, self.shift = physics_eta, shift

    @classmethod
    def build(cls, model: nn.Module, stage: Stage, shape: tuple[int, ...], xi: Tensor | None, lam: Tensor,
              physics_eta: float, shift: Tensor | None = None) -> GuidanceEnergy | None:
        """The energy, or None when it would be identically zero (no guidance step at all).
        ``shift [n, C, *S]``: added to the field before E (the prompt's last slice after it, for a
        model that diffuses increments: E is a function of the state)."""
        if physics_eta == 0:
            return None
        return cls(model, stage, shape, xi, lam, physics_eta, shift)

    def __call__(self, x: Tensor) -> Tensor:
        m = self.model
        u = m.to_field(self.stage.full(x), self.shape)  # [n, C, *S]
        if self.shift is not None:
            u = u + self.shift
        return self.physics_eta * m.physics_energy(u, self.xi, self.lam)


# ---------------------------------------------------------------------------- a sampler run
def sample_stage(step_fn: Callable, steps: int, stage: Stage, denoiser: Denoiser, noise: CoefficientNoise,
                 energy: GuidanceEnergy | None = None, constraint: PromptConstraint | None = None,
                 domain: Domain = LOCAL, disable: bool | None = True) -> Tensor:
    """One sampler run over the stage's block, tau = 1 to 0 (Eq. 21-22, 24); returns all coefficients ``[n, C, N]``."""

    def block_noise(like: Tensor | None) -> Tensor:
        return stage.part(noise(like))  # [n, C, N_s]

    x = (1 - stage.alpha(1.0)).sqrt() * block_noise(None)  # the prior: alpha(1) ~ 0
    if constraint is not None:
        x = constraint.start(x)
    # the energy already carries the guidance weights, so the step size of Eq. 24 is 1
    x = step_fn(denoiser, x, get_taus(steps), stage.alpha, noise_fn=block_noise, energy=energy,
                eta=0.0 if energy is None else 1.0, constraint=constraint, domain=domain, disable=disable)
    return stage.full(x)


# ---------------------------------------------------------------------------- requests and prompts
def check_request(model: nn.Module, n: int, field_shape, sampler: str, physics_eta: float, bc_eta: float,
                  vocab_temperature: float) -> tuple[int, ...]:
    """Check the arguments of ``SGFM.generate``; returns ``field_shape`` as a tuple of ints."""
    cfg = model.cfg
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive int, got {n!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    for name, v in (("physics_eta", physics_eta), ("bc_eta", bc_eta)):
        if not v >= 0:
            raise ValueError(f"{name}: must be >= 0, got {v}")
    if not vocab_temperature > 0:
        raise ValueError(f"vocab_temperature: must be > 0, got {vocab_temperature}")
    field_shape = tuple(int(s) for s in field_shape)
    model._check_shape(field_shape, "field_shape")
    for i, s in enumerate(field_shape):
        if cfg.levels > max_levels(s, cfg.wavelet):
            raise ValueError(f"field_shape: extent {s} of axis {i} is too small for {cfg.levels} levels of "
                             f"{cfg.wavelet!r} (at most {max_levels(s, cfg.wavelet)})")
    return field_shape


def prompt_increment_rows(model: nn.Module, prompt_field: Tensor | None) -> int:
    """P when ``model`` diffuses the slices after a prompt as increments over its last slice
    (``diffusion.prompt_residual``) and ``prompt_field`` gives P slices (any 1 <= P; a model
    forecasts best from the prompt lengths it was trained with, ``diffusion.bc_rows`` or
    ``diffusion.prompt_lengths``); 0 without increments."""
    if not getattr(model.dcfg, "prompt_residual", False) or prompt_field is None:
        return 0
    P = int(prompt_field.shape[2])
    if P < 1:
        raise ValueError(f"prompt_field: a prompt of {P} slices; increments need at least one given slice")
    return P


def make_prompt(model: nn.Module, prompt_tokens: Tensor | None, prompt_field: Tensor | None, n: int,
                like: Tensor) -> Prompt | None:
    """The :class:`Prompt` of ``n`` samples shaped like ``like [n, C, *S_local]``, or None without one
    (the model's modality says which prompts it takes: ``modalities.Modality.prompt``)."""
    return model.modality.prompt(model, prompt_tokens, prompt_field, n, like)


def token_prompt(model: nn.Module, prompt_tokens: Tensor, n: int, like: Tensor) -> Prompt:
    """A text prompt: the first P positions in reading order hold the ids ``prompt_tokens [n or 1, P]``."""
    cfg, dom = model.cfg, model.domain
    g_shape = tuple(dom.global_extent(like, a) for a in range(2, like.ndim))
    p = torch.as_tensor(prompt_tokens)
    if p.ndim == 1:
        p = p.unsqueeze(0)
    model.text.check_tokens(p, "prompt_tokens")
    if p.ndim != 2 or p.shape[0] not in (1, n):
        raise ValueError(f"prompt_tokens: expected [n={n} or 1, P] ids, got shape {tuple(p.shape)}")
    T, L = g_shape
    P = p.shape[1]
    if P > T * L:
        raise ValueError(f"prompt_tokens: {P} prompt tokens do not fit a field of {T}x{L} = {T * L} positions")
    # the prompt is the first P positions in reading order: whole rows, then part of one
    ids = torch.full((p.shape[0], T * L), cfg.pad_id, dtype=torch.long, device=like.device)  # [n or 1, T*L]
    ids[:, :P] = p.to(like.device).long()
    mask = torch.zeros(1, 1, T * L, device=like.device, dtype=like.dtype)
    mask[..., :P] = 1
    field = model.text.encode(ids.view(-1, T, L)).to(like.dtype).expand(n, -1, -1, -1)  # [n, C, T, L]
    mask = mask.view(1, 1, T, L)
    ids_local = dom.shard(ids.view(-1, 1, T, L))[:, 0]  # [n or 1, T_loc, L_loc]
    return Prompt(dom.shard(mask), dom.shard(field.contiguous()), ids_local)


def field_prompt(model: nn.Module, prompt_field: Tensor, n: int, like: Tensor, data_channels: int,
                 lift: Callable[[Tensor], Tensor]) -> Prompt:
    """A field prompt: the first P t-slices (frames, snapshots) ``prompt_field [n or 1, D, P, *S_rest]``
    in the data's ``data_channels``, lifted to the field's channels by ``lift``."""
    cfg, dom = model.cfg, model.domain
    g_shape = tuple(dom.global_extent(like, a) for a in range(2, like.ndim))
    pf = torch.as_tensor(prompt_field).to(like.device, like.dtype)
    want = data_channels
    if pf.ndim != len(g_shape) + 2 or pf.shape[0] not in (1, n) or pf.shape[1] != want \
            or tuple(pf.shape[3:]) != g_shape[1:] or pf.shape[2] > g_shape[0]:
        raise ValueError(f"prompt_field: expected [n or 1, {want}, P <= {g_shape[0]}, *{g_shape[1:]}], "
                         f"got shape {tuple(pf.shape)}")
    P = pf.shape[2]
    pf = lift(pf)
    field = torch.zeros(pf.shape[0], cfg.channels, *g_shape, device=like.device, dtype=like.dtype)
    field[:, :, :P] = pf  # the first P t-slices (frames)
    # the cells L_BC trains on for a prompt of P frames (losses.first_rows_mask), so the guidance
    # energy of this prompt is the trained L_BC when P = diffusion.bc_rows
    mask = first_rows_mask(like, P, dom)  # [1, 1, *S_local]
    return Prompt(mask, dom.shard(field.expand(n, *field.shape[1:]).contiguous()))
