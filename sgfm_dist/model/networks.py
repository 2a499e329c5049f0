"""The score network and the forcing network f_theta(u, xi): stacks of field blocks (periodic
local convolution + truncated spectral mixing + pointwise MLP), FiLM-conditioned.

Both act on physical-space fields ``[B, C, *S]`` of any size (resolution-agnostic: the
convolution is local and the spectral weights are indexed by integer frequency) and on any
domain (``set_domain`` swaps the domain of every layer that touches space). Every layer is
O(N) or O(N log N); there is no attention.

Block (pre-norm residual, two sub-layers)::

    y = FiLM(RMSNorm(h), cond)                       # per-cell norm: no reduction over space
    h = h + Proj(GELU(PeriodicConv(y) + SpectralConv(y)))      # local + global mixing (FNO-style)
    h = h + MLP(FiLM(RMSNorm(h), cond))              # pointwise, channel expansion mlp_ratio

The conditioning vector ``cond [B, cond_dim]`` is built by the model (``sgfm.py``) from
Fourier features of the per-level noise levels, the physical parameters lambda and, in
cascade mode, the stage (Eq. 20).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.domain import LOCAL, Domain
from .layers import ChannelRMSNorm, FiLM, FourierFeatures, PeriodicConv, SpectralConv


class FieldBlock(nn.Module):
    """One residual block: local + spectral mixing, then a pointwise MLP; both FiLM-conditioned."""

    def __init__(self, width: int, kernel_size: int | Sequence[int], modes: int | Sequence[int], ndim: int,
                 cond_dim: int, mlp_ratio: int = 2, domain: Domain = LOCAL):
        super().__init__()
        self.norm1, self.film1 = ChannelRMSNorm(width), FiLM(cond_dim, width)
        self.local = PeriodicConv(width, width, kernel_size, ndim, domain)
        self.spectral = SpectralConv(width, width, modes, ndim, domain)
        self.proj = PeriodicConv(width, width, 1, ndim, domain)
        self.norm2, self.film2 = ChannelRMSNorm(width), FiLM(cond_dim, width)
        self.mlp_in = PeriodicConv(width, mlp_ratio * width, 1, ndim, domain)
        self.mlp_out = PeriodicConv(mlp_ratio * width, width, 1, ndim, domain)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        # norm and FiLM in one function that stores only h for backward (compat.channel_rms_norm)
        y = self.norm1(h, *self.film1.scale_shift(cond))  # [B, W, *S]
        # proj / mlp_out of a GELU store the GELU's input only (PeriodicConv gelu_input)
        h = h + self.proj(self.local(y) + self.spectral(y), gelu_input=True)  # [B, W, *S]
        y = self.norm2(h, *self.film2.scale_shift(cond))
        return h + self.mlp_out(self.mlp_in(y), gelu_input=True)  # [B, W, *S]


class FieldNet(nn.Module):
    """Lift (1x1) -> ``n_blocks`` FieldBlocks -> norm -> 1x1 projection to ``out_ch``.

    The output projection starts at zero, so an untrained network predicts 0 (with the v
    parameterisation that is the Gaussian-prior denoiser; for the forcing network f = 0).
    """

    def __init__(self, in_ch: int, out_ch: int, width: int, n_blocks: int, kernel_size: int | Sequence[int],
                 modes: int | Sequence[int], ndim: int, cond_dim: int, mlp_ratio: int = 2, domain: Domain = LOCAL):
        super().__init__()
        self.in_ch, self.out_ch, self.ndim = in_ch, out_ch, ndim
        self.lift = PeriodicConv(in_ch, width, 1, ndim, domain)
        self.blocks = nn.ModuleList(FieldBlock(width, kernel_size, modes, ndim, cond_dim, mlp_ratio, domain)
                                    for _ in range(n_blocks))
        self.norm = ChannelRMSNorm(width)
        self.out = PeriodicConv(width, out_ch, 1, ndim, domain)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        if x.ndim != self.ndim + 2 or x.shape[1] != self.in_ch:
            raise ValueError(f"x: expected a field [B, {self.in_ch}, *S] with {self.ndim} field axes, "
                             f"got shape {tuple(x.shape)}")
        if cond.ndim != 2 or cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond: expected [B={x.shape[0]}, cond_dim], got shape {tuple(cond.shape)}")
        h = self.lift(x)  # [B, W, *S]
        for block in self.blocks:
            h = block(h, cond)
        return self.out(self.norm(h))  # [B, out_ch, *S]


class ConditionEmbedding(nn.Module):
    """Fourier features of scalar conditions -> MLP -> ``[B, cond_dim]`` (drives every FiLM)."""

    def __init__(self, n_inputs: int, n_features: int, cond_dim: int, seed: int = 0):
        super().__init__()
        self.features = FourierFeatures(n_inputs, n_features, seed=seed)
        self.mlp = nn.Sequential(nn.Linear(self.features.out_dim + n_inputs, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim), nn.SiLU())
        self.n_inputs = n_inputs

    def forward(self, v: Tensor) -> Tensor:
        """``[B, n_inputs]`` (each O(1)) -> ``[B, cond_dim]``."""
        if v.ndim != 2 or v.shape[1] != self.n_inputs:
            raise ValueError(f"conditions: expected [B, {self.n_inputs}], got shape {tuple(v.shape)}")
        return self.mlp(torch.cat([self.features(v), v], dim=-1))  # [B, cond_dim]
