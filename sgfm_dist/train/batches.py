"""What the trainer feeds the engine: the batch source of a config, batches moved to the device,
the field extents a corpus holds, and the cells / tokens a batch counts for throughput."""
from __future__ import annotations

import torch

from sgfm_dist.train.config import Config


def batch_to_device(batch: dict, device: str) -> dict:
    """Tensors to ``device``; lists / metadata as they are. Video ``frames`` (uint8, as the loader
    hands them out) become the model's float ``field`` here, after the copy: a quarter of the
    bytes cross to the device and the conversion runs there (``sgfm_dist.data.fields.frames_to_field``)."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "frames" in out:
        from sgfm_dist.data.fields import frames_to_field

        out["field"] = frames_to_field(out.pop("frames"))  # [B, C, T, H, W] in [-1, 1]
    return out


def _loader_options(cfg: Config, split: str, num_workers: int | None, dp_rank: int, dp_size: int) -> dict:
    d = cfg.data
    # held-out batches are drawn a few at a time: worker processes would only add start-up cost
    # the training order is the elastic global one: G samples per step over all dp groups
    order = dict(global_batch=cfg.train.micro_batch * cfg.train.grad_accum * dp_size, streams=d.streams) \
        if split == "train" else {}
    return dict(seed=d.seed, dp_rank=dp_rank, dp_size=dp_size, corrupt=d.corrupt, **order,
                num_workers=num_workers if num_workers is not None else d.num_workers if split == "train" else 0,
                prefetch_factor=d.prefetch_factor)


def _text_source(cfg: Config, source: str, split: str, loader: dict):
    from sgfm_dist.data import build_text_source

    d = cfg.data
    return build_text_source(source, split, batch_size=cfg.train.micro_batch, rows=d.rows, row_len=d.row_len,
                             pad_id=cfg.model.pad_id, **loader)


def _video_source(cfg: Config, source: str, split: str, loader: dict):
    from sgfm_dist.data.fields import build_video_source, ensure_corpus

    ensure_corpus(cfg.data.source, cfg.data.generate)  # e.g. the synthetic corpus of configs/video_tiny.yaml
    return build_video_source(source, split, batch_size=cfg.train.micro_batch, frames=cfg.data.frames or None,
                              **loader)


def _physics_source(cfg: Config, source: str, split: str, loader: dict):
    from sgfm_dist.data.fields import build_physics_source, ensure_corpus

    ensure_corpus(cfg.data.source, cfg.data.generate)  # a generated corpus is made on first use
    return build_physics_source(source, split, batch_size=cfg.train.micro_batch, frames=cfg.data.frames or None,
                                **loader)


def _timeseries_source(cfg: Config, source: str, split: str, loader: dict):
    from sgfm_dist.data.timeseries import build_timeseries_source

    m = cfg.model
    return build_timeseries_source(source, split, batch_size=cfg.train.micro_batch, features=m.channels,
                                   length=cfg.data.frames or None, padding=m.series_padding, levels=m.levels,
                                   **loader)


SOURCES = {"text": _text_source, "video": _video_source, "physics": _physics_source,
           "timeseries": _timeseries_source}
"""The batch source of each ``model.modality``: ``build(cfg, source, split, loader_options)``."""


def build_train_source(cfg: Config, dp_rank: int, dp_size: int, split: str = "train",
                       num_workers: int | None = None):
    """The batch source of ``cfg.data`` for the model's modality (``SOURCES``, over ``sgfm_dist.data``);
    ``num_workers`` overrides ``data.num_workers`` (None: the config's for "train", 0 otherwise)."""
    d = cfg.data
    source = d.source if split == "train" else (d.val_source or d.source)
    if cfg.model.modality not in SOURCES:
        raise ValueError(f"model.modality: no data source for {cfg.model.modality!r} (have {sorted(SOURCES)})")
    try:
        return SOURCES[cfg.model.modality](cfg, source, split,
                                           _loader_options(cfg, split, num_workers, dp_rank, dp_size))
    except FileNotFoundError as e:  # a missing corpus or shard: name the key that points there, no traceback
        key = "data.val_source" if split != "train" and d.val_source else "data.source"
        raise ValueError(f"{key}={source}: {e}") from None


def _text_field_shape(cfg: Config) -> tuple[int, ...]:
    return cfg.data.field_shape


def _stored_field_shape(cfg: Config) -> tuple[int, ...]:
    batch = next(iter(build_train_source(cfg, 0, 1, num_workers=0)))  # one batch: no worker processes
    if "frames" in batch:  # video as stored, uint8 [B, T, H, W, 3]
        return tuple(int(n) for n in batch["frames"].shape[1:4])
    return tuple(int(n) for n in batch["field"].shape[2:])  # [B, C, T, *S]


FIELD_SHAPES = {"text": _text_field_shape, "video": _stored_field_shape, "physics": _stored_field_shape,
                "timeseries": _stored_field_shape}
"""How each modality knows the extents of one sample's field: from the config, or from the data."""


def global_field_shape(cfg: Config) -> tuple[int, ...]:
    """Extents ``S`` of one sample's whole field: ``(data.rows, data.row_len)`` for text; for
    video/physics those of the data (``data.frames`` cuts T, the spatial extents are the
    corpus'), for time series ``(N,)`` of the stored windows (``data.frames`` checks T), read
    from the first training batch of a reader of its own (the training source's
    position is untouched)."""
    return FIELD_SHAPES[cfg.model.modality](cfg)


def batch_counts(batch: dict) -> tuple[float, float]:
    """(field cells B * prod(S), real tokens) of a batch; tokens are 0 for non-text fields."""
    if "tokens" in batch:
        return float(batch["tokens"].numel()), float(batch["pad_mask"].sum())
    field = batch["field"]  # [B, C, *S]
    return float(field.shape[0] * field[0, 0].numel()), 0.0
