"""The loss terms SGFM trains and guides with, each one named function (paper Eq. 38, 44).

    boundary_loss     L_BC of Eq. 44: mean square misfit to the initial condition on masked cells
    first_rows_mask   the cells of the initial condition: the first k t-slices of the field (the prompt)
    given_prompt_mask those cells in the samples given a noise-free prompt in training
    loss_weights      lambda of each term of Eq. 38, from the DiffusionConfig
    composite_loss    Eq. 38: the weighted sum of the terms

Training (``SGFM.training_loss``) and the sampler's guidance energy (``generation.GuidanceEnergy``)
call the same ``boundary_loss``, so the L_BC that is trained is the L_BC that guides.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..ops.domain import LOCAL, Domain
from .config import DiffusionConfig


def boundary_loss(u: Tensor, u0: Tensor, mask: Tensor, domain: Domain = LOCAL) -> Tensor:
    """L_BC (paper Eq. 44) per sample ``[B]``: mean of ``(u - u0)^2`` over channels and the cells where ``mask`` = 1."""
    diff = u - u0  # [B, C, *S]
    # sums and counts are reduced over the whole (possibly split) field, so the mean is global
    num = domain.sum((diff.square() * mask).flatten(1).sum(1))  # [B]
    den = domain.sum(mask.expand(diff.shape[0], 1, *diff.shape[2:]).flatten(1).sum(1)) * diff.shape[1]  # [B]
    return num / den.clamp(min=1)


def first_rows_mask(u: Tensor, rows: int | Tensor, domain: Domain = LOCAL) -> Tensor:
    """``[1, 1, *S_local]``: 1.0 on the first ``rows`` global t-slices, the initial condition of Eq. 44:
    the prompt of ``rows`` = k rows of text, frames of video, snapshots of a flow. Training masks
    each sample's prompt length (``diffusion.bc_rows``, or the lengths ``diffusion.prompt_lengths``
    draws); a prompt of P frames masks P (``generation.field_prompt``), so the L_BC that is trained
    and the L_BC that guides a prompt of that length are one penalty. ``rows`` a tensor ``[B]`` of
    prompt lengths (one per sample) gives ``[B, 1, *S_local]``."""
    g_shape = [domain.global_extent(u, a) for a in range(2, u.ndim)]
    if isinstance(rows, Tensor):
        # the values are checked on the CPU only: on an accelerator the check would stall every step
        if rows.ndim != 1 or rows.dtype.is_floating_point or (rows.device.type == "cpu" and bool((rows < 0).any())):
            raise ValueError(f"rows: per-sample prompt lengths must be integers >= 0 of shape [B], got {rows}")
        t = torch.arange(g_shape[0], device=u.device)                                    # [T]
        m = (t[None, :] < rows.to(u.device)[:, None]).to(u.dtype)                       # [B, T]
        m = m.reshape(-1, 1, g_shape[0], *([1] * (len(g_shape) - 1))).expand(-1, 1, *g_shape)
        return domain.shard(m.contiguous())                                              # [B, 1, *S_local]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows: the prompt length must be an integer >= 0, got {rows!r}")
    m = torch.zeros(1, 1, *g_shape, dtype=u.dtype, device=u.device)  # [1, 1, *S_global]
    m[:, :, :rows] = 1
    # built globally and sharded: which rows are "first" is a global fact, not a local one
    return domain.shard(m)


def given_prompt_mask(u: Tensor, rows: int | Tensor, given: Tensor, domain: Domain = LOCAL) -> Tensor:
    """``[B, 1, *S_local]``: 1.0 on the first ``rows`` t-slices (one length, or ``[B]`` per sample) of
    the samples where ``given [B]`` (bool) holds, the cells a prompt-trained model sees noise-free
    (``diffusion.prompt_training``)."""
    m = first_rows_mask(u, rows, domain)  # [1, 1, *S_local]
    return m * given.to(m.dtype).reshape(-1, *([1] * (u.ndim - 1)))


def prompt_increments(u: Tensor, rows: int | Tensor, given: Tensor | None = None, undo: bool = False,
                      domain: Domain = LOCAL) -> Tensor:
    """The t-slices after the first ``rows`` as increments over slice ``rows - 1``, ``u_t - u_{rows-1}``
    (``undo``: the inverse, ``+ u_{rows-1}``), for the samples where ``given [B]`` (bool; None: all);
    the first ``rows`` slices unchanged (``diffusion.prompt_residual``). ``rows``: one prompt length,
    or ``[B]`` integers, each sample's own (``diffusion.prompt_lengths``). ``[B, C, T, *S]`` -> same.
    Needs the t axis whole on every rank (a slice is subtracted from the others)."""
    T = u.shape[2]
    if domain.global_extent(u, 2) != T:
        raise ValueError(f"prompt increments: the t axis must be whole on every rank; it is split "
                         f"(local {T} of {domain.global_extent(u, 2)})")
    if isinstance(rows, Tensor):
        r = rows.to(u.device).reshape(-1)
        bad = r.device.type == "cpu" and bool(((r < 1) | (r > T)).any())  # not checked on an accelerator (a stall)
        if r.dtype.is_floating_point or r.numel() != u.shape[0] or bad:
            raise ValueError(f"rows: need {u.shape[0]} integer prompt lengths in [1, T={T}], got {rows.tolist()}")
        view = (-1, 1, T, *([1] * (u.ndim - 3)))
        t = torch.arange(T, device=u.device)                                 # [T]
        select = (t[None, :] == r[:, None] - 1).to(u.dtype).reshape(view)    # [B, 1, T, 1..]: slice rows-1
        last = (u * select).sum(2, keepdim=True)                             # [B, C, 1, *S]
        after = (t[None, :] >= r[:, None]).to(u.dtype).reshape(view)         # [B, 1, T, 1..]
    else:
        if not 1 <= rows <= T:
            raise ValueError(f"rows: need 1 <= rows <= T={T}, got {rows}")
        last = u[:, :, rows - 1:rows]                                        # [B, C, 1, *S]
        after = torch.zeros_like(u[:1, :1])                                  # [1, 1, T, *S]
        after[:, :, rows:] = 1
    shift = after * last                                                     # [B, C, T, *S]
    if given is not None:
        shift = shift * given.to(u.dtype).reshape(-1, *([1] * (u.ndim - 1)))
    return u + shift if undo else u - shift


def loss_weights(dcfg: DiffusionConfig) -> dict[str, float]:
    """lambda per term name of Eq. 38 (``ce`` and ``recon`` are the text / video readout terms)."""
    return {"diff": 1.0, "physics": dcfg.lambda_R, "bc": dcfg.lambda_B, "ce": dcfg.lambda_ce,
            "recon": dcfg.lambda_ce}


def composite_loss(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Eq. 38: ``sum_k weights[k] * terms[k]``, summed in the order of ``terms``."""
    if not terms:
        raise ValueError("terms: expected at least one loss term")
    missing = [k for k in terms if k not in weights]
    if missing:
        # a term without a weight is a bug in the caller, never a silent weight of 0 or 1
        raise ValueError(f"weights: no weight for term(s) {missing} (weights for {sorted(weights)})")
    total = None
    # summed left to right in the caller's order: the order fixes the float rounding of the total
    for name, value in terms.items():
        part = weights[name] * value
        total = part if total is None else total + part
    return total
