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


def build_train_source(cfg: Config, dp_rank: int, dp_size: int, split: str = "train",
                       num_workers: int | None = None):
    """The batch source of ``cfg.data`` for the model's modality (``sgfm_dist.data``);
    ``num_workers`` overrides ``data.num_workers`` (None: the config's for "train", 0 otherwise)."""
    from sgfm_dist.data import build_text_source
    from sgfm_dist.data.fields import build_physics_source, build_video_source

    d = cfg.data
    source = d.source if split == "train" else (d.val_source or d.source)
    # held-out batches are drawn a few at a time: worker processes would only add start-up cost
    loader = dict(seed=d.seed, dp_rank=dp_rank, dp_size=dp_size, corrupt=d.corrupt,
                  num_workers=num_workers if num_workers is not None else d.num_workers if split == "train" else 0,
                  prefetch_factor=d.prefetch_factor)
    if cfg.model.modality == "text":
        return build_text_source(source, split, batch_size=cfg.train.micro_batch, rows=d.rows, row_len=d.row_len,
                                 pad_id=cfg.model.pad_id, **loader)
    build = build_physics_source if cfg.model.modality == "physics" else build_video_source
    return build(source, split, batch_size=cfg.train.micro_batch, frames=d.frames or None, **loader)


def global_field_shape(cfg: Config) -> tuple[int, ...]:
    """Extents ``S`` of one sample's whole field: ``(data.rows, data.row_len)`` for text; for
    video/physics those of the data (``data.frames`` cuts T, the spatial extents are the
    corpus'), read from the first training batch of a reader of its own (the training source's
    position is untouched)."""
    if cfg.model.modality == "text":
        return cfg.data.field_shape
    batch = next(iter(build_train_source(cfg, 0, 1, num_workers=0)))  # one batch: no worker processes
    if "frames" in batch:  # video as stored, uint8 [B, T, H, W, 3]
        return tuple(int(n) for n in batch["frames"].shape[1:4])
    return tuple(int(n) for n in batch["field"].shape[2:])  # [B, C, T, *S]


def batch_counts(batch: dict) -> tuple[float, float]:
    """(field cells B * prod(S), real tokens) of a batch; tokens are 0 for non-text fields."""
    if "tokens" in batch:
        return float(batch["tokens"].numel()), float(batch["pad_mask"].sum())
    field = batch["field"]  # [B, C, *S]
    return float(field.shape[0] * field[0, 0].numel()), 0.0
