"""Multivariate time series: windows ``[T, F]`` as 1-D fields, the built-in Sines benchmark, and
their batch source.

Sources (``data.source`` of a ``model.modality: timeseries`` run):

* ``"sines"``: the TimeGAN Sines benchmark (Yoon et al. 2019), generated in memory: 10,000
  sequences of T = 24 steps and F = 5 features, feature i = sin(f_i t + p_i) with f_i and p_i
  drawn uniformly from [0, 0.1] per sequence and feature, t = 0..23, mapped to [0, 1] by
  (x + 1) / 2. The training split is drawn with seed ``SINES_SEED``, a held-out ``val`` split of
  ``SINES_VAL`` sequences with the next seed; ``data.seed`` only shuffles.
* WebDataset shards of ``tools/convert_timeseries.py``: one window per sample, ``<key>.npy``
  float32 ``[T, F]`` already min-max normalized to [0, 1] per feature, ``<key>.json`` (source,
  start row); the manifest's ``meta.normalization`` holds each feature's name, min and max,
  which ``denormalize`` applies to generated samples.

Batches are ``{"field" [B, F, N], "sample_ids"}``: the series as the model's field, built here
(``sgfm_dist.ops.series.series_to_field``: values 2x - 1, t made periodic by reflection)
because the sp ranks of a data-parallel group split the field along t and each keeps its own
block; the reflected half of a block is another rank's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from .fields import npy_view
from .stream import LoaderConfig, StreamingSource, as_tensor
from .transport import Alloc

SINES_SEQUENCES, SINES_LENGTH, SINES_FEATURES = 10_000, 24, 5
"""The TimeGAN Sines benchmark's size: sequences, steps, features."""
SINES_SEED = 0
"""Seed of the Sines training sequences (the held-out ones use ``SINES_SEED + 1``)."""
SINES_VAL = 2_000
"""Held-out Sines sequences (split ``val``)."""
SINES_BLOCK = 100
"""Sequences per unit of the in-memory source (the shuffling and worker split work on units)."""


def sines(n: int = SINES_SEQUENCES, length: int = SINES_LENGTH, features: int = SINES_FEATURES,
          seed: int = SINES_SEED) -> np.ndarray:
    """TimeGAN's ``sine_data_generation``: float32 ``[n, length, features]`` in [0, 1]; sequence j,
    feature i is ``(sin(f t + p) + 1) / 2`` at t = 0..length-1, f and p ~ U[0, 0.1] each."""
    for name, v in (("n", n), ("length", length), ("features", features)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"sines: {name} must be a positive int, got {v!r}")
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.0, 0.1, size=(n, 1, features))  # [n, 1, F]
    phase = rng.uniform(0.0, 0.1, size=(n, 1, features))
    t = np.arange(length, dtype=np.float64).reshape(1, length, 1)  # [1, T, 1]
    return ((np.sin(freq * t + phase) + 1.0) * 0.5).astype(np.float32)  # [n, T, F]


# ------------------------------------------------------------------------------ normalization
@dataclass(frozen=True)
class Normalization:
    """Per-feature min-max normalization: stored ``x' = (x - min) / (max - min)`` in [0, 1]."""

    names: tuple[str, ...]
    """Feature names (CSV / Parquet column names, or f0, f1, ...)."""
    minimum: tuple[float, ...]
    """Each feature's minimum over the converted data."""
    maximum: tuple[float, ...]
    """Each feature's maximum (a constant feature stores max = min + 1: it normalizes to 0)."""

    def __post_init__(self):
        if not (len(self.names) == len(self.minimum) == len(self.maximum)) or not self.names:
            raise ValueError(f"normalization: names, min and max need one entry per feature, got "
                             f"{len(self.names)}, {len(self.minimum)}, {len(self.maximum)}")
        if any(not hi > lo for lo, hi in zip(self.minimum, self.maximum)):
            raise ValueError(f"normalization: every max must exceed its min, got {self.minimum} / {self.maximum}")

    @classmethod
    def identity(cls, features: int) -> Normalization:
        return cls(tuple(f"f{i}" for i in range(features)), (0.0,) * features, (1.0,) * features)

    @classmethod
    def fit(cls, names: Sequence[str], lo: np.ndarray, hi: np.ndarray) -> Normalization:
        """From observed per-feature extremes (a constant feature gets a unit range)."""
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        hi = np.where(hi > lo, hi, lo + 1.0)
        return cls(tuple(names), tuple(float(v) for v in lo), tuple(float(v) for v in hi))

    def as_dict(self) -> dict:
        return {"features": list(self.names), "min": list(self.minimum), "max": list(self.maximum)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(tuple(d["features"]), tuple(float(v) for v in d["min"]), tuple(float(v) for v in d["max"]))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``[..., F]`` raw -> [0, 1]."""
        lo, hi = np.asarray(self.minimum), np.asarray(self.maximum)
        return ((np.asarray(x, np.float64) - lo) / (hi - lo)).astype(np.float32)

    def undo(self, x) -> np.ndarray:
        """``[..., F]`` in [0, 1] -> the data's units."""
        lo, hi = np.asarray(self.minimum), np.asarray(self.maximum)
        return (np.asarray(x, np.float64) * (hi - lo) + lo).astype(np.float32)


def is_sines(source: str) -> bool:
    return source.strip().lower() == "sines"


def source_normalization(source: str, features: int) -> Normalization:
    """The normalization the data of ``source`` was stored with (the identity for Sines, which is
    generated in [0, 1]); a shard source without one (not from ``tools/convert_timeseries.py``) is
    a ValueError naming it."""
    if is_sines(source):
        return Normalization.identity(features)
    from .urls import resolve_shards

    meta = resolve_shards(source, "all", kind="timeseries").meta or {}
    if "normalization" not in meta:
        raise ValueError(f"{source}: the manifest has no meta.normalization (write the shards with "
                         f"tools/convert_timeseries.py)")
    norm = Normalization.from_dict(meta["normalization"])
    if len(norm.names) != features:
        raise ValueError(f"{source}: the data has {len(norm.names)} features {list(norm.names)} but "
                         f"model.channels={features}")
    return norm


# ------------------------------------------------------------------------------ samples -> batches
class ArrayReader:
    """In-memory sequences ``[n, T, F]`` as units of ``block`` sequences (the Sines source)."""

    corrupt: Literal["skip", "fail"] = "fail"

    def __init__(self, series: np.ndarray, name: str, block: int = SINES_BLOCK):
        if series.ndim != 3 or len(series) == 0:
            raise ValueError(f"{name}: expected a non-empty [n, T, F] array, got shape {series.shape}")
        self.series, self.name = series, name
        self._units = [(s, min(s + block, len(series))) for s in range(0, len(series), block)]

    def units(self) -> Sequence[tuple[int, int]]:
        return self._units

    def read(self, unit: tuple[int, int]) -> Iterator[dict]:
        for i in range(*unit):
            yield {"__key__": f"{self.name}{i:06d}", "series": self.series[i]}

    def describe(self, unit: tuple[int, int]) -> str:
        return f"{self.name}[{unit[0]}:{unit[1]}]"


@dataclass
class SeriesCodec:
    """A stored window ``[T, F]`` -> the model's field ``[F, N]`` (batched in ``finalize``)."""

    features: int
    """F: the model's channels; every window must have this many."""
    length: int | None = None
    """T: steps per window (None: as stored; else it must be what is stored)."""
    padding: Literal["reflect", "periodic"] = "reflect"
    """How t is made periodic (``ModelConfig.series_padding``)."""
    levels: int = 0
    """Wavelet levels J: the field length is a multiple of 2**J (``series_field_length``)."""

    def expand(self, raw: dict) -> Iterator[dict]:
        key = raw["__key__"]
        if "series" in raw:
            arr = raw["series"]
        elif "npy" in raw:
            arr = npy_view(raw["npy"])
        else:
            raise ValueError(f"sample {key!r}: no .npy member (keys {sorted(raw)})")
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise ValueError(f"sample {key!r}: expected a float window [T, F], got {arr.dtype} {arr.shape}")
        if arr.shape[1] != self.features:
            raise ValueError(f"sample {key!r}: {arr.shape[1]} features but model.channels={self.features}")
        if self.length is not None and arr.shape[0] != self.length:
            raise ValueError(f"sample {key!r}: windows of T={arr.shape[0]} steps but data.frames={self.length}; "
                             f"convert with --length {self.length} or set data.frames: 0")
        yield {"__key__": key, "series": arr}

    def decode(self, sample: dict) -> dict:
        return {"series": sample["series"], "sample_id": sample["__key__"]}  # a view: collate copies

    def collate(self, samples: list[dict], alloc: Alloc) -> dict:
        shapes = {s["series"].shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"batch: windows of different shapes {sorted(shapes)}; convert with one --length")
        batch = alloc((len(samples), *samples[0]["series"].shape), np.float32)  # [B, T, F]
        for i, s in enumerate(samples):
            batch[i] = s["series"]
        return {"series": batch, "sample_ids": [s["sample_id"] for s in samples]}

    def batch_nbytes(self, batch_size: int) -> int | None:
        return None if self.length is None else batch_size * self.length * self.features * 4

    def finalize(self, batch: dict, pin: bool) -> dict:
        from sgfm_dist.ops.series import series_field_length, series_to_field

        series = as_tensor(batch.pop("series"), torch.float32)  # [B, T, F] in [0, 1]
        n = series_field_length(series.shape[1], self.padding, self.levels)
        field = series_to_field(series, self.padding, n)  # [B, F, N]
        batch["field"] = as_tensor(field, torch.float32, pin)
        return batch


def sines_split(split: str, features: int, length: int) -> np.ndarray:
    """The Sines sequences of ``split`` ('train' / 'all': the benchmark's 10,000; 'val': held out)."""
    if split in ("train", "all"):
        return sines(SINES_SEQUENCES, length, features, SINES_SEED)
    if split == "val":
        return sines(SINES_VAL, length, features, SINES_SEED + 1)
    raise ValueError(f"split: must be 'train', 'val' or 'all', got {split!r}")


def build_timeseries_source(source: str, split: Literal["train", "val", "all"], batch_size: int, features: int,
                            length: int | None = None, padding: Literal["reflect", "periodic"] = "reflect",
                            levels: int = 0, seed: int = 0, dp_rank: int = 0, dp_size: int = 1,
                            global_batch: int = 0, streams: int = 0,
                            num_workers: int = 0, shuffle_buffer: int = 1024, corrupt: Literal["skip", "fail"] = "fail",
                            shuffle: bool = True, prefetch_factor: int = 2, pin_memory: bool = True) -> StreamingSource:
    """Time-series batches ``{"field" [B, F, N], "sample_ids"}`` forever, from ``"sines"`` or
    ``tools/convert_timeseries.py`` shards (manifest, directory, .tar URL, pattern). ``length``:
    T (None: as stored; Sines: 24); ``features``: F (``model.channels``)."""
    codec = SeriesCodec(features, length, padding, levels)
    if is_sines(source):
        reader = ArrayReader(sines_split(split, features, length or SINES_LENGTH), f"sines-{split}-")
        units_per_block = 8
    else:
        from .urls import TarReader, resolve_shards

        reader = TarReader(resolve_shards(source, split, kind="timeseries"), corrupt=corrupt)
        units_per_block = 1
    cfg = LoaderConfig(batch_size=batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, global_batch=global_batch,
                       streams=streams, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, units_per_block=units_per_block, shuffle_units=shuffle,
                       prefetch_factor=prefetch_factor, pin_memory=pin_memory, corrupt=corrupt)
    return StreamingSource(reader, codec, cfg, describe=dict(kind="timeseries", length=length or -1,
                                                             features=features, padding=padding))


def load_series(source: str, split: str, features: int, length: int | None = None) -> np.ndarray:
    """Every window of ``split`` in the stored order, float32 ``[n, T, F]`` in [0, 1] (normalized):
    the real data the metrics compare with."""
    if is_sines(source):
        return sines_split(split, features, length or SINES_LENGTH)
    from .urls import TarReader, resolve_shards

    codec = SeriesCodec(features, length)
    reader = TarReader(resolve_shards(source, split, kind="timeseries"), corrupt="fail")
    out = [np.array(s["series"], dtype=np.float32) for unit in reader.units() for raw in reader.read(unit)
           for s in codec.expand(raw)]
    if not out:
        raise ValueError(f"{source}: split {split!r} holds no window")
    shapes = {a.shape for a in out}
    if len(shapes) != 1:
        raise ValueError(f"{source}: windows of different shapes {sorted(shapes)}")
    return np.stack(out)
