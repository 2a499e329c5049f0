"""Optional accelerated kernels: NVIDIA apex when installed, plain torch otherwise.

apex is not on PyPI (it is built from source against a CUDA toolkit), so nothing here
may require it. Each helper returns an apex implementation when apex imports *and* the
tensors live on CUDA, and the numerically equivalent torch implementation otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

try:  # pragma: no cover - apex is not installed in CI
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm  # type: ignore
    from apex.optimizers import FusedAdam as _ApexFusedAdam  # type: ignore

    HAVE_APEX = True
except Exception:  # ImportError, or a broken CUDA build of apex
    _ApexLayerNorm = None
    _ApexFusedAdam = None
    HAVE_APEX = False


def layer_norm(normalized_shape, eps: float = 1e-5) -> nn.Module:
    """LayerNorm: apex's fused kernel on CUDA when available, torch's otherwise."""
    if HAVE_APEX and torch.cuda.is_available():  # pragma: no cover
        return _ApexLayerNorm(normalized_shape, eps=eps)
    return nn.LayerNorm(normalized_shape, eps=eps)


def adam_optimizer(params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """AdamW: apex FusedAdam on CUDA when available, torch.optim.AdamW (fused on CUDA) otherwise."""
    if HAVE_APEX and torch.cuda.is_available():  # pragma: no cover
        return _ApexFusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=torch.cuda.is_available() or None)
