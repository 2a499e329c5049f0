"""Exponential moving average of the model weights, kept in fp32, used for sampling.

The shadow is a full copy of the model's ``state_dict`` (parameters averaged, buffers copied)
keyed by the model's own names, so ``model.load_state_dict(ema.state_dict())`` turns a fresh
model into the averaged one without DeepSpeed. :class:`EMA` is updated from full (unsharded)
weights (ZeRO 0-2, where every rank holds them).

Under ZeRO-3 the point of partitioning is that no rank holds the whole model, so a full fp32
copy per rank (and a gather of every parameter each step to update it) would undo it:
:class:`ShardedEMA` keeps, per parameter, only this rank's slice of the flat fp32 weights,
laid out exactly like DeepSpeed's partition ``p.ds_tensor`` (padded flat tensor cut into P
equal parts), and updates it from ``p.ds_tensor`` alone. Its bytes per rank are the EMA's / P
(plus the unpartitioned buffers). The full shadow exists only where asked for: saving and
evaluation call :meth:`ShardedEMA.full_shadow` (a collective), loading re-shards a full one,
so checkpoints hold the same full EMA at any world size.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from sgfm_dist.parallel import runtime


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

    def full_shadow(self, to_all: bool = True) -> dict[str, Tensor] | None:
        """The whole averaged state dict (here: the shadow itself; the sharded EMA gathers)."""
        return self.shadow

    def bytes(self) -> int:
        """Bytes this rank holds for the EMA."""
        return sum(v.numel() * v.element_size() for v in self.shadow.values())

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


class ShardedEMA(EMA):
    """The EMA of a ZeRO-3 module (module docstring): parameters as this rank's flat partition,
    buffers (never partitioned) whole.

    ``module``: the engine's model after ``deepspeed.initialize`` (its parameters carry
    ``ds_tensor``, ``ds_numel``, ``ds_shape``, ``ds_process_group``); ``full``: the initial
    shadow (an :class:`EMA` of the same model, built before partitioning), sliced here and
    then dropped. Collectives (:meth:`full_shadow`, :meth:`state_dict`) must be called on
    every rank of the partition group."""

    def __init__(self, module: nn.Module, full: EMA):
        self.decay, self.warmup, self.updates = full.decay, full.warmup, full.updates
        self._params = dict(module.named_parameters())
        missing = [n for n, p in self._params.items() if not hasattr(p, "ds_tensor")]
        if missing:
            raise ValueError(f"ShardedEMA: parameters {missing[:5]} are not ZeRO-3 partitioned")
        self._keys = list(full.shadow)
        self._valid: dict[str, int] = {}
        self.shadow = {}
        self._load_full(full.shadow)

    def _slice(self, name: str, value: Tensor) -> Tensor:
        """This rank's partition of a whole tensor ``value`` for parameter ``name`` (DeepSpeed's
        layout: the flat tensor padded to P * part, rank r holds [r * part, (r + 1) * part))."""
        p = self._params[name]
        part = p.ds_tensor.numel()
        r = runtime.group_rank(p.ds_process_group)
        flat = value.detach().reshape(-1).to(torch.float32)
        out = torch.zeros(part, dtype=torch.float32, device=p.ds_tensor.device)
        start = r * part
        n = max(0, min(part, flat.numel() - start))
        # the padding of the last partition is uninitialised in ds_tensor: only the first n count
        self._valid[name] = n
        if n:
            out[:n].copy_(flat[start:start + n])
        return out

    def _load_full(self, full: dict[str, Tensor]) -> None:
        for k in self._keys:
            v = full[k]
            if k in self._params:
                if tuple(v.shape) != tuple(self._params[k].ds_shape):
                    raise ValueError(f"EMA.load_state_dict: {k} has shape {tuple(v.shape)} in the checkpoint, "
                                     f"{tuple(self._params[k].ds_shape)} in the model")
                self.shadow[k] = self._slice(k, v)
            else:
                self.shadow[k] = _fp32_copy(v)

    @torch.no_grad()
    def update_from_partitions(self, module: nn.Module) -> None:
        """Fold in this rank's partitions of the (updated) parameters and the buffers; nothing
        is gathered."""
        d = self.current_decay()
        for name, p in module.named_parameters():
            n = self._valid[name]
            self.shadow[name][:n].mul_(d).add_(p.ds_tensor.detach()[:n].to(torch.float32), alpha=1.0 - d)
        for name, b in module.named_buffers():
            s = self.shadow.get(name)
            if s is None:
                continue
            if s.is_floating_point():
                s.mul_(d).add_(b.detach().to(s.device, torch.float32), alpha=1.0 - d)
            else:
                s.copy_(b)
        self.updates += 1

    def update(self, named_tensors):
        raise TypeError("ShardedEMA.update: the ZeRO-3 EMA is updated from the partitions "
                        "(update_from_partitions), never from gathered weights")

    @torch.no_grad()
    def full_shadow(self, to_all: bool = True) -> dict[str, Tensor] | None:
        """Collective: the whole averaged state dict, on every rank (``to_all``) or only on the
        group's first rank (the others get None): one parameter at a time, so the transient
        is one parameter, not the model."""
        out: dict[str, Tensor] | None = {}
        for k in self._keys:
            if k not in self._params:
                if out is not None:
                    out[k] = self.shadow[k].clone()
                continue
            p, shard = self._params[k], self.shadow[k]
            parts = runtime.gather_shards(shard, p.ds_process_group, to_all)
            if parts is None:  # not the group's first rank (to_all=False)
                out = None
                continue
            out[k] = torch.cat(parts)[:p.ds_numel].view(tuple(p.ds_shape)).clone()
        return out

    def bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.shadow.values())

    def copy_to(self, model: nn.Module) -> None:
        """Collective (gathers to every rank), then as :meth:`EMA.copy_to`."""
        full = self.full_shadow(to_all=True)
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in full.items()})

    def state_dict(self) -> dict:
        """Collective: the whole EMA (gathered to every rank), as :class:`EMA` writes it, so a
        checkpoint loads at any world size and without DeepSpeed."""
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": self.full_shadow(to_all=True)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self._keys) - set(state["shadow"])
        extra = set(state["shadow"]) - set(self._keys)
        if missing or extra:
            raise ValueError(f"EMA.load_state_dict: checkpoint EMA does not match the model "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})")
        self.updates = int(state["updates"])
        self._load_full(state["shadow"])


def _fp32_copy(v: Tensor) -> Tensor:
    return v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
