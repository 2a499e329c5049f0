"""Load a trained model for sampling/evaluation without DeepSpeed or a process group.

The run config and the EMA weights both live in the checkpoint's client state, so a
checkpoint directory is self-contained: ``load_trained(path)`` rebuilds the exact model
(``config_from_dict`` re-validates it) and loads the fp32 EMA weights, reading the file with
``torch.load(weights_only=True)``. A plain weights file written by
``tools/convert_checkpoint.py`` (config, EMA and raw weights in one file, no DeepSpeed layout)
loads the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from sgfm_dist.train import checkpoint as ckpt
from sgfm_dist.train.config import Config
from sgfm_dist.train.config_loader import config_from_dict


@dataclass
class TrainedModel:
    """A model with its checkpoint's EMA weights, in eval mode."""

    model: nn.Module
    """The SGFM (EMA weights)."""
    config: Config
    """The run's config as saved in the checkpoint."""
    step: int
    """Optimizer steps the weights were trained for."""
    path: str
    """The checkpoint (tag) directory read."""


WEIGHTS_FORMAT = "sgfm_dist.weights/1"
"""``format`` of the plain weights file ``tools/convert_checkpoint.py`` writes: a dict with
``config`` (the run config), ``step``, ``ema`` and ``weights`` (fp32 state dicts in the model's own
names), ``source`` (the checkpoint it came from) and ``zero_stage`` / ``world`` of that run."""


def read_weights_file(path: str) -> dict:
    """A plain weights file, read with ``weights_only=True``; ValueError naming the file when it
    is truncated, tampered with or not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable weights file ({first})") from None
    if not isinstance(state, dict) or state.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an sgfm_dist weights file (expected format {WEIGHTS_FORMAT!r}; "
                         f"write one with tools/convert_checkpoint.py)")
    for key in ("config", "step", "ema", "weights"):
        if key not in state:
            raise ValueError(f"{path}: weights file without {key!r}")
    return state


def load_trained(path: str, device: str = "cpu", weights: str = "ema") -> TrainedModel:
    """``path``: a tag directory, a checkpoint directory or a run directory (newest complete
    checkpoint), or a plain weights file (``tools/convert_checkpoint.py``). ``weights``: "ema"
    (default, what sampling should use) or "live"."""
    from sgfm_dist.model.sgfm import build_model

    if weights not in ("ema", "live"):
        raise ValueError(f"weights: must be 'ema' or 'live', got {weights!r}")
    if os.path.isfile(path):
        state = read_weights_file(path)
        cfg = config_from_dict(state["config"], default_source=f"{path} (saved config)")
        model = build_model(cfg.model, cfg.diffusion)
        _load_into(model, state["ema"] if weights == "ema" else state["weights"], path)
        model.to(device).eval()
        return TrainedModel(model=model, config=cfg, step=int(state["step"]), path=path)
    tag_dir = ckpt.resolve_checkpoint(path)
    state = ckpt.load_client_state(tag_dir)
    for key in ("config", "step", "ema"):
        if key not in state:
            raise ValueError(f"{tag_dir}: the checkpoint's client state has no {key!r} (not written by "
                             f"sgfm_dist.train?)")
    cfg = config_from_dict(state["config"], default_source=f"{tag_dir} (saved config)")
    model = build_model(cfg.model, cfg.diffusion)
    if weights == "ema":
        sd = state["ema"]["shadow"]
    else:
        # DeepSpeed saves the wrapped module (TrainingLoss): strip its "model." prefix.
        sd = {k[len("model."):]: v for k, v in state["module"].items() if k.startswith("model.")}
        if not sd:
            raise ValueError(f"{tag_dir}: no live module weights in the checkpoint (ZeRO-3 partitions them); "
                             f"use the EMA weights")
    _load_into(model, sd, tag_dir)
    model.to(device).eval()
    return TrainedModel(model=model, config=cfg, step=int(state["step"]), path=tag_dir)


def _load_into(model: nn.Module, sd: dict, where: str) -> None:
    own = model.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint weights do not fit the model built from its config "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{where}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model "
                         f"{tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
