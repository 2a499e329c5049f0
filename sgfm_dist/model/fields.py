"""Data <-> field maps: the text embedding with its tied readout, and the video lift.

Text (paper section 7, DESIGN.md section 1). A window of ids ``[B, T, L]`` (row t = the t-th
segment of L ids of one document) becomes the field ``u[b, :, t, x] = e_{id[b, t, x]}``,
``[B, C, T, L]``. The vectors are the rows of a learned matrix rescaled to norm ``sqrt(C)``:

    e_b = sqrt(C) * w_b / |w_b|

so every position has mean square 1 per channel and the clean field has O(1) per-channel
variance whatever training does to ``w`` (which also rules out the embedding collapse of
jointly trained diffusion embeddings: the noise scale is fixed relative to the data). The
readout is the tied transpose: ``logits_b = s(lambda) <u, e_b> / sqrt(C) + bias_b`` with a
per-id bias (the unigram log-prior at high noise, where ``u_hat ~ 0``) and a learned inverse
temperature ``s(lambda)`` that depends on the noise level ``lambda`` (log-SNR) the estimate
``u`` was made at. Why: the best context-free readout of a noisy position,
``log p(b | z) = log p(b) + sqrt(a)/(1-a) <z, e_b> + const``, is exactly this form but with a
scale that varies ~25x between the noise levels that matter; with one fixed scale the
network would have to inflate ``u_hat`` by noise level, fighting the diffusion loss, which
wants the posterior mean. ``s`` is a tiny MLP of lambda, started at the constant 1.

Video (section 8): frames ``[B, D, T, H, W]`` are lifted to C channels by a 1x1 map ``A``
``[C, D]`` and read out by its transpose (tied), trained with an MSE readout loss.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TextField(nn.Module):
    """Token ids -> embedding field, and field -> logits by the tied transpose."""

    def __init__(self, vocab_size: int, channels: int, pad_id: int):
        super().__init__()
        self.vocab_size, self.channels, self.pad_id = vocab_size, channels, pad_id
        self.weight = nn.Parameter(torch.randn(vocab_size, channels))  # [V, C], direction only
        self.bias = nn.Parameter(torch.zeros(vocab_size))  # [V]
        # log s(lambda): lambda / 10 -> MLP -> scalar; last layer zero so s = 1 at init
        self.log_scale = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 1))
        nn.init.zeros_(self.log_scale[2].weight)
        nn.init.zeros_(self.log_scale[2].bias)

    def vectors(self) -> Tensor:
        """The embedding vectors ``e_b`` ``[V, C]``, each of norm ``sqrt(C)``."""
        return self.weight * (math.sqrt(self.channels) / self.weight.norm(dim=1, keepdim=True).clamp(min=1e-12))

    def check_tokens(self, tokens: Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"{name}: expected an integer tensor of ids, got "
                             f"{tokens.dtype if isinstance(tokens, Tensor) else type(tokens).__name__}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"{name}: ids must lie in [0, vocab_size={self.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    def encode(self, tokens: Tensor) -> Tensor:
        """``[B, T, L]`` ids -> ``[B, C, T, L]`` field."""
        e = self.vectors()[tokens.long()]  # [B, T, L, C]
        return e.movedim(-1, 1)  # [B, C, T, L]

    def logits(self, u: Tensor, logsnr: Tensor) -> Tensor:
        """``[B, C, T, L]`` field estimated at noise level ``logsnr`` ``[B]`` -> ``[B, T, L, V]`` logits."""
        e = self.vectors().to(u.dtype)  # [V, C]
        lam = (logsnr.reshape(-1, 1) / 10.0).to(self.bias.dtype)
        log_s = self.log_scale(lam).to(u.dtype).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
        scale = log_s.exp() / math.sqrt(self.channels)
        return torch.einsum("bc...,vc->b...v", u, e) * scale + self.bias.to(u.dtype)  # [B, T, L, V]


class VideoLift(nn.Module):
    """Frames ``[B, D, *S]`` <-> field ``[B, C, *S]`` by a 1x1 map and its transpose."""

    def __init__(self, data_channels: int, channels: int):
        super().__init__()
        # orthonormal columns at init, so the tied readout starts as an exact inverse
        q, _ = torch.linalg.qr(torch.randn(channels, max(channels, data_channels)))
        self.weight = nn.Parameter(q[:, :data_channels].contiguous() * math.sqrt(channels / data_channels))  # [C, D]
        self.data_channels, self.channels = data_channels, channels

    def encode(self, frames: Tensor) -> Tensor:
        return torch.einsum("cd,bd...->bc...", self.weight.to(frames.dtype), frames)  # [B, C, *S]

    def readout(self, u: Tensor) -> Tensor:
        # least-squares inverse through the tied transpose: (A^T A)^-1 A^T u
        a = self.weight.to(u.dtype)
        gram = a.T @ a  # [D, D]
        proj = torch.einsum("cd,bc...->bd...", a, u)  # [B, D, *S]
        return torch.einsum("de,be...->bd...", torch.linalg.inv(gram), proj)  # [B, D, *S]
