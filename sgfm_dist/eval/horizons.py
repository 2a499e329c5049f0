"""What the per-horizon forecast metrics and pictures of video and physics share.

Both score forecasts laid out like the model's field, ``[B, C, T, *S]``, horizon by horizon
along t (dim 2), reducing over space through the domain, and draw the same frame strips: a
grid of tiles with a coloured bar under each (given, generated, truth).
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

from sgfm_dist.ops.domain import Domain

TIME_AXIS = 2
"""The t axis of ``[B, C, T, *S]``: the horizons."""

GIVEN, GENERATED, TRUTH = (40, 200, 80), (220, 60, 60), (90, 90, 90)
"""RGB of the bar under a given (prompt) frame, a generated one, and a frame of the truth."""


def check_time_whole(x: Tensor, domain: Domain) -> None:
    """Per-horizon metrics need t whole on every rank (video and physics split space, not t)."""
    if domain.global_extent(x, TIME_AXIS) != x.shape[TIME_AXIS]:
        raise ValueError(f"time axis: per-horizon metrics need t whole on every rank; it is split "
                         f"(local {x.shape[TIME_AXIS]} of {domain.global_extent(x, TIME_AXIS)})")


def spatial_dims(x: Tensor) -> tuple[int, ...]:
    """The dims after t: the spatial axes of ``[B, C, T, *S]``."""
    return tuple(range(TIME_AXIS + 1, x.ndim))


def tile_grid(tiles: list[list[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 tiles ``[h, w, 3]`` on a white background, ``gap`` pixels apart."""
    h, w = tiles[0][0].shape[:2]
    rows, cols = len(tiles), max(len(r) for r in tiles)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            out[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    return out


def heldout_windows(cfg, count: int, split: str = "val", keys: tuple[str, ...] = ("field",)
                    ) -> tuple[dict[str, Tensor], list[str]]:
    """Up to ``count`` distinct windows of ``split`` (one reader of ``cfg``'s source, on the CPU):
    ``({key: [N, ...]}, sample ids)`` for those of ``keys`` the batches carry (video frames
    become the field, ``train.batches.batch_to_device``). A source repeats its epochs, so reading
    stops at the first repeat. An empty split is a ValueError naming the source."""
    import torch

    from sgfm_dist.train.batches import batch_to_device, build_train_source

    seen, rows, ids = set(), [], []
    for batch in build_train_source(cfg, 0, 1, split=split, num_workers=0):
        batch = batch_to_device(batch, "cpu")
        done = False
        for i, sid in enumerate(batch["sample_ids"]):
            if sid in seen or len(rows) == count:
                done = True
                break
            seen.add(sid)
            ids.append(sid)
            rows.append({k: batch[k][i] for k in keys if k in batch})
        if done:
            break
    if not rows:
        raise ValueError(f"{split}: no window in {cfg.data.val_source or cfg.data.source}")
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, ids


def ensemble_forecast(model, fields: Tensor, prompt_frames: int, members: int, steps: int, sampler: str,
                      generator, output: str = "field", per_sample: dict[str, Tensor] | None = None,
                      finish=None, chunk: int = 16, field_shape: tuple[int, ...] | None = None,
                      **generate_kw) -> Tensor:
    """``members`` forecasts of each window ``fields [N, C, >= P, *S]`` (global) from its first
    ``prompt_frames`` t-slices: ``SGFM.generate``'s ``output`` (``field``, or video ``frames``)
    as ``[M, N, C, T, *S_local]`` on the model's domain. ``per_sample`` (``{key: [N]}``, e.g. each
    trajectory's nu and dt) goes with its window as ``generate(physics=...)``; ``finish(u)`` is
    applied to each generated chunk (e.g. the Leray projection). Up to ``chunk`` samples per
    ``generate`` call, the members of a window side by side, all from one ``generator``.
    ``prompt_frames = 0``: unconditional samples (``fields`` then only count them and give their
    shape; ``field_shape`` may differ from it, e.g. longer in t)."""
    import torch

    N = fields.shape[0]
    shape = tuple(field_shape) if field_shape is not None else tuple(fields.shape[2:])
    per_call = max(1, chunk // members)
    out = []
    for start in range(0, N, per_call):
        part = fields[start:start + per_call]                              # [n, C, T, *S]
        n = part.shape[0] * members
        prompt = part[:, :, :prompt_frames].repeat_interleave(members, dim=0) if prompt_frames else None
        extra = {} if per_sample is None else {
            "physics": {k: v[start:start + per_call].repeat_interleave(members, dim=0) for k, v in per_sample.items()}}
        res = model.generate(n, shape, steps, sampler=sampler, generator=generator, prompt_field=prompt,
                             **extra, **generate_kw)
        u = res[output].float()                                            # [n*M, C, T, *S_loc]
        if finish is not None:
            u = finish(u)
        out.append(u.reshape(part.shape[0], members, *u.shape[1:]))
    return torch.cat(out).transpose(0, 1)                                 # [M, N, C, T, *S_loc]
