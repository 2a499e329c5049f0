"""Frame stacks as model fields: video clips and Navier-Stokes trajectories, and their batch sources.

Both are stored as one ``.npy`` per sample (plus ``.json`` metadata) and become the model's
field ``[C, T, *S]`` with t the first field axis (DESIGN.md section 1):

* video (``tools/convert_video.py``): uint8 ``[F, H, W, 3]``; batches ``{"frames" uint8
  [B, T, H, W, 3], "fps" [B], "sample_ids"}``: the clips as stored, and ``frames_to_field``
  turns them into the model's float32 field ``[B, 3, T, H, W]`` in [-1, 1] *after* the copy
  to the device (``sgfm_dist.train.trainer.batch_to_device`` does it for every batch). On the
  host the float conversion cost twice the raw read of the clip and made the batch 4x larger
  (docs/data.md); on an accelerator it is one cheap elementwise pass.
* physics (``tools/simulate_ns.py``): float32 ``[T, k, *S]`` velocity (k = 2 or 3
  components along the spatial axes, in axis order) -> ``[k, T, *S]``; batches
  ``{"field" [B, k, T, *S], "nu" [B], "dt" [B], "sample_ids"}`` plus ``"forcing_strength" [B]``
  when the corpus states it (``dt`` is the time between frames: each sample's ``FlowSpec.dt``).
  Every physics sample must carry its physical parameters in its ``.json``: ``nu`` (> 0) and
  ``dt`` (> 0), finite; ``forcing_strength`` (>= 0) is optional (absent: the model config's).
  A sample without them is an error naming the shard and the key (``physics_parameters``),
  not a NaN in the conditioning three layers later.

``frames`` cuts a stored stack into windows of that many consecutive frames, ``frame_stride``
apart (default: non-overlapping); ``frames=None`` keeps the whole stack. A sample id is
``"<key>@<first frame>"``.
"""
from __future__ import annotations

import ast
import functools
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch

from .stream import CorruptShardError, LoaderConfig, StreamingSource, as_tensor
from .transport import Alloc
from .urls import TarReader, resolve_shards

class PhysicsMetadataError(CorruptShardError):
    """A physics sample without valid physical parameters. A mistake of the corpus, not damaged
    bytes: it stops the stream under either ``corrupt`` policy ('skip' would drop the corpus)."""


PHYSICS_KEYS = (("nu", True, True), ("dt", True, True), ("forcing_strength", False, False))
"""(metadata key, required, strictly positive) of a physics sample's physical parameters."""


def physics_parameters(meta: dict, where: str) -> dict[str, float]:
    """The physical parameters of one physics sample's metadata, checked: ``{"nu", "dt"}`` and
    ``"forcing_strength"`` when present. ``where`` names the sample and its shard in the error."""
    out = {}
    for key, required, strict in PHYSICS_KEYS:
        if key not in meta:
            if required:
                raise PhysicsMetadataError(f"{where}: physics metadata has no {key!r} (keys {sorted(meta)}); every "
                                           f"trajectory needs its nu and dt (the time between frames), as "
                                           f"tools/simulate_ns.py writes")
            continue
        v = meta[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if strict else v >= 0)
        if not ok:
            raise PhysicsMetadataError(f"{where}: physics metadata {key!r} = {v!r} is invalid; expected a finite "
                                       f"number {'> 0' if strict else '>= 0'}")
        out[key] = float(v)
    return out


def ensure_corpus(source: str, command: str) -> bool:
    """Make a missing local corpus with ``command`` (a config's ``data.generate``): run once,
    in the repository root, with ``{source}`` the absolute path and ``{python}`` this
    interpreter; ranks of one job that start together wait for the first one's run (a lock
    file next to the corpus). A directory without ``manifest.json`` (a run that was stopped)
    is completed: the converters skip finished shards. Returns whether it ran. URLs, shard
    patterns, files and finished corpora are left alone."""
    if not command or "://" in source or any(c in source for c in "*?[{"):
        return False
    if os.path.isfile(source) or os.path.exists(os.path.join(source, "manifest.json")):
        return False
    import fcntl  # POSIX only, and only needed here

    target = os.path.abspath(source)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    lock_path = target + ".lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here, then find the corpus made
        try:
            if os.path.exists(os.path.join(target, "manifest.json")):
                return False
            # plain replacement, not str.format: a command may hold braces of its own
            cmd = command.replace("{source}", shlex.quote(target)).replace("{python}", shlex.quote(sys.executable))
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            # printed, not logged: the trainer's output is print-based and this can take minutes
            print(f"data: {source} does not exist; making it (data.generate): {cmd}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, shell=True, cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"data.generate: {cmd!r} exited {proc.returncode} making {source}:\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            if not os.path.exists(os.path.join(target, "manifest.json")):
                raise RuntimeError(f"data.generate: {cmd!r} ran but wrote no {source}/manifest.json")
            print(f"data: made {source}", file=sys.stderr, flush=True)
        finally:
            try:
                os.unlink(lock_path)  # a rank still waiting holds the old file open: it finds the manifest
            except OSError:
                pass
    return True


@functools.lru_cache(maxsize=1024)
def _parse_npy_dict(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    d = ast.literal_eval(header.decode("latin1"))
    if not isinstance(d, dict) or not {"descr", "fortran_order", "shape"} <= set(d):
        raise ValueError(f"npy: malformed header {header[:80]!r}")
    return tuple(int(v) for v in d["shape"]), bool(d["fortran_order"]), np.dtype(np.lib.format.descr_to_dtype(d["descr"]))


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the array data) of ``.npy`` bytes, without reading the array.

    The header dict is parsed once per distinct header (numpy parses it with ``ast`` every
    time, which costs more than the rest of decoding a sample; a corpus has few distinct headers).
    """
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("npy: not .npy data (bad magic)")
    major = data[6]
    if major == 1:
        length, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        length, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ValueError(f"npy: unsupported format version {major}")
    shape, fortran, dtype = _parse_npy_dict(bytes(data[start:start + length]))
    return shape, fortran, dtype, start + length


def npy_view(data: bytes) -> np.ndarray:
    """The array of ``.npy`` bytes as a read-only view of them (no copy, unlike ``np.load``)."""
    shape, fortran, dtype, offset = npy_header(data)
    if dtype.hasobject:
        raise ValueError("npy: object arrays are not accepted (they would need pickle)")
    count = math.prod(shape)  # (np.prod of a tuple costs ~8 us: more than the rest of a decode)
    if len(data) < offset + count * dtype.itemsize:
        raise ValueError(f"npy: truncated array data ({len(data) - offset} bytes for shape {shape} {dtype})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


VIDEO_LEVELS = np.subtract(np.divide(np.arange(256, dtype=np.uint8), np.float32(127.5), dtype=np.float32),
                           np.float32(1.0))
"""float32 [256]: the field value of pixel level v, ``float32(v / 127.5) - 1`` in float32 arithmetic."""
_levels_on: dict[torch.device, torch.Tensor] = {}


def frames_to_field(frames: torch.Tensor) -> torch.Tensor:
    """uint8 video frames ``[B, T, H, W, C]`` -> the model's float32 field ``[B, C, T, H, W]`` in
    [-1, 1], on the frames' device (call it after the host->device copy: ``batch_to_device``).

    Level v becomes ``VIDEO_LEVELS[v]``, bit for bit on every device: on the CPU by numpy's
    float32 division and subtraction, clip by clip from the channels-last view (the loader's
    conversion before it handed out uint8: ~3 ms for 16 clips of 16x64x64, half the time of
    torch's uint8 transpose plus arithmetic); elsewhere by a gather from the 256 levels,
    because CUDA divides by a Python scalar as a multiplication by its reciprocal, which can
    differ in the last bit.
    """
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 5:
        got = (f"{frames.dtype} {tuple(frames.shape)}" if isinstance(frames, torch.Tensor)
               else type(frames).__name__)
        raise ValueError(f"frames: expected a uint8 tensor [B, T, H, W, C], got {got}")
    channels_first = frames.permute(0, 4, 1, 2, 3)  # [B, C, T, H, W] view
    if frames.device.type == "cpu":
        field = torch.empty(channels_first.shape, dtype=torch.float32)
        out, src = field.numpy(), channels_first.numpy()
        for i in range(len(out)):  # one clip at a time: the subtraction finds out[i] in cache
            np.divide(src[i], np.float32(127.5), out=out[i], dtype=np.float32)
            np.subtract(out[i], np.float32(1.0), out=out[i])
        return field
    levels = _levels_on.get(frames.device)
    if levels is None:
        levels = _levels_on[frames.device] = torch.from_numpy(VIDEO_LEVELS).to(frames.device)
    return levels[channels_first.long()].contiguous()


@dataclass
class FrameStackCodec:
    """A stored frame stack -> windows of ``frames`` frames -> batch arrays (video: uint8 frames
    as stored; physics: ``[C, T, *S]`` float32 fields)."""

    kind: Literal["video", "physics"]
    """'video': uint8 [F, H, W, C] handed out as they are; 'physics': float [T, C, *S] as stored."""
    frames: int | None = None
    """T: frames per window (None: the whole stack)."""
    frame_stride: int | None = None
    """Frames between window starts (None: ``frames``, non-overlapping)."""

    def __post_init__(self):
        if self.kind not in ("video", "physics"):
            raise ValueError(f"kind: must be 'video' or 'physics', got {self.kind!r}")
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            raise ValueError(f"frames: must be None or an integer >= 1, got {self.frames!r}")
        if self.frame_stride is not None and (not isinstance(self.frame_stride, int) or self.frame_stride < 1):
            raise ValueError(f"frame_stride: must be None or an integer >= 1, got {self.frame_stride!r}")

    def expand(self, raw: dict) -> Iterator[dict]:
        key = raw["__key__"]
        if "npy" not in raw:
            raise ValueError(f"sample {key!r}: no .npy member (keys {sorted(raw)})")
        shape = npy_header(raw["npy"])[0]
        want = 4 if self.kind == "video" else None
        if (want is not None and len(shape) != want) or len(shape) < 3:
            raise ValueError(f"sample {key!r}: stored array has shape {shape}; expected "
                             f"{'[F, H, W, C]' if self.kind == 'video' else '[T, C, *S]'}")
        n = shape[0]
        size = n if self.frames is None else self.frames
        stride = self.frame_stride or size
        meta = json.loads(raw["json"]) if "json" in raw else {}
        if self.kind == "physics":
            # checked once per stored trajectory, before any window of it is decoded
            where = f"physics shard {raw.get('__url__', '?')}, sample {key!r}"
            if "json" not in raw:
                raise PhysicsMetadataError(f"{where}: no .json metadata member; a physics sample needs nu and dt")
            meta = physics_parameters(meta, where)
        for start in range(0, n - size + 1, stride):  # a stack shorter than T gives no window
            yield {"__key__": f"{key}@{start}", "__url__": raw.get("__url__"), "npy": raw["npy"],
                   "start": start, "size": size, "meta": meta}

    def decode(self, sample: dict) -> dict:
        # views only: the one copy of the array data happens when collate stacks the batch
        arr = npy_view(sample["npy"])[sample["start"]:sample["start"] + sample["size"]]
        meta = sample["meta"]
        if self.kind == "video":
            if arr.dtype != np.uint8:
                raise ValueError(f"sample {sample['__key__']!r}: video frames must be uint8, got {arr.dtype}")
            return {"frames": arr, "fps": float(meta.get("fps", 0.0)), "sample_id": sample["__key__"]}  # [T, H, W, C]
        if arr.dtype.kind != "f":
            raise ValueError(f"sample {sample['__key__']!r}: physics fields must be floating point, got {arr.dtype}")
        return {"field": np.swapaxes(arr, 0, 1), **meta, "sample_id": sample["__key__"]}  # field [C, T, *S] view

    def collate(self, samples: list[dict], alloc: Alloc) -> dict:
        key = "frames" if self.kind == "video" else "field"
        shapes = {s[key].shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"batch: samples have different {key} shapes {sorted(shapes)}; convert with one "
                             f"--size / grid, or set frames")
        # the one copy of the data. video: uint8 in the stored layout [B, T, H, W, C], a plain
        # memcpy per clip (the channel transpose alone cost 8x that; it is done on the device);
        # physics: [T, C, *S] -> [B, C, T, *S] float32
        first = samples[0][key]
        batch = alloc((len(samples), *first.shape), np.uint8 if self.kind == "video" else np.float32)
        for i, s in enumerate(samples):
            batch[i] = s[key]
        out = {key: batch, "sample_ids": [s["sample_id"] for s in samples]}
        for name in ("fps", "nu", "dt", "forcing_strength"):
            have = [name in s for s in samples]
            if all(have):
                out[name] = [s[name] for s in samples]
            elif any(have):
                # half a batch at the config's value would condition on a mixture silently
                missing = [s["sample_id"] for s in samples if name not in s][:4]
                raise ValueError(f"batch: {name!r} is in the metadata of some samples but not of {missing}; "
                                 f"a corpus states it for every sample or for none")
        return out

    def batch_nbytes(self, batch_size: int) -> None:
        return None  # frame sizes are in the shards; fields are large enough for one batch per message anyway

    def finalize(self, batch: dict, pin: bool) -> dict:
        if self.kind == "video":
            batch["frames"] = as_tensor(batch["frames"], torch.uint8, pin)  # [B, T, H, W, C]
        else:
            batch["field"] = as_tensor(batch["field"], torch.float32, pin)  # [B, C, T, *S]
        for name in ("fps", "nu", "dt", "forcing_strength"):
            if name in batch:
                batch[name] = as_tensor(batch[name], torch.float32, pin)  # [B]
        return batch


def _build(kind: str, source: str, split: str, batch_size: int, frames: int | None, frame_stride: int | None,
           seed: int, dp_rank: int, dp_size: int, num_workers: int, shuffle_buffer: int, units_per_block: int,
           corrupt: str, shuffle: bool, prefetch_factor: int, pin_memory: bool, global_batch: int = 0,
           streams: int = 0) -> StreamingSource:
    codec = FrameStackCodec(kind, frames, frame_stride)
    reader = TarReader(resolve_shards(source, split, kind=kind), corrupt=corrupt)
    cfg = LoaderConfig(batch_size=batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, global_batch=global_batch,
                       streams=streams, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, units_per_block=units_per_block, shuffle_units=shuffle,
                       prefetch_factor=prefetch_factor, pin_memory=pin_memory, corrupt=corrupt)
    return StreamingSource(reader, codec, cfg, describe=dict(kind=kind, frames=frames if frames else -1))


def build_video_source(source: str, split: Literal["train", "val", "all"], batch_size: int,
                       frames: int | None = None, frame_stride: int | None = None, seed: int = 0, dp_rank: int = 0,
                       dp_size: int = 1, global_batch: int = 0, streams: int = 0, num_workers: int = 0,
                       shuffle_buffer: int = 64, units_per_block: int = 1,
                       corrupt: Literal["skip", "fail"] = "fail", shuffle: bool = True, prefetch_factor: int = 2,
                       pin_memory: bool = True) -> StreamingSource:
    """Video batches ``{"frames" uint8 [B, T, H, W, 3], "fps" [B], "sample_ids"}`` from
    ``tools/convert_video.py`` shards (manifest, directory, .tar URL, brace pattern or glob);
    ``frames_to_field`` (on the device, after the copy) gives the model's ``[B, 3, T, H, W]``."""
    return _build("video", source, split, batch_size, frames, frame_stride, seed, dp_rank, dp_size, num_workers,
                  shuffle_buffer, units_per_block, corrupt, shuffle, prefetch_factor, pin_memory, global_batch, streams)


def build_physics_source(source: str, split: Literal["train", "val", "all"], batch_size: int,
                         frames: int | None = None, frame_stride: int | None = None, seed: int = 0,
                         dp_rank: int = 0, dp_size: int = 1, global_batch: int = 0, streams: int = 0,
                         num_workers: int = 0, shuffle_buffer: int = 64,
                         units_per_block: int = 1, corrupt: Literal["skip", "fail"] = "fail", shuffle: bool = True,
                         prefetch_factor: int = 2, pin_memory: bool = True) -> StreamingSource:
    """Navier-Stokes batches ``{"field" [B, k, T, *S], "nu" [B], "dt" [B], "sample_ids"}`` (and
    ``"forcing_strength" [B]`` where the corpus states it) from ``tools/simulate_ns.py`` shards;
    a sample whose metadata lacks a valid nu or dt is an error naming its shard and the key."""
    return _build("physics", source, split, batch_size, frames, frame_stride, seed, dp_rank, dp_size, num_workers,
                  shuffle_buffer, units_per_block, corrupt, shuffle, prefetch_factor, pin_memory, global_batch, streams)
