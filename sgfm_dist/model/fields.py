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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

READOUT_CHUNK_CELLS = 4096
"""Positions x batch per chunk of :meth:`TextField.cross_entropy`: about the most cells whose
V-wide logits (and their gradient) exist at once in the readout loss's forward or backward."""
READOUT_MIN_POSITIONS = 64
"""Positions of one sample in a chunk, at least (unless the field has fewer), whatever the batch.
Why: each chunk's logits are a GEMM of ``[positions, C] x [C, V]`` per sample, and MKL rounds a
short one (measured with torch 2.13's MKL: up to 3 rows on one thread, 11 on two) differently
from the same rows inside the whole field's GEMM; chunks of about half of this or more (no short
last chunk, see ``_bounds``) keep the chunked loss bit for bit the unchunked one on CPU."""


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
        return _tied_logits(u, *self._readout(u, logsnr))  # [B, T, L, V]

    def cross_entropy(self, u: Tensor, logsnr: Tensor, tokens: Tensor) -> Tensor:
        """Cross-entropy (nats, reduction none) of the tied readout of ``u [B, C, T, L]``, estimated
        at ``logsnr [B]``, against ``tokens [B, T, L]``: ``ce [B, T, L]``, bit for bit
        ``F.cross_entropy(self.logits(u, logsnr), tokens)`` per position.

        Why chunked: the logits are V wide (V = 257 against the field's C channels), and autograd
        of the plain form keeps the einsum output and the log-softmax output and builds the
        logits' gradient, three ``[B, T, L, V]`` tensors, the largest activations of a text
        training step after the network's. Here the positions go through the readout in chunks
        of about ``READOUT_CHUNK_CELLS`` cells at most (batch x positions, but at least
        ``READOUT_MIN_POSITIONS`` positions per sample; whole rows of T, or runs of L when one
        row is longer), each under non-reentrant activation checkpointing: autograd
        keeps only the chunk's inputs (a view of ``u``, the token ids, and the shared ``[V, C]``
        vectors, ``[B]`` scale and ``[V]`` bias) and recomputes the chunk's logits in backward,
        so one chunk's V-wide tensors exist at a time. Each logit is the same expression on the
        same numbers as in ``logits``, so the values are identical; the gradients of the shared
        vectors / scale / bias are sums over chunks (rounding-level order differences only).
        Local shapes only: a split field's rank calls it on its own block."""
        if u.ndim != 4 or tokens.shape != (u.shape[0], *u.shape[2:]):
            raise ValueError(f"cross_entropy: expected u [B, C, T, L] and tokens [B, T, L], got "
                             f"{tuple(u.shape)} and {tuple(tokens.shape)}")
        tokens = tokens.long()
        e, scale, bias = self._readout(u, logsnr)
        b, _, t, n = u.shape
        if b * t * n == 0:
            return _chunk_cross_entropy(u, e, scale, bias, tokens)  # [B, T, L], empty
        per_sample = max(READOUT_CHUNK_CELLS // b, READOUT_MIN_POSITIONS)  # positions of one sample per chunk
        rows = _bounds(t, max(1, per_sample // n))  # chunks of whole rows of T ...
        runs = _bounds(n, per_sample) if n > per_sample else [(0, n)]  # ... or of runs of L in one row
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (u, e, scale, bias))
        out = []
        for t0, t1 in rows:  # one row each when the runs of L are cut
            row = []
            for x0, x1 in runs:
                args = (u[:, :, t0:t1, x0:x1], e, scale, bias, tokens[:, t0:t1, x0:x1])  # views of u / tokens
                row.append(checkpoint(_chunk_cross_entropy, *args, use_reentrant=False) if grad
                           else _chunk_cross_entropy(*args))  # [B, t1 - t0, x1 - x0]
            out.append(row[0] if len(row) == 1 else torch.cat(row, dim=2))  # [B, t1 - t0, L]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # [B, T, L]

    def _readout(self, u: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The readout's parameters at ``logsnr [B]`` in ``u``'s dtype: vectors ``[V, C]``,
        scale ``s(lambda) / sqrt(C)`` ``[B, 1, 1, 1]`` and bias ``[V]``."""
        e = self.vectors().to(u.dtype)  # [V, C]
        lam = (logsnr.reshape(-1, 1) / 10.0).to(self.bias.dtype)
        log_s = self.log_scale(lam).to(u.dtype).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
        scale = log_s.exp() / math.sqrt(self.channels)
        return e, scale, self.bias.to(u.dtype)


def _bounds(size: int, most: int) -> list[tuple[int, int]]:
    """``[0, size)`` cut into the fewest near-equal pieces of at most ``most``: each is then at
    least ``most // 2`` long (no short last piece) unless ``size`` itself is shorter."""
    k = -(-size // most)
    return [(size * i // k, size * (i + 1) // k) for i in range(k)]


def _tied_logits(u: Tensor, e: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``<u, e_b> * scale + bias_b``: ``[B, C, *S]`` -> ``[B, *S, V]`` logits."""
    return torch.einsum("bc...,vc->b...v", u, e) * scale + bias  # [B, *S, V]


def _chunk_cross_entropy(u: Tensor, e: Tensor, scale: Tensor, bias: Tensor, tokens: Tensor) -> Tensor:
    """One chunk of ``TextField.cross_entropy``: ``u [B, C, t, l]``, ``tokens [B, t, l]`` -> ``ce [B, t, l]``."""
    logits = _tied_logits(u, e, scale, bias)  # [B, t, l, V]
    return F.cross_entropy(logits.flatten(0, -2), tokens.reshape(-1), reduction="none").view_as(tokens)


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
