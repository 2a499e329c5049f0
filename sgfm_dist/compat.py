"""Optional accelerated kernels: NVIDIA apex when installed, plain torch otherwise.

apex is not on PyPI (it is built from source against a CUDA toolkit), so nothing here may
require it. What uses it: :func:`channel_rms_norm`, the per-cell RMS norm over channels of
:class:`~sgfm_dist.model.layers.ChannelRMSNorm` (every ``FieldBlock`` of the score and
forcing networks, and their final norm), runs apex's fused RMSNorm kernel when apex's CUDA
extension imports and the field is on CUDA; otherwise the plain-torch computation, whose ops
and their order are fixed (the loss traces in ``tools/traces/`` are checked bit for bit).
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


def channel_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean_c x^2 + eps) * weight`` over the channels (dim 1) of each cell of a
    ``[B, C, *S]`` field: apex's fused RMSNorm on CUDA when available, torch otherwise.

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
        return y.movedim(-1, 1)  # [B, C, *S]
    return channel_rms_norm_torch(x, weight, eps)


def channel_rms_norm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The plain-torch :func:`channel_rms_norm` (any device and dtype). Keep these ops and their
    order: the recorded loss traces depend on them bit for bit."""
    rms = x.pow(2).mean(1, keepdim=True).add(eps).rsqrt()  # [B, 1, *S]
    gain = weight.reshape(1, -1, *([1] * (x.ndim - 2)))
    return x * rms * gain  # [B, C, *S]
