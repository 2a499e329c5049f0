"""The Spectral Generative Flow Model: wavelet-space score diffusion with a physics-corrected
field, for text (d = 2), video and physics (d = 3) fields.

Pipeline (paper Fig. 1, Eq. 17-24, 38-44)::

    data -> field u0 [B, C, *S] -> c0 = W u0 [B, C, N] -> c_tau = sqrt(a) c0 + sqrt(1-a) eps  (Eq. 40)
    eps-network: u_tau = W^-1 c_tau -> score net (physical space) -> W -> eps_hat, c0_hat
    u_hat = W^-1 c0_hat -> physics residual ||P R(u_hat)||^2, L_BC, readout cross-entropy  (Eq. 38)

Design decisions (see also DESIGN.md section 1):

* **Diffusion in wavelet coefficients** (``diffusion.py``): VP with a cosine (or linear)
  schedule and an optional per-level log-SNR shift so coarse scales are noised less; the
  eps-DSM loss of Eq. 40 on the flattened coefficients ``[B, C, N]``.
* **The eps-network works in physical space.** Because W is orthonormal, the noisy
  coefficients are rebuilt into the noisy field ``W^-1 c_tau``, processed by periodic local
  convolutions and spectral mixing (``networks.py``), and the output is transformed back
  with W. The network is conditioned (FiLM) on Fourier features of the per-level noise
  levels (one log-SNR per scale: the "per-scale noise-level input"), on the physical
  parameters lambda = (nu, forcing strength; dt for physics) (Eq. 20) and, in cascade mode, on the stage.
* **Modes.** *joint*: all scales are noised and denoised together. *cascade* (Eq. 20):
  a stage ``s`` in 0..J is drawn per sample; scales ``< s`` are clean (teacher forcing),
  scale ``s`` is noised, finer scales are absent (zero); the network also receives the
  coarse reconstruction ``W^-1(c_{<s})`` as extra input channels and the loss is the DSM on
  scale ``s`` only. The sampler generates scale 0 (the approximation) first, then each finer
  scale conditioned on the reconstruction of the coarser ones. Training, evaluation and
  sampling share one stage estimate (``generation.cascade_estimate``).
* **Generation** (``generation.py``): ``generate`` composes small wrappers, k-diffusion
  style: a denoiser around the eps-network, a prompt constraint, a guidance energy, one
  sampler run per stage; the samplers are the free functions of ``samplers.py``.
* **Physics.** ``R(u) = d_t u + (u.grad)u - nu Lap u - f_theta(u, xi)`` (Eq. 41) projected by
  P (Eq. 43), mean over cells (``ops.dynamics``). Physics/video fields use the spatial axes
  as flow axes and t as time (``dynamics.residual``). The text field uses *all* field axes as
  flow axes (u = (u_t, u_x), grad = (d_t, d_x), Eq. 25-28); its lone d_t u is the same
  periodic derivative the gradient takes along t (``time_derivative="flow"``). The forcing network
  ``f_theta(u, xi)`` is a smaller stack of the same blocks, fed the field and a white-noise
  input xi, scaled by ``forcing_strength``. nu, dt and the forcing strength are each sample's
  own (the batch's ``nu``, ``dt``, ``forcing_strength`` [B], from the corpus' metadata; the
  config's where a batch has none): the residual, the drift and the conditioning all read
  lambda ``[B, 3]`` (``physics_spec``), so a batch mixing viscosities is right sample by
  sample. A 3-D flow is a field (t, z, y, x) (``model.spatial_dims: 3``).
* **L_BC** (Eq. 44): mean square of ``u_hat - u0`` on the first k t-slices, k = ``bc_rows`` or
  each sample's drawn prompt length (``prompt_lengths``) (the initial condition, i.e. the prompt
  rows of text / first frames of video, the same k its noise-free prompt and increments use);
  ``losses.boundary_loss``, the same function the sampler's guidance uses. The total of
  Eq. 38 is ``losses.composite_loss``.
* **Readout.** Text: tied-embedding logits of ``u_hat``, cross-entropy over real tokens
  (pads masked). Video: MSE of the tied readout of ``u_hat`` against the frames.
* **Precision.** The networks run in their parameters' dtype (bf16/fp16 under DeepSpeed);
  the wavelet transforms, noise, losses and physics run in float32 (float64 if the model is
  float64), casting at the network boundary, because FFTs and the orthonormal transform need
  the precision (and torch has no bf16 FFT).
* **Domain seam.** Everything that touches space goes through ``self.domain`` (wavelets,
  spectral ops, convolutions, reductions); ``set_domain`` swaps it everywhere. Noise is drawn
  as the global field and ``domain.shard``-ed (``dynamics.white_noise``), so results do not
  depend on the split; the diffusion times come from the caller's generator, so all ranks
  that share a sample must pass identically seeded generators.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import Tensor, nn

from ..ops import dynamics
from ..ops.domain import LOCAL, Domain
from ..ops.draws import SampleDraws
from ..ops.wavelets import coeff_layout, dwt, flatten_coeffs, idwt, unflatten_coeffs
from . import diffusion as D
from . import generation as G
from .config import DiffusionConfig, ModelConfig
from .losses import (boundary_loss, composite_loss, first_rows_mask, given_prompt_mask, loss_weights,
                     prompt_increments)
from .modalities import build_modality
from .networks import ConditionEmbedding, FieldNet
from .samplers import SAMPLERS


class SGFM(nn.Module):
    """Spectral Generative Flow Model (score network, forcing network, field maps)."""

    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig):
        super().__init__()
        if not isinstance(model_cfg, ModelConfig):
            raise ValueError(f"model_cfg: expected a ModelConfig, got {type(model_cfg).__name__}")
        if not isinstance(diffusion_cfg, DiffusionConfig):
            raise ValueError(f"diffusion_cfg: expected a DiffusionConfig, got {type(diffusion_cfg).__name__}")
        self.cfg, self.dcfg = model_cfg, diffusion_cfg
        self.domain = LOCAL
        cfg, C, d, J = model_cfg, model_cfg.channels, model_cfg.field_ndim, model_cfg.levels
        self.cascade = diffusion_cfg.mode == "cascade"
        # the modality's encoder / readout; its learned maps (text embedding, video lift) are
        # registered here under their own names, first, as they always were
        self.modality = build_modality(cfg)
        for name, module in self.modality.modules().items():
            self.add_module(name, module)
        if not cfg.physics:  # model.physics off (time series by default): no residual term, no forcing
            self.dcfg = diffusion_cfg = dataclasses.replace(diffusion_cfg, lambda_R=0.0)
        # conditions: one log-SNR per scale, lambda = (nu, forcing strength), cascade stage
        self.n_conditions = (J + 1) + 2 + (1 if self.cascade else 0)
        self.condition = ConditionEmbedding(self.n_conditions, cfg.fourier_features, cfg.cond_dim)
        in_ch = (2 * C if self.cascade else C) + 2 * cfg.positions * d  # + position features (model.positions)
        self.prompt_channels = C + 1 if diffusion_cfg.prompt_condition else 0  # the clean prompt and its mask
        in_ch += self.prompt_channels
        self.score_net = FieldNet(in_ch, C, cfg.width, cfg.n_blocks, cfg.kernel_size, cfg.spectral_modes, d,
                                  cfg.cond_dim, cfg.mlp_ratio)
        if cfg.forcing_blocks > 0 and cfg.physics:
            self.forcing_condition = ConditionEmbedding(2, cfg.fourier_features, cfg.cond_dim, seed=1)
            self.forcing_net = FieldNet(C + cfg.forcing_noise_channels, C, cfg.forcing_width, cfg.forcing_blocks,
                                        cfg.kernel_size, cfg.spectral_modes, d, cfg.cond_dim, cfg.mlp_ratio)
        else:
            self.forcing_net = None
        flow = cfg.flow_axes()
        lengths = None if cfg.lengths is None else tuple(cfg.lengths[a - 2] for a in flow)
        # Text uses t as a flow axis too (Eq. 25-28): its d_t is then the gradient's own d_t.
        # The config's nu and dt; a batch's own values replace them per sample (physics_spec).
        self.flow_spec = dynamics.FlowSpec(flow_axes=flow, time_axis=2, lengths=lengths, dt=cfg.dt,
                                           nu=cfg.nu, derivative=cfg.derivative,
                                           time_derivative="flow" if 2 in flow else cfg.time_derivative)
        # The frame spacing dt conditions physics models (cfg.physical_conditions) through a
        # branch added to the conditioning vector. Its output layer starts at zero and it is
        # built last, on a forked RNG: every other weight, and the model's first step, are those
        # of the same config without it.
        self.dt_condition = None
        if "dt" in cfg.physical_conditions:
            with torch.random.fork_rng(devices=[]):
                self.dt_condition = ConditionEmbedding(1, cfg.fourier_features, cfg.cond_dim, seed=2)
            with torch.no_grad():
                self.dt_condition.mlp[-2].weight.zero_()
                self.dt_condition.mlp[-2].bias.zero_()

    # ------------------------------------------------------------------ domain
    def set_domain(self, domain: Domain) -> None:
        """Use ``domain`` (a LocalDomain or the split domain of ``sgfm_dist.parallel``) for every
        operation that touches the field's spatial structure, in this model and all its layers."""
        for required in ("pad", "rfft", "irfft", "wavenumbers", "sum", "shard", "global_extent", "numel"):
            if not hasattr(domain, required):
                raise ValueError(f"domain: {type(domain).__name__} has no method {required!r} (see ops/domain.py)")
        self.domain = domain
        for module in self.modules():
            if module is not self and hasattr(module, "domain"):
                module.domain = domain

    # ------------------------------------------------------------------ dtypes
    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of the networks (what DeepSpeed cast them to)."""
        return self.score_net.lift.weight.dtype

    @property
    def math_dtype(self) -> torch.dtype:
        """dtype of transforms, noise and losses: float64 for a float64 model, else float32."""
        return torch.float64 if self.param_dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ field maps
    def embedding_matrix(self) -> Tensor:
        """``[V, C]``: the vectors e_b the text field places at each position (norm sqrt(C))."""
        if getattr(self, "text", None) is None:
            raise ValueError(f"embedding_matrix: only text models have an embedding (modality={self.cfg.modality!r})")
        return self.text.vectors()

    def encode(self, batch: dict) -> Tensor:
        """The clean field ``u0`` ``[B, C, *S]`` of a batch (checked)."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
        u0 = self.modality.encode(self, batch)  # [B, C, *S]
        self._check_shape(tuple(u0.shape[2:]), "batch field")
        return u0

    def _check_shape(self, shape: tuple[int, ...], name: str) -> None:
        J = self.cfg.levels
        if len(shape) != self.cfg.field_ndim:
            raise ValueError(f"{name}: a {self.cfg.modality} field has {self.cfg.field_ndim} field axes, "
                             f"got shape {shape}")
        for i, n in enumerate(shape):
            if n % (2 ** J):
                raise ValueError(f"{name}: extent {n} of field axis {i} is not divisible by 2**levels = {2 ** J} "
                                 f"(model.levels={J}); pad or crop the field")

    # ------------------------------------------------------------------ wavelets
    def _layout(self, shape):
        return coeff_layout(tuple(shape), self.cfg.levels, self.cfg.wavelet)

    def to_coeffs(self, u: Tensor) -> Tensor:
        """``W u``: ``[B, C, *S] -> [B, C, N]``."""
        return flatten_coeffs(dwt(u, self.cfg.wavelet, self.cfg.levels, self.domain))

    def to_field(self, c: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``W^-1 c``: ``[B, C, N] -> [B, C, *shape]`` (``shape`` the local field shape)."""
        return idwt(unflatten_coeffs(c, self._layout(shape)), self.domain)

    def _scale_index(self, shape, device) -> Tensor:
        return self._layout(shape).scale_index(device)  # [N]

    # ------------------------------------------------------------------ schedule and conditioning
    def level_logsnr(self, tau: Tensor, clamp_top: bool = True) -> Tensor:
        """Per-level log-SNR ``[*tau.shape, J+1]`` of the configured schedule (``clamp_top=False``
        lets tau = 0 reach alpha_bar = 1 exactly, for sampling)."""
        d = self.dcfg
        return D.level_logsnr(tau, d.schedule, self.cfg.levels, d.level_shift, d.logsnr_min,
                              d.logsnr_max if clamp_top else None, d.logsnr_shift)

    def _lambda(self, batch: dict | None, B: int, device) -> Tensor:
        """Physical parameters lambda ``[B, 3]``: (nu, forcing strength, dt), each sample's own where
        the batch has them (``nu``, ``forcing_strength``, ``dt`` of ``[B]`` or one value), the
        config's otherwise. A value that is not finite, or nu < 0, dt <= 0, is refused here: it
        would turn the conditioning into NaN (the data layer names the shard; this catches the rest)."""
        cfg = self.cfg
        values = []
        for key, default in (("nu", cfg.nu), ("forcing_strength", cfg.forcing_strength), ("dt", cfg.dt)):
            v = batch.get(key) if batch is not None else None
            if v is None:
                values.append(torch.full((B,), float(default), device=device))
                continue
            v = torch.as_tensor(v, device=device, dtype=torch.float32).reshape(-1)  # [B] or [1]
            if v.numel() not in (1, B):
                raise ValueError(f"batch[{key!r}]: expected {B} per-sample values (or one), got {v.numel()}")
            if v.device.type == "cpu":  # on an accelerator this would stall every step; the loader checked
                ok = torch.isfinite(v) & ((v > 0) if key == "dt" else (v >= 0))
                if not bool(ok.all()):
                    raise ValueError(f"batch[{key!r}]: physical parameter must be finite and "
                                     f"{'> 0' if key == 'dt' else '>= 0'}, got {v.tolist()}")
            values.append(v.expand(B))
        return torch.stack(values, dim=1)  # [B, 3]

    def _physical_inputs(self, lam: Tensor) -> Tensor:
        """O(1) network inputs ``[B, 2]`` of lambda ``[B, 3]``: log10(nu) / 3 and the forcing strength."""
        return torch.stack([torch.log10(lam[:, 0].clamp(min=1e-6)) / 3.0, lam[:, 1]], dim=1)

    def physics_spec(self, lam: Tensor | None) -> dynamics.FlowSpec:
        """The FlowSpec of a batch: the model's ``flow_spec`` with each sample's nu and dt of lambda
        ``[B, 3]`` (None: the config's)."""
        if lam is None:
            return self.flow_spec
        return dataclasses.replace(self.flow_spec, nu=lam[:, 0], dt=lam[:, 2])

    def _conditions(self, logsnr: Tensor, lam: Tensor, stage: Tensor | None) -> Tensor:
        """``cond [B, cond_dim]`` from per-level log-SNR ``[B, J+1]``, lambda ``[B, 3]``, stage ``[B]``."""
        dcfg = self.dcfg
        lsn = logsnr.clamp(dcfg.logsnr_min, dcfg.logsnr_max).float() / 10.0  # O(1) inputs
        parts = [lsn, self._physical_inputs(lam)]
        if self.cascade:
            parts.append((stage.float() / self.cfg.levels).unsqueeze(1))
        cond = self.condition(torch.cat(parts, dim=1).to(lsn.device, self.param_dtype))  # [B, cond_dim]
        if self.dt_condition is not None:
            log_dt = torch.log10(lam[:, 2:3].clamp(min=1e-6)).to(lsn.device, self.param_dtype)  # [B, 1]
            cond = cond + self.dt_condition(log_dt)
        return cond

    # ------------------------------------------------------------------ the eps-network
    def score_coeffs(self, c_in: Tensor, cond: Tensor, shape: tuple[int, ...],
                     coarse: Tensor | None = None, given: Tensor | None = None) -> Tensor:
        """The score network's raw output (eps or v, Eq. 20) ``[B, C, N]`` for noisy coefficients
        ``c_in``, run in physical space; a cascade model also sees the coarse field ``[B, C, *S]``,
        a ``diffusion.prompt_condition`` model the clean prompt ``given [B, C + 1, *S]``
        (``prompt_inputs``; None: no prompt)."""
        x = self.to_field(c_in, shape)  # [B, C, *S]
        if self.cascade:
            x = torch.cat([x, coarse], dim=1)  # [B, 2C, *S]
        if self.prompt_channels:
            if given is None:
                given = x.new_zeros(x.shape[0], self.prompt_channels, *x.shape[2:])
            x = torch.cat([x, given.to(x.dtype)], dim=1)  # [B, C + C + 1, *S]
        if self.cfg.positions:
            x = torch.cat([x, self.position_features(x)], dim=1)  # [B, (2)C + 2Kd, *S]
        return self.to_coeffs(self.score_net(x.to(self.param_dtype), cond).to(c_in.dtype))  # [B, C, N]

    def prompt_inputs(self, field: Tensor, mask: Tensor) -> Tensor | None:
        """The clean prompt condition ``[B, C + 1, *S]`` of a ``diffusion.prompt_condition`` model:
        ``field [B, C, *S]`` on the prompt cells and the mask ``[B or 1, 1, *S]`` of those cells
        (None for other models)."""
        if not self.prompt_channels:
            return None
        mask = mask.to(field.dtype).expand(field.shape[0], 1, *field.shape[2:])
        return torch.cat([field * mask, mask], dim=1)

    def position_features(self, like: Tensor) -> Tensor:
        """``[B, 2 K d, *S_local]``: cos and sin of k * 2 pi (i + 1/2) / n (k = 1..K = ``model.positions``)
        of each cell's global index i along each field axis of n cells, made globally and sharded
        (the same features whatever the split)."""
        K, dom = self.cfg.positions, self.domain
        g_shape = [dom.global_extent(like, a) for a in range(2, like.ndim)]
        feats = []
        for i, n in enumerate(g_shape):
            phase = (torch.arange(n, device=like.device, dtype=torch.float64) + 0.5) * (2 * math.pi / n)  # [n]
            view = [1] * len(g_shape)
            view[i] = n
            for k in range(1, K + 1):
                for f in (torch.cos(k * phase), torch.sin(k * phase)):
                    feats.append(f.reshape(view).expand(g_shape))
        pos = torch.stack(feats).unsqueeze(0).to(like.dtype)  # [1, 2Kd, *S_global]
        return dom.shard(pos).expand(like.shape[0], -1, *([-1] * len(g_shape)))  # [B, 2Kd, *S_local]

    def eps_network(self, c_in: Tensor, alpha: Tensor, cond: Tensor, shape: tuple[int, ...],
                    given: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(eps_hat, c0_hat)`` ``[B, C, N]`` of a joint model for noisy coefficients ``c_in`` at
        per-coefficient noise level ``alpha`` (broadcastable; cast to the coefficients' dtype),
        ``given`` the clean prompt inputs of a ``prompt_condition`` model (``prompt_inputs``).
        A cascade model's stage goes through ``generation.cascade_estimate``."""
        raw = self.score_coeffs(c_in, cond, shape, given=given)  # [B, C, N]
        return D.eps_and_c0(raw, c_in, alpha.to(raw.dtype), self.dcfg.parameterization)

    # ------------------------------------------------------------------ physics
    def forcing(self, u: Tensor, xi: Tensor | None, lam: Tensor) -> Tensor | None:
        """``forcing_strength * f_theta(u, xi)`` ``[B, C, *S]`` (None without a forcing network);
        ``xi=None`` means a zero noise input (the mean forcing)."""
        if self.forcing_net is None:
            return None
        if self.cfg.forcing_noise_channels:
            if xi is None:
                xi = u.new_zeros(u.shape[0], self.cfg.forcing_noise_channels, *u.shape[2:])
            u = torch.cat([u, xi], dim=1)  # [B, C + Cxi, *S]
        pd = self.param_dtype
        cond = self.forcing_condition(self._physical_inputs(lam).to(pd))
        f = self.forcing_net(u.to(pd), cond).to(u.dtype)  # [B, C, *S]
        return f * lam[:, 1].reshape(-1, *([1] * (f.ndim - 1))).to(f.dtype)

    def forcing_noise(self, like: Tensor, generator=None) -> Tensor | None:
        """The white-noise input xi of f_theta (global field, sharded), or None."""
        k = self.cfg.forcing_noise_channels
        if self.forcing_net is None or k == 0:
            return None
        return dynamics.white_noise(like[:, :1].expand(-1, k, *like.shape[2:]), generator, self.domain, "forcing")

    def physics_energy(self, u: Tensor, xi: Tensor | None = None, lam: Tensor | None = None) -> Tensor:
        """``E(u) = mean |P R(u)|^2`` per sample ``[B]`` (Eq. 23 / 42), with the learned forcing and
        each sample's nu and dt of lambda ``[B, 3]`` (None: the config's)."""
        if lam is None:
            lam = self._lambda(None, u.shape[0], u.device)
        return dynamics.physics_energy(u, self.physics_spec(lam), self.forcing(u, xi, lam), self.domain)

    # ------------------------------------------------------------------ readout
    def _readout_loss(self, u_hat: Tensor, batch: dict, logsnr: Tensor, weight: Tensor | None = None) -> Tensor | None:
        """The modality's readout term of ``u_hat``, an estimate made at noise level ``logsnr [B]``
        (text: masked cross-entropy of the tied readout; video: its MSE; None without a readout).
        ``weight [B]`` selects samples (cascade: the final stage)."""
        return self.modality.readout_loss(self, u_hat, batch, logsnr, weight)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Composite loss (Eq. 38): ``L_diff + lambda_R ||P R(u_hat)||^2 + lambda_B L_BC + lambda_ce L_readout``.

        Returns the total and each term detached: ``diff``, ``physics``, ``bc`` and ``ce`` (text)
        or ``recon`` (video). Diffusion times and noise come from ``generator`` (global RNG if None):
        a ``torch.Generator``, or the trainer's :class:`~sgfm_dist.ops.draws.SampleDraws`, which draws
        every random number of a sample from its global sample index (times stratified over the
        global batch), so the loss does not depend on how samples are spread over ranks.
        """
        dcfg, cfg = self.dcfg, self.cfg
        u0 = self.encode(batch)  # [B, C, *S]
        B, shape, dev = u0.shape[0], tuple(u0.shape[2:]), u0.device
        J = cfg.levels
        sidx = self._scale_index(shape, dev)  # [N]
        c0 = self.to_coeffs(u0)  # [B, C, N]
        gdev = generator.device if generator is not None else dev
        # stratified diffusion times: one uniform offset, B evenly spaced points (lower variance)
        per_sample = isinstance(generator, SampleDraws)
        if per_sample:
            generator.check_batch(B)
            tau = generator.stratified_tau().to(dev)  # [B], stratified over the global batch
        else:
            tau = ((torch.rand(1, generator=generator, device=gdev) + torch.arange(B, device=gdev) / B) % 1.0).to(dev)
        tau = tau.clamp(min=1e-5)
        logsnr = self.level_logsnr(tau)  # [B, J+1]
        alpha = D.per_coefficient(D.alpha_from_logsnr(logsnr), sidx).to(u0.dtype)  # [B, 1, N]
        noise = dynamics.white_noise(u0, generator, self.domain)  # [B, C, *S], iid N(0, 1)
        shift = None  # [B, C, *S] what prompt_residual subtracts from the diffused field
        given = None  # [B] the samples given their prompt noise-free
        if dcfg.prompt_training > 0:
            # a drawn share of the samples is given its first rows slices noise-free: the model
            # learns to continue a prompt (drawn after the noise, so the unprompted stream is unchanged)
            draw = generator.uniform("prompt") if per_sample else torch.rand(B, generator=generator, device=gdev)
            given = draw.to(dev) < dcfg.prompt_training  # [B]
        # the prompt length: diffusion.bc_rows, or one drawn per sample (diffusion.prompt_lengths)
        rows = self._training_prompt_rows(u0, generator, per_sample)  # int or [B]
        prompt_in = None  # [B, C + 1, *S] the clean prompt condition (diffusion.prompt_condition)
        if given is not None:
            given_cells = given_prompt_mask(u0, rows, given, self.domain)  # [B, 1, *S]
            noise = noise * (1 - given_cells)
            prompt_in = self.prompt_inputs(u0, given_cells)
            if dcfg.prompt_residual:
                # the given samples diffuse the increments over their last prompt slice
                shift = u0 - prompt_increments(u0, rows, given, domain=self.domain)
                c0 = self.to_coeffs(u0 - shift)
        eps = self.to_coeffs(noise)  # [B, C, N]
        c_tau = D.q_sample(c0, alpha, eps)
        lam = self._lambda(batch, B, dev)
        if self.cascade:
            # Eq. 20 teacher forced: one stage per sample, its coarser scales the clean data
            stage = (generator.randint(J + 1, "stage") if per_sample else
                     torch.randint(0, J + 1, (B,), generator=generator, device=gdev)).to(dev)  # [B]
            eps_hat, c0_hat, target = G.cascade_estimate(self, c0, c_tau, alpha, logsnr, lam, stage, shape)
        else:
            stage = target = None
            eps_hat, c0_hat = self.eps_network(c_tau, alpha, self._conditions(logsnr, lam, None), shape, prompt_in)
        terms = {"diff": D.dsm_loss(eps_hat, eps, target, self.domain).mean()}  # only the stage's scale (cascade)
        u_hat = self.to_field(c0_hat, shape)  # [B, C, *S]
        if shift is not None:
            u_hat = u_hat + shift  # the state again (the prompt is known): physics, L_BC and readout see states
        # Cascade: a stage's estimate holds the scales up to its own (finer ones zero), so each term
        # compares like with like. L_BC compares it with the data on those same scales (the data's
        # coarse approximation), not with the full u0 whose finer detail the stage cannot have; the
        # physics residual and the readout are taken on the last stage only, the one estimate that
        # is a whole field (the residual of a band-limited field is not zero even for exact data:
        # the dropped scales' stress would count as a violation).
        final = (stage == J).to(u0.dtype) if self.cascade else None  # [B]
        if dcfg.lambda_R > 0:
            energy = self.physics_energy(u_hat, self.forcing_noise(u0, generator), lam)  # [B]
            terms["physics"] = energy.mean() if final is None else (energy * final).sum() / final.sum().clamp(min=1)
        if dcfg.lambda_B > 0:
            # each sample's prompt length: the frames / rows a forecast is given
            seen = u0 if final is None else self.to_field((sidx[None, :] <= stage[:, None]).unsqueeze(1) * c0, shape)
            terms["bc"] = boundary_loss(u_hat, seen, first_rows_mask(u0, rows, self.domain), self.domain).mean()
        if dcfg.lambda_ce > 0 and self.modality.readout_term is not None:
            # only the last stage has the whole field
            # the readout temperature follows the noisiest level (the finest; all equal without shift)
            terms[self.modality.readout_term] = self._readout_loss(u_hat, batch, logsnr[:, -1], final)
        total = composite_loss(terms, loss_weights(dcfg))
        return total, {k: v.detach() for k, v in terms.items()}

    def _training_prompt_rows(self, u0: Tensor, generator, per_sample: bool) -> int | Tensor:
        """The prompt length of a training batch: ``diffusion.bc_rows`` (an int, at most T), or with
        ``diffusion.prompt_lengths = [lo, hi]`` one per sample ``[B]`` drawn uniformly from it, capped
        at T - 1 so every prompt leaves a slice to generate (clips shorter than the config assumed
        train the lengths they have); its own stream, ``prompt_length``, drawn after the others so
        they are unchanged."""
        T, lengths = self.domain.global_extent(u0, 2), self.dcfg.prompt_lengths
        if lengths is None:
            return min(self.dcfg.bc_rows, T)
        if T < 2:
            raise ValueError(f"diffusion.prompt_lengths: a field of {T} t-slice leaves nothing to generate "
                             f"after a prompt")
        hi = min(lengths[1], T - 1)
        lo = min(lengths[0], hi)
        if per_sample:
            k = generator.randint(hi - lo + 1, "prompt_length")
        else:
            gdev = generator.device if generator is not None else u0.device
            k = torch.randint(0, hi - lo + 1, (u0.shape[0],), generator=generator, device=gdev)
        return (k + lo).to(u0.device)  # [B]

    # ------------------------------------------------------------------ evaluation
    def clean_estimate(self, c_tau: Tensor, alpha_bar: float, shape: tuple[int, ...], lam: Tensor) -> Tensor:
        """``u_hat = W^-1 c0_hat`` from coefficients noised at a uniform ``alpha_bar`` on every level.

        Joint: one network call. Cascade: stage by stage, each stage denoising its scale from
        its noisy coefficients, conditioned on the previous stages' clean estimates.
        """
        B, J = c_tau.shape[0], self.cfg.levels
        logsnr = torch.full((B, J + 1), math.log(alpha_bar / (1 - alpha_bar)), device=c_tau.device)  # [B, J+1]
        alpha = torch.full_like(c_tau[:, :1], alpha_bar)  # [B, 1, N]
        return self.to_field(G.clean_coefficients(self, c_tau, alpha, logsnr, lam, shape), shape)

    @torch.no_grad()
    def denoising_cross_entropy(self, tokens: Tensor, pad_mask: Tensor | None, alpha_bar: float,
                                generator: torch.Generator | None = None) -> Tensor:
        """Nats per real token of the readout of ``u_hat`` from the field noised at ``alpha_bar``
        on every wavelet level (uniform: white noise per position, as the Bayes baseline sees)."""
        if self.modality.readout_term != "ce":
            raise ValueError(f"denoising_cross_entropy: text models only (modality={self.cfg.modality!r})")
        if not 0.0 < float(alpha_bar) < 1.0:
            raise ValueError(f"alpha_bar: must lie in (0, 1), got {alpha_bar}")
        batch = {"tokens": tokens, "pad_mask": pad_mask if pad_mask is not None else tokens != self.cfg.pad_id}
        u0 = self.encode(batch)
        shape = tuple(u0.shape[2:])
        eps = dynamics.white_noise(u0, generator, self.domain)  # [B, C, *S] global noise, sharded
        c_tau = self.to_coeffs(math.sqrt(alpha_bar) * u0 + math.sqrt(1 - alpha_bar) * eps)
        u_hat = self.clean_estimate(c_tau, float(alpha_bar), shape, self._lambda(None, u0.shape[0], u0.device))
        logsnr = torch.full((u0.shape[0],), math.log(alpha_bar / (1 - alpha_bar)), device=u0.device)
        return self._readout_loss(u_hat, batch, logsnr)

    # ------------------------------------------------------------------ generation
    def alpha_fn(self, shape: tuple[int, ...], device, scale: int | None = None):
        """``tau -> alpha_bar`` per coefficient ``[1, 1, N]`` (or ``[1, 1, 1]`` for one ``scale``),
        reaching exactly 1 at tau = 0."""
        sidx = self._scale_index(shape, device)

        def fn(tau: float) -> Tensor:
            lam = self.level_logsnr(torch.tensor([float(tau)], device=device), clamp_top=False)  # [1, J+1]
            a = D.alpha_from_logsnr(lam).float()
            if scale is not None:
                return a[:, scale].reshape(1, 1, 1)
            return D.per_coefficient(a, sidx)  # [1, 1, N]

        return fn

    def _logsnr_at(self, tau: float, B: int, device) -> Tensor:
        return self.level_logsnr(torch.tensor([float(tau)], device=device)).expand(B, -1)  # [B, J+1]

    @torch.no_grad()
    def generate(self, n: int, field_shape: tuple[int, ...], steps: int,
                 sampler: Literal["euler_maruyama", "heun", "pc"] = "pc", prompt_tokens: Tensor | None = None,
                 physics_eta: float = 0.0, generator: torch.Generator | None = None, bc_eta: float = 0.0,
                 prompt_field: Tensor | None = None, round_to_vocab: bool = True, vocab_temperature: float = 1.0,
                 disable_progress: bool = True, physics: dict | None = None) -> dict:
        """Draw ``n`` samples of a field of global shape ``field_shape`` with ``steps`` sampler steps.

        ``physics``: the physical parameters of the samples, ``{"nu", "dt", "forcing_strength"}``
        (each ``[n]`` or one value, any subset), e.g. those of the trajectory a forecast continues;
        the conditioning and the physics guidance use them. None: the config's.

        ``prompt_tokens`` (text, ``[n or 1, P]`` ids) / ``prompt_field`` (video/physics,
        ``[n or 1, C_data, P, *S_rest]``) fix the first positions / t-slices: re-imposed at the
        current noise level after every step (inpainting; noise-free for a model trained with
        ``diffusion.prompt_training``) and exactly at the end, optionally with the L_BC guidance
        ``bc_eta`` (Eq. 44) on every clean estimate (``generation.Denoiser``: the generated cells
        are pulled towards agreeing with the prompt through the network). ``physics_eta > 0`` adds the physics-guided
        correction ``c <- c - eta grad_c E(W^-1 c)`` (Eq. 24) after every step. A model trained with
        ``diffusion.prompt_residual`` generates the slices after a prompt of any P slices as
        increments over its last one and returns the states.

        ``round_to_vocab`` (text): every clean estimate ``u_hat`` the sampler sees is replaced by
        the readout's expected embedding ``sum_b p(b | u_hat) e_b`` (Diffusion-LM's clamping,
        CDCD's score interpolation), which keeps the trajectory near the embedding manifold; in
        cascade mode only the final (finest) stage rounds, the coarser stages have no full field.
        ``vocab_temperature`` divides the readout logits in that rounding: 1 follows the model's
        own posterior; below 1 is low-temperature decoding (fewer rare bytes and non-words,
        less diversity; at 0.25 samples collapse to the corpus' separator lines).

        Returns ``{"field": [n, C, *S]}`` plus ``"tokens"`` ``[n, T, L]`` (text) or ``"frames"``
        ``[n, D, *S]`` (video).
        """
        cfg = self.cfg
        field_shape = G.check_request(self, n, field_shape, sampler, physics_eta, bc_eta, vocab_temperature)
        dev, dtype = next(self.parameters()).device, self.math_dtype
        like = self.domain.shard(torch.zeros(n, cfg.channels, *field_shape, device=dev, dtype=dtype))  # [n, C, *S_loc]
        shape, lam = tuple(like.shape[2:]), self._lambda(physics, n, dev)
        prompt = G.make_prompt(self, prompt_tokens, prompt_field, n, like)
        increments = G.prompt_increment_rows(self, prompt_field)  # 0: the field is diffused as it is
        shift = None if not increments else prompt_increments(prompt.field, increments, undo=True,
                                                              domain=self.domain) - prompt.field  # [n, C, *S]
        noise = G.CoefficientNoise(self, like, generator)
        xi = self.forcing_noise(like, generator)
        temperature = self.modality.rounding_temperature(round_to_vocab, vocab_temperature)
        c = torch.zeros(n, cfg.channels, self._scale_index(shape, dev).numel(), device=dev, dtype=dtype)  # [n, C, N]
        # joint: one run over every coefficient; cascade (Eq. 20): scale 0 first, then each finer one
        for index in range(cfg.levels + 1) if self.cascade else [None]:
            stage = G.Stage.build(self, shape, index, c)
            constraint = None if prompt is None else G.PromptConstraint(self, stage, shape, prompt, noise)
            energy = G.GuidanceEnergy.build(self, stage, shape, xi, lam, physics_eta, shift)
            denoiser = G.Denoiser(self, stage, shape, lam, temperature, prompt, bc_eta)
            c = G.sample_stage(SAMPLERS[sampler], steps, stage, denoiser,
                               noise, energy, constraint, self.domain, disable_progress)
        u = self.to_field(c, shape)  # [n, C, *S]
        if prompt is not None:
            u = prompt.paste(u)  # the prompt exactly
            if increments:
                u = prompt_increments(u, increments, undo=True, domain=self.domain)  # states again
        return {"field": u, **self.modality.decode(self, u, prompt)}


MODEL_KINDS: dict = {"sgfm": SGFM}
"""Builders ``(model_cfg, diffusion_cfg) -> nn.Module`` by ``model.kind``. Other kinds register
themselves when the package imports them (``model/transformer.py`` adds "transformer"), so this
module never imports them: a baseline depends on the SGFM (it matches its parameter count), not
the other way round."""


def build_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> nn.Module:
    """The model ``model_cfg.kind`` names for these configs (a fresh, randomly initialised one):
    the SGFM, or a registered baseline (``MODEL_KINDS``)."""
    kind = getattr(model_cfg, "kind", "sgfm")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model.kind: {kind!r} has no builder (there are: {sorted(MODEL_KINDS)})")
    return MODEL_KINDS[kind](model_cfg, diffusion_cfg)


@torch.no_grad()
def wavelet_energy_per_level(model: SGFM, batch: dict, taus) -> dict:
    """Mean coefficient energy per wavelet scale of the clean data and, at each ``tau``, of the
    noised coefficients and the model's clean estimate: ``{"data": {"scale0": ..}, "tau=0.5":
    {"noisy": {..}, "denoised": {..}}}`` (scale 0 = approximation .. J = finest detail).
    Uses the global RNG for the noise."""
    was_training = model.training
    model.eval()
    dom, J = model.domain, model.cfg.levels
    u0 = model.encode(batch)
    B, shape = u0.shape[0], tuple(u0.shape[2:])
    sidx = model._scale_index(shape, u0.device)
    c0 = model.to_coeffs(u0)
    lam = model._lambda(batch, B, u0.device)

    def per_level(c: Tensor) -> dict:
        out = {}
        for s in range(J + 1):
            m = sidx == s
            e = dom.sum(c[:, :, m].square().sum(dim=(1, 2)))  # [B]
            cnt = dom.sum(torch.full((B,), float(m.sum()) * c.shape[1], device=c.device))
            out[f"scale{s}"] = float((e / cnt).mean())
        return out

    result = {"data": per_level(c0)}
    for tau in taus:
        t = torch.full((B,), float(tau), device=u0.device).clamp(min=1e-5)
        logsnr = model.level_logsnr(t)  # [B, J+1]
        alpha = D.per_coefficient(D.alpha_from_logsnr(logsnr), sidx).to(c0.dtype)
        c_tau = D.q_sample(c0, alpha, model.to_coeffs(dynamics.white_noise(u0, None, dom)))  # [B, C, N]
        c0_hat = G.clean_coefficients(model, c_tau, alpha, logsnr, lam, shape)  # [B, C, N]
        result[f"tau={float(tau):g}"] = {"noisy": per_level(c_tau), "denoised": per_level(c0_hat)}
    model.train(was_training)
    return result
