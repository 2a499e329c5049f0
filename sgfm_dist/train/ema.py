"""Exponential moving average of the model weights, kept in fp32, used for sampling.

The shadow is a full copy of the model's ``state_dict`` (parameters averaged, buffers copied)
keyed by the model's own names, so ``model.load_state_dict(ema.state_dict())`` turns a fresh
model into the averaged one without DeepSpeed. It is updated from full (unsharded) weights:
under ZeRO-3 the caller gathers the parameters first (``engine.full_parameters``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


class EMA:
    """``shadow <- d * shadow + (1 - d) * weights`` with ``d = min(decay, (1+n)/(10+n))``
    when ``warmup`` (n = updates so far): early averages do not remember the random init."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {k: _fp32_copy(v) for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Fold in the current weights (``model.named_parameters()`` style pairs; buffers by name
        are copied). Names must be the model's own (no engine/wrapper prefix)."""
        d = self.current_decay()
        for name, value in named_tensors:
            if name not in self.shadow:
                raise ValueError(f"EMA.update: unknown tensor name {name!r} (not in the model's state_dict)")
            s = self.shadow[name]
            if value.shape != s.shape:
                raise ValueError(f"EMA.update: {name} has shape {tuple(value.shape)}, the shadow {tuple(s.shape)} "
                                 f"(pass full, gathered tensors)")
            if s.is_floating_point():
                s.mul_(d).add_(value.detach().to(s.device, torch.float32), alpha=1.0 - d)
            else:
                s.copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in self.shadow.items()})

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        extra = set(state["shadow"]) - set(self.shadow)
        if missing or extra:
            raise ValueError(f"EMA.load_state_dict: checkpoint EMA does not match the model "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA.load_state_dict: {k} has shape {tuple(v.shape)} in the checkpoint, "
                                 f"{tuple(self.shadow[k].shape)} in the model")
            self.shadow[k].copy_(v)


def _fp32_copy(v: Tensor) -> Tensor:
    return v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
