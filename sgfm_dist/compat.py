"""Optional accelerated kernels: NVIDIA apex when installed, plain torch otherwise.

apex is not on PyPI (it is built from source against a CUDA toolkit), so nothing here may
require it. What uses it: :func:`channel_rms_norm`, the per-cell RMS norm over channels of
:class:`~sgfm_dist.model.layers.ChannelRMSNorm` (every ``FieldBlock`` of the score and
forcing networks, and their final norm), runs apex's fused RMSNorm kernel when apex's CUDA
extension imports and the field is on CUDA; otherwise the plain-torch computation, whose
forward ops and their order are fixed (the loss traces in ``tools/traces/`` are checked bit for
bit). Both take the FiLM that follows the norm in every block (``scale``, ``shift``); the torch
path is one autograd Function that keeps only its input for backward.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

try:  # pragma: no cover - apex is not installed in CI
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm_affine  # type: ignore

    # A Python-only apex build imports but lacks the kernel (loaded lazily by apex): check now.
    importlib.import_module("fused_layer_norm_cuda")
    HAVE_APEX = True
except Exception:  # ImportError, or a broken CUDA build of apex
    _apex_rms_norm_affine = None
    HAVE_APEX = False

# dtypes apex's RMSNorm kernel dispatches on with input and weight of one dtype (its "mixed"
# variant is fp32 input -> half output, not the bf16 input / fp32 gain of autocast)
_APEX_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _use_apex(x: Tensor, weight: Tensor) -> bool:
    if not (HAVE_APEX and x.is_cuda and weight.device == x.device and x.dtype in _APEX_DTYPES):
        return False
    return torch.is_autocast_enabled("cuda") or x.dtype == weight.dtype


def channel_rms_norm(x: Tensor, weight: Tensor, eps: float, scale: Tensor | None = None,
                     shift: Tensor | None = None) -> Tensor:
    """``x / sqrt(mean_c x^2 + eps) * weight`` over the channels (dim 1) of each cell of a
    ``[B, C, *S]`` field, then, given FiLM's ``scale`` and ``shift`` ``[B, C]``,
    ``* (1 + scale) + shift``: apex's fused RMSNorm on CUDA when available, torch otherwise.

    apex normalises the last dim, so the apex path moves channels last (``[B, *S, C]``, one
    copy: the kernel takes contiguous input) and returns a ``[B, C, *S]`` view of its output
    (channels-last strides; elementwise ops and convolutions accept it as is). Under CUDA
    autocast (bf16/fp16 activations, fp32 gain) input and gain are cast to the autocast dtype
    first, as apex's ``FusedRMSNorm`` does (the kernel accumulates in fp32); the torch path
    instead promotes to the gain's fp32 there.
    """
    if _use_apex(x, weight):  # pragma: no cover - needs apex and CUDA
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast("cuda", enabled=False):  # cast above: apex's own cast uses deprecated torch APIs
            y = _apex_rms_norm_affine(x.movedim(1, -1), weight, (x.shape[1],), eps)  # [B, *S, C]
        y = y.movedim(-1, 1)  # [B, C, *S]
        return y if scale is None else _film(y, scale, shift)
    return channel_rms_norm_torch(x, weight, eps, scale, shift)


def channel_rms_norm_torch(x: Tensor, weight: Tensor, eps: float, scale: Tensor | None = None,
                           shift: Tensor | None = None) -> Tensor:
    """The plain-torch :func:`channel_rms_norm` (any device and dtype), FiLM included.

    One autograd Function (:class:`_ChannelRMSNormFiLM`) that keeps only ``x`` for backward
    and recomputes the per-cell ``rsqrt`` and the normalised field there: composed of
    autograd's element-wise ops, norm and FiLM kept three full-size tensors per call (``x``,
    ``x * rms``, ``x * rms * gain``), about a fifth of the score network's stored activations.
    The forward runs the same ops in the same order as before (the loss traces in
    ``tools/traces/`` rely on them); the backward is the analytic one."""
    if (scale is None) != (shift is None):
        raise ValueError("channel_rms_norm: FiLM needs both scale and shift, or neither")
    return _ChannelRMSNormFiLM.apply(x, weight, scale, shift, eps)


def _film(y: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """FiLM after the norm: ``y * (1 + scale) + shift``, ``scale, shift [B, C]`` over ``y [B, C, *S]``."""
    film_shape = _broadcast_shapes(y)[1]
    return y * (1 + scale.reshape(film_shape)) + shift.reshape(film_shape)  # [B, C, *S]


def _broadcast_shapes(x: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes that broadcast a gain ``[C]`` and a per-sample ``[B, C]`` over ``[B, C, *S]``."""
    rest = (1,) * (x.ndim - 2)
    return (1, x.shape[1]) + rest, (x.shape[0], x.shape[1]) + rest


class _ChannelRMSNormFiLM(torch.autograd.Function):
    """``y = x * r * g * (1 + s) + b`` with ``r = rsqrt(mean_c x^2 + eps)`` per cell, saving
    ``x`` only (and the small ``g``, ``s``); backward recomputes ``r``.

    Backward, with ``xh = x r`` and ``gh = dy * (1 + s) * g`` (the gradient reaching ``xh``):
    ``dx = r * (gh - xh * mean_c(gh * xh))`` (``dr/dx_c = -r^3 x_c / C``), ``dg = sum_{B,S}
    dy (1 + s) xh``, ``ds = sum_S dy xh g``, ``db = sum_S dy``; twice differentiable
    as written (a double backward differentiates these ops of the saved tensors)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float) -> Tensor:
        rms = x.pow(2).mean(1, keepdim=True).add(eps).rsqrt()  # [B, 1, *S]
        y = x * rms * weight.reshape(_broadcast_shapes(x)[0])  # [B, C, *S]
        if scale is not None:
            y = _film(y, scale, shift)  # [B, C, *S]
        ctx.save_for_backward(x, weight, scale)
        ctx.eps, ctx.film_dtypes = eps, None if scale is None else (scale.dtype, shift.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, scale = ctx.saved_tensors
        gain_shape, film_shape = _broadcast_shapes(x)
        space = tuple(range(2, x.ndim))  # the field axes (at least one: fields are [B, C, *S])
        # recomputed from x (not saved: a double backward then sees rms's dependence on x)
        rms = x.pow(2).mean(1, keepdim=True).add(ctx.eps).rsqrt()  # [B, 1, *S]
        xh = x * rms  # [B, C, *S]
        # One product dy * xh serves every parameter gradient and the norm's projection term
        # (the factors g (1 + s) are constant over space): 4 full-size passes instead of 9.
        dy_xh = dy * xh  # [B, C, *S]
        per_channel = dy_xh.sum(space)  # [B, C]: sum_S dy xh
        film = weight.reshape(1, -1) if scale is None else (1 + scale) * weight  # [B or 1, C] = (1 + s) g
        film_b = film.reshape(gain_shape if scale is None else film_shape)  # broadcasting over [B, C, *S]
        d_scale = d_shift = None
        if scale is not None:
            if ctx.needs_input_grad[2]:
                d_scale = (per_channel * weight).to(ctx.film_dtypes[0])  # [B, C]
            if ctx.needs_input_grad[3]:
                d_shift = dy.sum(space).to(ctx.film_dtypes[1])  # [B, C]
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (per_channel if scale is None else per_channel * (1 + scale)).sum(0).to(weight.dtype)  # [C]
        # d_xh = dy (1 + s) g; dx = r (d_xh - xh mean_c(d_xh xh)), mean_c(d_xh xh) = mean_c((1 + s) g dy xh)
        proj = (dy_xh * film_b).mean(1, keepdim=True)  # [B, 1, *S]
        d_x = torch.addcmul(dy * film_b, xh, proj, value=-1).mul_(rms)  # [B, C, *S]
        return d_x.to(x.dtype), d_weight, d_scale, d_shift, None
