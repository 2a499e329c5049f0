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
  parameters lambda = (nu, forcing strength) (Eq. 20) and, in cascade mode, on the stage.
* **Modes.** *joint*: all scales are noised and denoised together. *cascade* (Eq. 20):
  a stage ``s`` in 0..J is drawn per sample; scales ``< s`` are clean (teacher forcing),
  scale ``s`` is noised, finer scales are absent (zero); the network also receives the
  coarse reconstruction ``W^-1(c_{<s})`` as extra input channels and the loss is the DSM on
  scale ``s`` only. The sampler generates scale 0 (the approximation) first, then each finer
  scale conditioned on the reconstruction of the coarser ones.
* **Physics.** ``R(u) = d_t u + (u.grad)u - nu Lap u - f_theta(u, xi)`` (Eq. 41) projected by
  P (Eq. 43), mean over cells (``ops.dynamics``). Physics/video fields use the spatial axes
  as flow axes and t as time (``dynamics.residual``). The text field uses *all* field axes as
  flow axes (u = (u_t, u_x), grad = (d_t, d_x), Eq. 25-28); its lone d_t u is the same
  periodic derivative the gradient takes along t (``time_derivative="flow"``). The forcing network
  ``f_theta(u, xi)`` is a smaller stack of the same blocks, fed the field and a white-noise
  input xi, scaled by ``forcing_strength``.
* **L_BC** (Eq. 44): mean square of ``u_hat - u0`` on the first ``bc_rows`` t-slices (the
  initial condition, i.e. the prompt rows of text / first frames of video).
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

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import dynamics
from ..ops.domain import LOCAL
from ..ops.wavelets import coeff_layout, dwt, flatten_coeffs, idwt, max_levels, unflatten_coeffs
from . import diffusion as D
from .config import DiffusionConfig, ModelConfig
from .fields import TextField, VideoLift
from .networks import ConditionEmbedding, FieldNet
from .samplers import SAMPLERS, get_taus



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
        if cfg.modality == "text":
            self.text = TextField(cfg.vocab_size, C, cfg.pad_id)
        elif cfg.modality == "video":
            self.video = VideoLift(cfg.data_channels, C)
        # conditions: one log-SNR per scale, lambda = (nu, forcing strength), cascade stage
        self.n_conditions = (J + 1) + 2 + (1 if self.cascade else 0)
        self.condition = ConditionEmbedding(self.n_conditions, cfg.fourier_features, cfg.cond_dim)
        in_ch = 2 * C if self.cascade else C
        self.score_net = FieldNet(in_ch, C, cfg.width, cfg.n_blocks, cfg.kernel_size, cfg.spectral_modes, d,
                                  cfg.cond_dim, cfg.mlp_ratio)
        if cfg.forcing_blocks > 0:
            self.forcing_condition = ConditionEmbedding(2, cfg.fourier_features, cfg.cond_dim, seed=1)
            self.forcing_net = FieldNet(C + cfg.forcing_noise_channels, C, cfg.forcing_width, cfg.forcing_blocks,
                                        cfg.kernel_size, cfg.spectral_modes, d, cfg.cond_dim, cfg.mlp_ratio)
        else:
            self.forcing_net = None
        flow = cfg.flow_axes()
        lengths = None if cfg.lengths is None else tuple(cfg.lengths[a - 2] for a in flow)
        # Text uses t as a flow axis too (Eq. 25-28): its d_t is then the gradient's own d_t.
        self.flow_spec = dynamics.FlowSpec(flow_axes=flow, time_axis=2, lengths=lengths, dt=cfg.dt,
                                           nu=cfg.nu, derivative=cfg.derivative,
                                           time_derivative="flow" if 2 in flow else cfg.time_derivative)

    # ------------------------------------------------------------------ domain
    def set_domain(self, domain) -> None:
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
        if self.cfg.modality != "text":
            raise ValueError(f"embedding_matrix: only text models have an embedding (modality={self.cfg.modality!r})")
        return self.text.vectors()

    def encode(self, batch: dict) -> Tensor:
        """The clean field ``u0`` ``[B, C, *S]`` of a batch (checked)."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch: expected a dict, got {type(batch).__name__}")
        cfg = self.cfg
        if cfg.modality == "text":
            if "tokens" not in batch:
                raise ValueError(f"batch: a text batch needs key 'tokens' (Long [B, T, L]); got keys {sorted(batch)}")
            tokens = batch["tokens"]
            self.text.check_tokens(tokens, "batch['tokens']")
            if tokens.ndim != 3:
                raise ValueError(f"batch['tokens']: expected [B, T, L], got shape {tuple(tokens.shape)}")
            u0 = self.text.encode(tokens).to(self.math_dtype)
        else:
            if "field" not in batch:
                raise ValueError(f"batch: a {cfg.modality} batch needs key 'field' ([B, C, T, H, W]); "
                                 f"got keys {sorted(batch)}" + ("; a loader's uint8 'frames' become the field in "
                                 "sgfm_dist.train.trainer.batch_to_device (data.fields.frames_to_field)"
                                 if "frames" in batch else ""))
            x = batch["field"]
            want = cfg.data_channels if cfg.modality == "video" else cfg.channels
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 5 or x.shape[1] != want:
                raise ValueError(f"batch['field']: expected a float tensor [B, {want}, T, H, W], got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            md = self.math_dtype
            u0 = self.video.encode(x.to(md)) if cfg.modality == "video" else x.to(md)
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
        """Physical parameters ``[B, 2]``: (nu, forcing strength), per sample if the batch has them."""
        cfg = self.cfg
        nu = torch.full((B,), float(cfg.nu), device=device)
        fs = torch.full((B,), float(cfg.forcing_strength), device=device)
        if batch is not None:
            nu = batch.get("nu", nu)
            fs = batch.get("forcing_strength", fs)
        nu = torch.as_tensor(nu, device=device, dtype=torch.float32).reshape(-1).expand(B)
        fs = torch.as_tensor(fs, device=device, dtype=torch.float32).reshape(-1).expand(B)
        return torch.stack([nu, fs], dim=1)

    def _conditions(self, logsnr: Tensor, lam: Tensor, stage: Tensor | None) -> Tensor:
        """``cond [B, cond_dim]`` from per-level log-SNR ``[B, J+1]``, lambda ``[B, 2]``, stage ``[B]``."""
        dcfg = self.dcfg
        lsn = logsnr.clamp(dcfg.logsnr_min, dcfg.logsnr_max).float() / 10.0  # O(1) inputs
        phys = torch.stack([torch.log10(lam[:, 0].clamp(min=1e-6)) / 3.0, lam[:, 1]], dim=1)
        parts = [lsn, phys]
        if self.cascade:
            parts.append((stage.float() / self.cfg.levels).unsqueeze(1))
        return self.condition(torch.cat(parts, dim=1).to(lsn.device, self.param_dtype))

    # ------------------------------------------------------------------ the eps-network
    def eps_network(self, c_in: Tensor, alpha: Tensor, cond: Tensor, shape: tuple[int, ...],
                    coarse: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(eps_hat, c0_hat)`` ``[B, C, N]`` for noisy coefficients ``c_in`` at per-coefficient
        noise level ``alpha`` (broadcastable), through the physical-space score network."""
        x = self.to_field(c_in, shape)  # [B, C, *S]
        if self.cascade:
            x = torch.cat([x, coarse], dim=1)  # [B, 2C, *S]
        raw = self.to_coeffs(self.score_net(x.to(self.param_dtype), cond).to(c_in.dtype))  # [B, C, N]
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
        cond = self.forcing_condition(torch.stack([torch.log10(lam[:, 0].clamp(min=1e-6)) / 3.0, lam[:, 1]], 1).to(pd))
        f = self.forcing_net(u.to(pd), cond).to(u.dtype)  # [B, C, *S]
        return f * lam[:, 1].reshape(-1, *([1] * (f.ndim - 1))).to(f.dtype)

    def forcing_noise(self, like: Tensor, generator=None) -> Tensor | None:
        """The white-noise input xi of f_theta (global field, sharded), or None."""
        k = self.cfg.forcing_noise_channels
        if self.forcing_net is None or k == 0:
            return None
        return dynamics.white_noise(like[:, :1].expand(-1, k, *like.shape[2:]), generator, self.domain)

    def physics_energy(self, u: Tensor, xi: Tensor | None = None, lam: Tensor | None = None) -> Tensor:
        """``E(u) = mean |P R(u)|^2`` per sample ``[B]`` (Eq. 23 / 42), with the learned forcing."""
        spec, dom = self.flow_spec, self.domain
        if lam is None:
            lam = self._lambda(None, u.shape[0], u.device)
        return dynamics.physics_energy(u, spec, self.forcing(u, xi, lam), dom)

    def _first_rows_mask(self, u: Tensor, rows: int) -> Tensor:
        """``[1, 1, *S_local]`` 1.0 on the first ``rows`` global t-slices (sharded from the global mask)."""
        g_shape = [self.domain.global_extent(u, a) for a in range(2, u.ndim)]
        m = torch.zeros(1, 1, *g_shape, dtype=u.dtype, device=u.device)
        m[:, :, :rows] = 1
        return self.domain.shard(m)

    def _masked_mean_sq(self, diff: Tensor, mask: Tensor) -> Tensor:
        """Per-sample mean of ``diff^2`` over channels and masked cells ``[B]`` (global when split)."""
        num = self.domain.sum((diff.square() * mask).flatten(1).sum(1))
        den = self.domain.sum(mask.expand(diff.shape[0], 1, *diff.shape[2:]).flatten(1).sum(1)) * diff.shape[1]
        return num / den.clamp(min=1)

    # ------------------------------------------------------------------ readout
    def _readout_loss(self, u_hat: Tensor, batch: dict, logsnr: Tensor, weight: Tensor | None = None) -> Tensor | None:
        """Text: masked cross-entropy (nats per real token) of the tied readout of ``u_hat``, an
        estimate made at noise level ``logsnr [B]``; video: MSE of the tied readout; physics:
        None. ``weight [B]`` selects samples (cascade: the final stage)."""
        dom = self.domain
        if self.cfg.modality == "text":
            tokens = batch["tokens"].long()  # [B, T, L]
            mask = batch.get("pad_mask")
            mask = (tokens != self.cfg.pad_id) if mask is None else mask.bool()
            logits = self.text.logits(u_hat, logsnr)  # [B, T, L, V]
            ce = F.cross_entropy(logits.flatten(0, -2), tokens.reshape(-1), reduction="none").view_as(tokens)
            m = mask.to(ce.dtype)
            if weight is not None:
                m = m * weight.reshape(-1, 1, 1).to(ce.dtype)
            num, den = dom.sum(((ce * m).sum(dim=(1, 2)))), dom.sum(m.sum(dim=(1, 2)))
            return num.sum() / den.sum().clamp(min=1)
        if self.cfg.modality == "video":
            frames = batch["field"].to(u_hat.dtype)
            err = (self.video.readout(u_hat) - frames).square().flatten(1).sum(1)  # [B]
            err = dom.sum(err) / (frames.shape[1] * dom.numel(frames))
            if weight is not None:
                return (err * weight).sum() / weight.sum().clamp(min=1)
            return err.mean()
        return None

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Composite loss (Eq. 38): ``L_diff + lambda_R ||P R(u_hat)||^2 + lambda_B L_BC + lambda_ce L_readout``.

        Returns the total and each term detached: ``diff``, ``physics``, ``bc`` and ``ce`` (text)
        or ``recon`` (video). Diffusion times and noise come from ``generator`` (global RNG if None).
        """
        dcfg, cfg = self.dcfg, self.cfg
        u0 = self.encode(batch)  # [B, C, *S]
        B, shape, dev = u0.shape[0], tuple(u0.shape[2:]), u0.device
        J = cfg.levels
        sidx = self._scale_index(shape, dev)  # [N]
        c0 = self.to_coeffs(u0)  # [B, C, N]
        gdev = generator.device if generator is not None else dev
        # stratified diffusion times: one uniform offset, B evenly spaced points (lower variance)
        tau = ((torch.rand(1, generator=generator, device=gdev) + torch.arange(B, device=gdev) / B) % 1.0).to(dev)
        tau = tau.clamp(min=1e-5)
        logsnr = self.level_logsnr(tau)  # [B, J+1]
        alpha = D.per_coefficient(D.alpha_from_logsnr(logsnr), sidx).to(u0.dtype)  # [B, 1, N]
        eps = self.to_coeffs(dynamics.white_noise(u0, generator, self.domain))  # [B, C, N], iid N(0, 1)
        c_tau = D.q_sample(c0, alpha, eps)
        lam = self._lambda(batch, B, dev)
        stage = coarse = None
        if self.cascade:
            stage = torch.randint(0, J + 1, (B,), generator=generator, device=gdev).to(dev)  # [B]
            clean = (sidx[None, :] < stage[:, None]).unsqueeze(1).to(u0.dtype)  # [B, 1, N]
            target = (sidx[None, :] == stage[:, None]).unsqueeze(1).to(u0.dtype)  # [B, 1, N]
            c_in = clean * c0 + target * c_tau
            coarse = self.to_field(clean * c0, shape)  # [B, C, *S]
        else:
            target, c_in = None, c_tau
        cond = self._conditions(logsnr, lam, stage)
        eps_hat, c0_hat = self.eps_network(c_in, alpha, cond, shape, coarse)
        l_diff = D.dsm_loss(eps_hat, eps, target, self.domain).mean()
        if self.cascade:
            c0_hat = clean * c0 + target * c0_hat
        u_hat = self.to_field(c0_hat, shape)  # [B, C, *S]
        terms = {"diff": l_diff}
        total = l_diff
        if dcfg.lambda_R > 0:
            xi = self.forcing_noise(u0, generator)
            l_phys = self.physics_energy(u_hat, xi, lam).mean()
            total = total + dcfg.lambda_R * l_phys
            terms["physics"] = l_phys
        if dcfg.lambda_B > 0:
            rows = min(dcfg.bc_rows, self.domain.global_extent(u0, 2))
            l_bc = self._masked_mean_sq(u_hat - u0, self._first_rows_mask(u0, rows)).mean()
            total = total + dcfg.lambda_B * l_bc
            terms["bc"] = l_bc
        if dcfg.lambda_ce > 0 and cfg.modality != "physics":
            final = (stage == J).to(u0.dtype) if self.cascade else None
            # the readout temperature follows the noisiest level (the finest; all equal without shift)
            l_read = self._readout_loss(u_hat, batch, logsnr[:, -1], final)
            total = total + dcfg.lambda_ce * l_read
            terms["ce" if cfg.modality == "text" else "recon"] = l_read
        return total, {k: v.detach() for k, v in terms.items()}

    # ------------------------------------------------------------------ evaluation
    def clean_estimate(self, c_tau: Tensor, alpha_bar: float, shape: tuple[int, ...], lam: Tensor) -> Tensor:
        """``u_hat = W^-1 c0_hat`` from coefficients noised at a uniform ``alpha_bar`` on every level.

        Joint: one network call. Cascade: stage by stage, each stage denoising its scale from
        its noisy coefficients, conditioned on the previous stages' clean estimates.
        """
        B, J = c_tau.shape[0], self.cfg.levels
        logsnr = torch.full((B, J + 1), math.log(alpha_bar / (1 - alpha_bar)), device=c_tau.device)
        alpha = torch.full_like(c_tau[:, :1], alpha_bar)
        if not self.cascade:
            _, c0_hat = self.eps_network(c_tau, alpha, self._conditions(logsnr, lam, None), shape)
            return self.to_field(c0_hat, shape)
        sidx = self._scale_index(shape, c_tau.device)
        est = torch.zeros_like(c_tau)
        for s in range(J + 1):
            target = (sidx == s).to(c_tau.dtype)[None, None]
            clean = (sidx < s).to(c_tau.dtype)[None, None]
            stage = torch.full((B,), s, device=c_tau.device)
            c_in = clean * est + target * c_tau
            _, c0_hat = self.eps_network(c_in, alpha, self._conditions(logsnr, lam, stage), shape,
                                         self.to_field(clean * est, shape))
            est = est + target * c0_hat
        return self.to_field(est, shape)

    @torch.no_grad()
    def denoising_cross_entropy(self, tokens: Tensor, pad_mask: Tensor | None, alpha_bar: float,
                                generator: torch.Generator | None = None) -> Tensor:
        """Nats per real token of the readout of ``u_hat`` from the field noised at ``alpha_bar``
        on every wavelet level (uniform: white noise per position, as the Bayes baseline sees)."""
        if self.cfg.modality != "text":
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
                 disable_progress: bool = True) -> dict:
        """Draw ``n`` samples of a field of global shape ``field_shape`` with ``steps`` sampler steps.

        ``prompt_tokens`` (text, ``[n or 1, P]`` ids) / ``prompt_field`` (video/physics,
        ``[n or 1, C_data, P, *S_rest]``) fix the first positions / t-slices: re-imposed at the
        current noise level after every step (inpainting) and exactly at the end, optionally with
        the L_BC guidance step ``bc_eta`` (Eq. 44). ``physics_eta > 0`` adds the physics-guided
        correction ``c <- c - eta grad_c E(W^-1 c)`` (Eq. 24) after every step.

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
        self._check_shape(field_shape, "field_shape")
        for i, s in enumerate(field_shape):
            if cfg.levels > max_levels(s, cfg.wavelet):
                raise ValueError(f"field_shape: extent {s} of axis {i} is too small for {cfg.levels} levels of "
                                 f"{cfg.wavelet!r} (at most {max_levels(s, cfg.wavelet)})")
        dev, dtype = next(self.parameters()).device, self.math_dtype
        like_global = torch.zeros(n, cfg.channels, *field_shape, device=dev, dtype=dtype)
        like = self.domain.shard(like_global)  # [n, C, *S_local]
        shape = tuple(like.shape[2:])
        lam = self._lambda(None, n, dev)
        known, known_field, known_ids = self._prompt(prompt_tokens, prompt_field, n, like)

        def noise_fn(x: Tensor) -> Tensor:
            # N(0, I) coefficients: a global white field, sharded, through the orthonormal W
            return self.to_coeffs(dynamics.white_noise(like, generator, self.domain))  # [n, C, N]

        xi = self.forcing_noise(like, generator)
        step_fn = SAMPLERS[sampler]
        rounding = round_to_vocab and cfg.modality == "text"
        full_alpha = self.alpha_fn(shape, dev)

        def energy_for(c_full_fn):
            """E(W^-1 c) (+ L_BC guidance) of the full state built by ``c_full_fn``."""
            if physics_eta == 0 and (bc_eta == 0 or known is None):
                return None

            def energy(x: Tensor) -> Tensor:
                u = self.to_field(c_full_fn(x), shape)
                e = torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)
                if physics_eta > 0:
                    e = e + physics_eta * self.physics_energy(u, xi, lam)
                if bc_eta > 0 and known is not None:
                    e = e + bc_eta * self._masked_mean_sq(u - known_field, known)
                return e

            return energy

        if not self.cascade:
            def model(x: Tensor, tau: float) -> Tensor:
                a, logsnr = full_alpha(tau), self._logsnr_at(tau, n, dev)
                eps, c0 = self.eps_network(x, a, self._conditions(logsnr, lam, None), shape)
                if rounding:
                    c0 = self._round_to_vocab(c0, logsnr[:, -1], shape, vocab_temperature)
                    eps = (x - a.sqrt() * c0) / (1 - a).sqrt()
                return eps

            constraint = None
            if known is not None:
                c_known = self.to_coeffs(known_field)

                def constraint(x: Tensor, tau: float) -> Tensor:
                    a = full_alpha(tau)
                    noisy_known = self.to_field(a.sqrt() * c_known + (1 - a).sqrt() * noise_fn(x), shape)
                    u = self.to_field(x, shape)
                    return self.to_coeffs(known * noisy_known + (1 - known) * u)

            x = (1 - full_alpha(1.0)).sqrt() * noise_fn(like)  # the prior: alpha(1) ~ 0
            c = step_fn(model, x, get_taus(steps), full_alpha, noise_fn=noise_fn, generator=generator,
                        energy=energy_for(lambda v: v), eta=1.0 if (physics_eta or bc_eta) else 0.0,
                        constraint=constraint, domain=self.domain, disable=disable_progress)
        else:
            c = self._generate_cascade(n, shape, steps, step_fn, lam, noise_fn, energy_for,
                                       physics_eta, bc_eta, known, known_field, rounding, vocab_temperature,
                                       disable_progress)
        u = self.to_field(c, shape)  # [n, C, *S]
        if known is not None:
            u = known * known_field + (1 - known) * u  # the prompt exactly
        out = {"field": u}
        if cfg.modality == "text":
            clean = torch.full((n,), self.dcfg.logsnr_max, device=dev)  # the final estimate is clean
            tokens = self.text.logits(u, clean).argmax(-1)  # [n, T, L]
            if known_ids is not None:
                # the readout's bias could outvote an exact prompt embedding: write the ids
                tokens = torch.where(known[:, 0].bool(), known_ids.expand_as(tokens), tokens)
            out["tokens"] = tokens
        elif cfg.modality == "video":
            out["frames"] = self.video.readout(u)
        return out

    def _round_to_vocab(self, c0: Tensor, logsnr: Tensor, shape: tuple[int, ...], temperature: float) -> Tensor:
        """``W sum_b p(b | u_hat) e_b`` for ``u_hat = W^-1 c0`` read out at noise level ``logsnr [n]``,
        ``p`` the readout softmax at ``temperature``."""
        logits = self.text.logits(self.to_field(c0, shape), logsnr)
        if temperature != 1.0:
            logits = logits / temperature
        p = torch.softmax(logits, dim=-1)  # [n, T, L, V]
        u = torch.einsum("n...v,vc->nc...", p, self.text.vectors().to(p.dtype))  # [n, C, T, L]
        return self.to_coeffs(u)

    def _generate_cascade(self, n, shape, steps, step_fn, lam, noise_fn, energy_for,
                          physics_eta, bc_eta, known, known_field, rounding, temperature,
                          disable_progress) -> Tensor:
        """Eq. 20 cascade: scale 0 (approximation) first, then each finer scale conditioned on the
        reconstruction of the coarser ones; returns the full coefficients ``[n, C, N]``."""
        dev = lam.device
        J = self.cfg.levels
        sidx = self._scale_index(shape, dev)
        N = sidx.numel()
        c = torch.zeros(n, self.cfg.channels, N, device=dev, dtype=self.math_dtype)
        for s in range(J + 1):
            idx = (sidx == s).nonzero().flatten()
            lo, hi = int(idx[0]), int(idx[-1]) + 1  # scales are contiguous in the flattened order
            alpha_s = self.alpha_fn(shape, dev, scale=s)
            coarse = self.to_field(c, shape)  # scales < s generated, finer still zero
            stage = torch.full((n,), s, device=dev)
            base = c.clone()

            def full(x: Tensor, base=base, lo=lo, hi=hi) -> Tensor:
                out = base.clone()
                out[:, :, lo:hi] = x
                return out

            def model(x: Tensor, tau: float, full=full, alpha_s=alpha_s, coarse=coarse, stage=stage,
                      s=s) -> Tensor:
                logsnr = self._logsnr_at(tau, n, dev)
                cond = self._conditions(logsnr, lam, stage)
                c_in = full(x)
                u_in = torch.cat([self.to_field(c_in, shape), coarse], dim=1)  # [n, 2C, *S]
                raw = self.to_coeffs(self.score_net(u_in.to(self.param_dtype), cond).to(u_in.dtype))[:, :, lo:hi]
                a = alpha_s(tau)
                eps, c0 = D.eps_and_c0(raw, x, a, self.dcfg.parameterization)
                if rounding and s == J:  # only the last stage has the full field to round
                    c0 = self._round_to_vocab(full(c0), logsnr[:, -1], shape, temperature)[:, :, lo:hi]
                    eps = (x - a.sqrt() * c0) / (1 - a).sqrt()
                return eps

            def noise_s(x: Tensor, lo=lo, hi=hi) -> Tensor:
                return noise_fn(x)[:, :, lo:hi]

            constraint = None
            if known is not None:
                def constraint(x: Tensor, tau: float, full=full, alpha_s=alpha_s, lo=lo, hi=hi,
                               noise_s=noise_s) -> Tensor:
                    # RePaint with the current estimate: the scale-s coefficients of the field whose
                    # known cells are the prompt and whose other cells are the current state
                    u = self.to_field(full(x), shape)
                    target = self.to_coeffs(known * known_field + (1 - known) * u)[:, :, lo:hi]
                    a = alpha_s(tau)
                    return a.sqrt() * target + (1 - a).sqrt() * noise_s(x) if tau > 0 else target

            x0 = (1 - alpha_s(1.0)).sqrt() * noise_s(None)
            xs = step_fn(model, x0, get_taus(steps), alpha_s, noise_fn=noise_s,
                         energy=energy_for(full), eta=1.0 if (physics_eta or bc_eta) else 0.0,
                         constraint=constraint, domain=self.domain, disable=disable_progress)
            c[:, :, lo:hi] = xs
        return c

    def _prompt(self, prompt_tokens, prompt_field, n: int, like: Tensor):
        """``(known [1, 1, *S_local] 0/1, known_field [n, C, *S_local], known_ids [n or 1, *S_local] or None)``
        of the prompt, or (None, None, None)."""
        cfg = self.cfg
        g_shape = tuple(self.domain.global_extent(like, a) for a in range(2, like.ndim))
        if prompt_tokens is not None:
            if cfg.modality != "text":
                raise ValueError(f"prompt_tokens: only text models take token prompts (modality={cfg.modality!r}); "
                                 f"use prompt_field")
            p = torch.as_tensor(prompt_tokens)
            if p.ndim == 1:
                p = p.unsqueeze(0)
            self.text.check_tokens(p, "prompt_tokens")
            if p.ndim != 2 or p.shape[0] not in (1, n):
                raise ValueError(f"prompt_tokens: expected [n={n} or 1, P] ids, got shape {tuple(p.shape)}")
            T, L = g_shape
            P = p.shape[1]
            if P > T * L:
                raise ValueError(f"prompt_tokens: {P} prompt tokens do not fit a field of {T}x{L} = {T * L} positions")
            ids = torch.full((p.shape[0], T * L), cfg.pad_id, dtype=torch.long, device=like.device)
            ids[:, :P] = p.to(like.device).long()
            mask = torch.zeros(1, 1, T * L, device=like.device, dtype=like.dtype)
            mask[..., :P] = 1
            field = self.text.encode(ids.view(-1, T, L)).to(like.dtype).expand(n, -1, -1, -1)  # [n, C, T, L]
            mask = mask.view(1, 1, T, L)
            ids_local = self.domain.shard(ids.view(-1, 1, T, L))[:, 0]  # [n or 1, T_loc, L_loc]
            return self.domain.shard(mask), self.domain.shard(field.contiguous()), ids_local
        if prompt_field is not None:
            if cfg.modality == "text":
                raise ValueError("prompt_field: text models take prompt_tokens")
            pf = torch.as_tensor(prompt_field).to(like.device, like.dtype)
            want = cfg.data_channels if cfg.modality == "video" else cfg.channels
            if pf.ndim != len(g_shape) + 2 or pf.shape[0] not in (1, n) or pf.shape[1] != want \
                    or tuple(pf.shape[3:]) != g_shape[1:] or pf.shape[2] > g_shape[0]:
                raise ValueError(f"prompt_field: expected [n or 1, {want}, P <= {g_shape[0]}, *{g_shape[1:]}], "
                                 f"got shape {tuple(pf.shape)}")
            P = pf.shape[2]
            if cfg.modality == "video":
                pf = self.video.encode(pf)
            field = torch.zeros(pf.shape[0], cfg.channels, *g_shape, device=like.device, dtype=like.dtype)
            field[:, :, :P] = pf
            mask = torch.zeros(1, 1, *g_shape, device=like.device, dtype=like.dtype)
            mask[:, :, :P] = 1
            return self.domain.shard(mask), self.domain.shard(field.expand(n, *field.shape[1:]).contiguous()), None
        return None, None, None


def build_model(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> SGFM:
    """The SGFM for these configs (a fresh, randomly initialised model)."""
    return SGFM(model_cfg, diffusion_cfg)


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
        c_tau = D.q_sample(c0, alpha, model.to_coeffs(dynamics.white_noise(u0, None, dom)))
        if model.cascade:
            est = torch.zeros_like(c0)
            for s in range(J + 1):
                target = (sidx == s).to(c0.dtype)[None, None]
                clean = (sidx < s).to(c0.dtype)[None, None]
                stage = torch.full((B,), s, device=u0.device)
                cond = model._conditions(logsnr, lam, stage)
                _, c0_hat = model.eps_network(clean * est + target * c_tau, alpha, cond, shape,
                                              model.to_field(clean * est, shape))
                est = est + target * c0_hat
            c0_hat = est
        else:
            _, c0_hat = model.eps_network(c_tau, alpha, model._conditions(logsnr, lam, None), shape)
        result[f"tau={float(tau):g}"] = {"noisy": per_level(c_tau), "denoised": per_level(c0_hat)}
    model.train(was_training)
    return result
