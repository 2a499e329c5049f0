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
