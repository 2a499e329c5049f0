"""A resumable, deterministic, sharded sample stream: the engine under every batch source.

A *reader* knows where samples live (in-memory documents, WebDataset tar shards on fsspec
URLs) and splits them into *units* (a document, a shard). A *codec* knows what a sample
means (text, video, physics): it expands one raw sample into training samples (a document
into [T, L] windows, a trajectory into T-frame windows), decodes one into numpy arrays and
collates a list into a batch of tensors. This module owns the order.

Notes
-----
Global order (elastic: MosaicML Streaming's promise on WebDataset shards). The samples of a
run form ONE global sequence that depends on the seed, the data and the global batch ``G``
only, never on dp, sp or the DataLoader workers: global step ``s`` consumes the samples at
global sample indices ``[s G, (s + 1) G)``. The sequence is built from ``K = streams``
*canonical streams* (MosaicML's "canonical nodes"), ``K`` dividing ``G``: position ``j`` of a
global batch is sample ``j mod c`` of that step's *chunk* of stream ``j // c`` (``c = G / K``
consecutive samples per stream and step). dp group ``r`` of ``dp`` (``dp`` divides ``K``) owns
the streams ``[r K / dp, (r + 1) K / dp)``, i.e. the contiguous positions ``[r G / dp, (r + 1) G
/ dp)`` of every global batch, which it hands out as ``G / (dp * batch_size)`` micro-batches of
``batch_size``. Every stream is read by exactly one dp group, so no rank reads what it drops.
sp ranks are not a parameter: every sp rank of one dp group builds the same streams and reads
the same samples (each keeps its slab of the field later). Per-sample random draws take the
global index from the same positions (``sgfm_dist/ops/draws.py``).

A stream is an independent, endless sample sequence: epoch ``e`` permutes all units with a
seed of ``(seed, e)``; stream ``k`` takes the units at permuted positions ``k, k + K, ...``,
padded by wrapping around to ``ceil(n_units / K)`` units, so every stream gets the same number
of units (fewer units than streams means some units are read by two streams in an epoch).
Every stream streams forever (epoch after epoch), so every rank gets exactly as many batches
as the trainer asks for and no DDP collective can hang on an uneven split.

Shuffle. A stream's units are grouped into *blocks* of ``units_per_block``; the samples of one
block go through a shuffle buffer seeded by ``(seed, epoch, stream, block)`` that is drained
at the end of the block. Samples therefore never mix across blocks, which is what makes
the resume position small and exact.

Resume. A stream's position is ``(epoch, block, offset)``: the number of shuffled samples
already taken from that block. Resuming re-reads the block and drops the first ``offset``
samples *before* decoding them (replay costs at most one block of raw reads), so the
sample sequence continues exactly, with nothing lost or repeated. A source's state holds the
positions of its own streams after the last whole step, the steps consumed and the
micro-batches already handed out of the next one; the trainer gathers every dp group's state
and :func:`merge_states` joins them, so a run resumed onto another dp (same ``G`` and ``K``)
finds every stream's position and continues the one global sequence
(``tests/train/test_elastic.py``).

Workers. With ``W`` DataLoader workers, logical worker ``w`` reads the group's local streams
``i`` with ``i mod W = w``; the torch DataLoader takes their chunks round robin, which is the
order a step needs (``W`` is reduced to a divisor of the group's ``K / dp`` streams). The
workers change where chunks are read, never the order.

Messages. Batches, not samples, cross process boundaries: a worker reads, decodes and
collates whole chunks (into reused shared memory, ``transport``), and one DataLoader item
(``batch_size=None``) is a *message* of ``k`` consecutive chunks of one worker, ``k`` chosen
from the chunk size so that small batches (text) do not pay the DataLoader's
per-item cost (~0.25 ms) each. The consumer keeps a queue per worker and still takes batches
round robin one at a time, so the batch order, the positions and the resume are those of
``k = 1``: buffered batches that were not yet yielded are simply produced again after a
resume. Throughput and where the time goes: docs/data.md.
"""
from __future__ import annotations

import collections
import copy
import ctypes
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .transport import Alloc, BatchTransport, local_alloc

log = logging.getLogger("sgfm_dist.data")

STATE_FORMAT = "sgfm_dist.data.stream/2"
"""Version 2: the elastic global order (streams, global batch); a /1 state (per-dp slots) cannot be resumed."""
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""
DRAW_AHEAD = 256
"""Shuffle-buffer indices drawn per call to the generator (see ``seeded_shuffle``)."""
MESSAGE_BYTES = 1 << 21
"""A worker message carries about this many bytes of batches (at least one batch, at most MAX_MESSAGE_BATCHES).
The arrays stay in the worker's shared buffers (the message holds references), so this bounds the
shared memory per worker, ``(prefetch_factor + 2) * MESSAGE_BYTES``, not what is pickled."""
MAX_MESSAGE_BATCHES = 16


@runtime_checkable
class BatchSource(Protocol):
    """An infinite iterator of batches with an exact resume position.

    ``state_dict()`` is the position after the last batch yielded (plain Python ints, strs
    and lists, so it fits a DeepSpeed checkpoint's ``client_state``); ``load_state_dict``
    sets it, and the next ``iter()`` continues from there. Calling ``iter()`` again
    without loading continues too: a source never repeats a batch.
    """

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class OrderMismatch(ValueError):
    """A saved position belongs to another sample order (seed, streams or global batch differ)."""


class CorruptShardError(ValueError):
    """A shard (or a sample in it) could not be read or decoded; the message names it."""


class Reader(Protocol):
    """Where samples live: a canonical list of units and the raw samples of one unit."""

    corrupt: Literal["skip", "fail"]

    def units(self) -> Sequence[Any]: ...

    def read(self, unit: Any) -> Iterator[dict]: ...

    def describe(self, unit: Any) -> str: ...


class Codec(Protocol):
    """What a sample means: expansion into training samples, decoding, collation.

    ``decode`` should be cheap (views, no copies): ``collate`` runs once per batch where the
    samples are read (a DataLoader worker) and writes the batch arrays in one pass into
    arrays from ``alloc(shape, dtype)`` (reused shared memory in a worker); it returns numpy
    arrays, lists and strings. ``finalize`` runs in the consuming process and turns that into
    the model's batch of tensors (page-locked when ``pin``).
    """

    def expand(self, raw: dict) -> Iterator[dict]: ...

    def decode(self, sample: dict) -> dict: ...

    def collate(self, samples: list[dict], alloc: Alloc) -> dict: ...

    def finalize(self, batch: dict, pin: bool) -> dict: ...

    def batch_nbytes(self, batch_size: int) -> int | None:
        """Bytes of one collated batch if known before reading (it sets the batches per worker message)."""
        ...


@dataclass
class LoaderConfig:
    """Order, batching and worker settings shared by text, video and physics sources."""

    batch_size: int = 8
    """Samples per batch on this rank (the per-dp-group micro batch)."""
    global_batch: int = 0
    """``G``: samples per global step over all dp groups (dp x micro batch x gradient accumulation);
    0 means ``batch_size * dp_size``. The global order depends on it (module notes)."""
    streams: int = 0
    """``K``: canonical streams the global order is built from; must divide ``global_batch`` and be a
    multiple of ``dp_size``. 0: :func:`default_streams` (8 or fewer, at most one per unit). The global
    order depends on it, not on dp."""
    seed: int = 0
    """Seed of the unit permutation and of the shuffle buffers; the same on every rank."""
    dp_rank: int = 0
    """Index of this rank's data-parallel group (NOT the global rank: sp ranks of one group share it)."""
    dp_size: int = 1
    """Number of data-parallel groups."""
    num_workers: int = 0
    """torch DataLoader worker processes; 0 reads in the calling process."""
    shuffle_buffer: int = 256
    """Shuffle buffer size in samples, per stream (1 = no shuffling within a block)."""
    units_per_block: int = 1
    """Units (shards or documents) whose samples are shuffled together; a resume replays at most one block."""
    shuffle_units: bool = True
    """Permute the units every epoch (False keeps the canonical order, for evaluation)."""
    prefetch_factor: int = 2
    """Batches each DataLoader worker prepares ahead (only with num_workers > 0)."""
    pin_memory: bool = True
    """Pin batch tensors in page-locked memory when CUDA is available (faster host-to-device copies)."""
    corrupt: Literal["skip", "fail"] = "fail"
    """Corrupt or truncated shard: 'skip' warns naming it and counts it; 'fail' raises CorruptShardError."""

    def __post_init__(self):
        for name in ("batch_size", "dp_size", "shuffle_buffer", "units_per_block", "prefetch_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        for name in ("seed", "num_workers", "dp_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {v!r}")
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"dp_rank: must be < dp_size={self.dp_size}, got {self.dp_rank}")
        if self.corrupt not in ("skip", "fail"):
            raise ValueError(f"corrupt: must be 'skip' or 'fail', got {self.corrupt!r}")
        for name in ("global_batch", "streams"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: must be an integer >= 0 (0: the default), got {v!r}")
        G, K, per_group = self.n_global, self.n_streams, self.batch_size * self.dp_size
        if G % per_group:
            raise ValueError(f"global_batch: {G} samples per step cannot be split into micro-batches of "
                             f"batch_size={self.batch_size} over dp_size={self.dp_size} groups (needs a multiple "
                             f"of {per_group})")
        if G % K:
            raise ValueError(f"streams: {K} canonical streams must divide global_batch={G} (data.streams)")
        if K % self.dp_size:
            raise ValueError(f"streams: {K} canonical streams cannot be split over dp_size={self.dp_size} groups; "
                             f"use a multiple of {self.dp_size} that divides global_batch={G} (data.streams)")

    @property
    def n_global(self) -> int:
        """``G``, samples per global step."""
        return self.global_batch or self.batch_size * self.dp_size

    @property
    def n_streams(self) -> int:
        """``K``, canonical streams (``StreamingSource`` sets ``streams`` from the data when it is 0)."""
        return self.streams or default_streams(self.n_global, self.dp_size)

    @property
    def chunk(self) -> int:
        """``c = G / K``: consecutive samples a stream gives per step."""
        return self.n_global // self.n_streams

    @property
    def group_streams(self) -> list[int]:
        """The streams this dp group reads, in global-batch order."""
        per = self.n_streams // self.dp_size
        return list(range(self.dp_rank * per, (self.dp_rank + 1) * per))

    @property
    def micro_per_step(self) -> int:
        """Micro-batches this dp group hands out per global step."""
        return self.n_global // (self.dp_size * self.batch_size)

    @property
    def loader_workers(self) -> int:
        """DataLoader worker processes actually used: ``num_workers`` reduced to a divisor of the
        group's stream count (0: read in the calling process)."""
        if self.num_workers == 0:
            return 0
        return math.gcd(self.num_workers, self.n_streams // self.dp_size)

    @property
    def workers(self) -> int:
        """Logical workers of the group (at least one, the calling process)."""
        return max(1, self.loader_workers)

    @property
    def n_slots(self) -> int:
        """Streams of the global order (the name of the reader helpers below: a stream is a slot)."""
        return self.n_streams


def default_streams(global_batch: int, dp_size: int, n_units: int | None = None) -> int:
    """The default ``K``: the largest divisor of ``global_batch`` that is a multiple of ``dp_size`` and
    at most ``min(8, n_units)`` (a stream per unit at most: fewer units than streams would make two
    streams read the same unit in one epoch); the smallest such divisor when none is that small.
    The same for every dp dividing it, so runs resumed on dp = 1, 2, 4, 8 share one order when the
    data has 8 units or more and the global batch is a multiple of 8; set ``data.streams`` to fix it."""
    cap = min(8, n_units) if n_units else 8
    fits = [k for k in range(dp_size, global_batch + 1, dp_size) if global_batch % k == 0]
    small = [k for k in fits if k <= cap]
    return max(small) if small else min(fits)


def as_tensor(value, dtype: torch.dtype | None = None, pin: bool = False) -> torch.Tensor:
    """A numpy array, tensor or list as a tensor of ``dtype`` (default: its own), in page-locked
    memory when ``pin``; no copy when nothing has to change."""
    t = value if isinstance(value, torch.Tensor) else (
        torch.from_numpy(value) if isinstance(value, np.ndarray) else torch.tensor(value))
    dtype = dtype or t.dtype
    if t.dtype == dtype and (not pin or t.is_pinned()):
        return t
    return torch.empty(t.shape, dtype=dtype, pin_memory=pin).copy_(t)


# ---- order ---------------------------------------------------------------------------

def slot_units(n_units: int, epoch: int, seed: int, slot: int, n_slots: int, shuffle: bool = True) -> list[int]:
    """Unit indices of ``slot`` in ``epoch``: a strided share of a seeded permutation, wrapped
    so every slot gets ``ceil(n_units / n_slots)`` units."""
    if n_units < 1:
        raise ValueError("n_units: a source needs at least one unit (shard or document)")
    if shuffle:
        perm = np.random.default_rng([seed, epoch, 0x5E6F]).permutation(n_units)  # [n_units]
    else:
        perm = np.arange(n_units)
    per_slot = -(-n_units // n_slots)
    return [int(perm[(slot + i * n_slots) % n_units]) for i in range(per_slot)]


def seeded_shuffle(samples: Iterable[dict], buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Streaming shuffle buffer: deterministic for a given ``rng`` and input order; drains at the end.

    The full buffer swaps out slot ``rng.integers(buffer)`` per input. Those numbers are drawn
    ``DRAW_AHEAD`` at a time (one call per sample costs ~1.5 us, a tenth of a text window's
    whole pipeline); numpy's bulk draw yields the same numbers as single calls, and the
    generator is rewound to exactly the numbers used before the final permutation, so the
    order is the one of a call per sample (resume positions stay valid).
    """
    buf: list[dict] = []
    picks: Iterator[int] = iter(())
    saved, used, drawn = None, 0, 0
    for s in samples:
        if len(buf) < buffer:
            buf.append(s)
            continue
        i = next(picks, None)
        if i is None:
            saved, used, drawn = rng.bit_generator.state, 0, DRAW_AHEAD
            picks = iter(rng.integers(buffer, size=DRAW_AHEAD).tolist())
            i = next(picks)
        used += 1
        out, buf[i] = buf[i], s
        yield out
    if used < drawn:
        rng.bit_generator.state = saved  # rewind: the permutation below must see only the numbers used
        rng.integers(buffer, size=used)
    for i in rng.permutation(len(buf)).tolist():
        yield buf[i]


@dataclass
class SlotPosition:
    """Where a slot stands: the next sample is number ``offset`` (0-based) of block ``block`` of ``epoch``."""

    epoch: int = 0
    block: int = 0
    offset: int = 0
    samples: int = 0
    """Samples this slot has yielded in total (for logs; not needed to resume)."""

    def as_dict(self) -> dict:
        return dict(epoch=self.epoch, block=self.block, offset=self.offset, samples=self.samples)


def slot_samples(reader: Reader, codec: Codec, cfg: LoaderConfig, slot: int, start: SlotPosition,
                 stats: dict) -> Iterator[tuple[dict, tuple[int, int, int, int]]]:
    """Decoded samples of ``slot`` from ``start`` on, forever, each with the position after it
    as a tuple ``(epoch, block, offset, samples)`` (a ``SlotPosition`` per sample cost ~0.4 us,
    a few percent of a text window; only a batch's last one is kept)."""
    units = reader.units()
    epoch, block, offset, total = start.epoch, start.block, start.offset, start.samples
    while True:
        mine = slot_units(len(units), epoch, cfg.seed, slot, cfg.n_slots, cfg.shuffle_units)
        blocks = [mine[i:i + cfg.units_per_block] for i in range(0, len(mine), cfg.units_per_block)]
        whole_epoch = block == 0 and offset == 0
        produced = 0  # decoded samples this epoch: zero over a whole epoch would loop forever
        for b in range(block, len(blocks)):
            rng = np.random.default_rng([cfg.seed, epoch, slot, b, 0xB10C])
            raw = _expanded(reader, codec, [units[u] for u in blocks[b]], stats)
            k = 0
            for sample in seeded_shuffle(raw, cfg.shuffle_buffer, rng):
                k += 1
                if k <= offset:
                    continue  # replay after a resume: drop without decoding
                decoded = _decode(reader, codec, sample, stats)
                if decoded is None:
                    continue
                total += 1
                produced += 1
                yield decoded, (epoch, b, k, total)
            offset = 0
        if whole_epoch and produced == 0:
            names = ", ".join(reader.describe(units[u]) for u in sorted(set(mine))[:8])
            raise ValueError(f"no samples: a whole epoch of data stream {slot} (units {names}) yielded nothing; "
                             f"the shards are empty, corrupt, undecodable, or hold no sample long enough for the codec")
        epoch, block = epoch + 1, 0


def _expanded(reader: Reader, codec: Codec, units: list, stats: dict) -> Iterator[dict]:
    for u in units:
        for raw in reader.read(u):
            try:
                yield from codec.expand(raw)
            except CorruptShardError:
                raise
            except Exception as e:  # a member missing or damaged: the sample is bad, the stream goes on
                _bad_sample(reader, raw, e, stats)


def _decode(reader: Reader, codec: Codec, sample: dict, stats: dict):
    try:
        return codec.decode(sample)
    except CorruptShardError:
        raise
    except Exception as e:  # a truncated .npy, a bad header: the sample's bytes are damaged
        _bad_sample(reader, sample, e, stats)
        return None


def _bad_sample(reader: Reader, sample: dict, e: Exception, stats: dict) -> None:
    where = f"sample {sample.get('__key__')!r} of {sample.get('__url__', '?')}"
    if reader.corrupt == "fail":
        raise CorruptShardError(f"cannot decode {where}: {type(e).__name__}: {e}") from e
    log.warning("skipping undecodable %s: %s: %s", where, type(e).__name__, e)
    stats["bad_samples"] = stats.get("bad_samples", 0) + 1


def slot_batches(reader: Reader, codec: Codec, cfg: LoaderConfig, slot: int, start: SlotPosition,
                 stats: dict, begin: Callable[[], Alloc] = lambda: local_alloc,
                 size: int | None = None) -> Iterator[tuple[dict, SlotPosition]]:
    """Collated batches of ``size`` samples (default: the stream's chunk) of stream ``slot`` with
    its position after each (``begin()`` gives each batch's allocator)."""
    size = size or cfg.chunk
    pending: list[dict] = []
    for sample, pos in slot_samples(reader, codec, cfg, slot, start, stats):
        pending.append(sample)
        if len(pending) == size:
            yield codec.collate(pending, begin()), SlotPosition(*pos)
            pending = []


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory in this process for reuse (a DataLoader worker).

    A worker allocates and frees the same sizes over and over (member bytes, decoded arrays)
    with a shuffle buffer's worth alive. By default glibc serves blocks above a dynamic
    threshold with fresh ``mmap`` pages and trims the top of the heap, so batch after batch
    pays first-touch page faults again: ~7 us per 4 KiB page on this project's VMs, more than
    reading the data (measured: physics, 480 -> 270 us of CPU per 0.5 MB sample end to end).
    Blocks up to 32 MiB (glibc's maximum threshold) now come from the heap, which is never
    trimmed: the worker keeps its peak heap. A no-op where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def _as_is(batch):
    """The DataLoader's collate_fn: a worker's message goes through untouched (the default
    would turn numpy arrays into tensors, each in one-off shared memory)."""
    return batch


# ---- the batch source ----------------------------------------------------------------

def batches_per_message(codec: Codec, batch_size: int) -> int:
    """``k``: batches of one worker message (see the module notes)."""
    nbytes = codec.batch_nbytes(batch_size) if hasattr(codec, "batch_nbytes") else None
    if not nbytes:
        return 1
    return max(1, min(MAX_MESSAGE_BATCHES, MESSAGE_BYTES // nbytes))


class _SlotDataset(IterableDataset):
    """One dp group's streams as a torch IterableDataset (logical worker ``w`` reads the group's
    local streams ``w, w + W, ...``, a chunk of each in turn, step after step), yielding messages:
    lists of ``per_message`` consecutive chunks."""

    def __init__(self, reader: Reader, codec: Codec, cfg: LoaderConfig, positions: dict[int, SlotPosition],
                 transport: BatchTransport | None = None, per_message: int = 1):
        self.reader, self.codec, self.cfg = reader, codec, cfg
        self.positions = positions
        self.transport = transport
        self.per_message = per_message

    def __iter__(self):
        info = get_worker_info()
        w = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)  # workers decode; intra-op threads would oversubscribe the cores
            keep_freed_memory()
        streams = self.cfg.group_streams[w::self.cfg.workers]
        stats: dict = {}
        reported = len(getattr(self.reader, "corrupt_seen", []))  # in-process readers keep their list across iter()
        transport = self.transport if info is not None else None
        begin = (lambda: transport.begin(w)) if transport is not None else (lambda: local_alloc)
        readers = [slot_batches(self.reader, self.codec, self.cfg, k, self.positions[k], stats, begin) for k in streams]
        message = []
        while True:
            for k, chunks in zip(streams, readers):
                batch, pos = next(chunks)
                corrupt = getattr(self.reader, "corrupt_seen", [])
                batch["_meta"] = dict(worker=w, stream=k, position=pos.as_dict(), new_corrupt=list(corrupt[reported:]),
                                      bad_samples=stats.get("bad_samples", 0))
                reported = len(corrupt)
                message.append(transport.seal(batch) if transport is not None else batch)
                if len(message) == self.per_message:
                    yield message
                    message = []


def concat_batches(batches: list[dict]) -> dict:
    """Batches (dicts of tensors [B, ...] and per-sample lists) joined along the batch."""
    if len(batches) == 1:
        return batches[0]
    keys = set().union(*batches)
    for name in sorted(keys):
        lacking = [b for b in batches if name not in b]
        if lacking:  # e.g. a per-sample metadata field some chunks state and some do not
            missing = [sid for b in lacking for sid in b.get("sample_ids", [])][:4]
            raise ValueError(f"batch: {name!r} is in the metadata of some samples but not of {missing}; "
                             f"a corpus states it for every sample or for none")
    out = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        elif all(v == first for v in values):
            out[key] = first
        else:
            raise ValueError(f"concat_batches: {key!r} is per batch and differs between them: {values[:3]}")
    return out


def split_batch(batch: dict, size: int) -> list[dict]:
    """A batch cut into consecutive batches of ``size`` samples (views, no copies)."""
    n = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
    if n == size:
        return [batch]
    return [{k: v[i:i + size] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()}
            for i in range(0, n, size)]


def _pinned(batch: dict) -> dict:
    return {k: as_tensor(v, pin=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


_ORDER_KEYS = ("seed", "streams", "global_batch")
"""State keys the global order depends on: a resume must use the same."""


def merge_states(states: list[dict]) -> dict:
    """One state from the states of every dp group of a run (their stream positions joined), which
    :meth:`StreamingSource.load_state_dict` of any dp group of any dp size accepts."""
    if not states:
        raise ValueError("merge_states: no states")
    if len(states) == 1:
        return states[0]
    for st in states:
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            raise ValueError(f"state: not a data source state (expected format {STATE_FORMAT!r})")
    first = states[0]
    positions: dict[str, dict] = {}
    for r, st in enumerate(states):
        for key in _ORDER_KEYS + ("steps", "micro"):
            if st.get(key) != first.get(key):
                raise ValueError(f"state: dp group {r} has {key}={st.get(key)!r}, dp group 0 {first.get(key)!r}; "
                                 f"the states are not of one step of one run")
        positions.update(st["positions"])
    merged = dict(first)
    merged["positions"] = positions
    merged["dp_rank"] = None
    return merged


class StreamingSource:
    """A ``BatchSource`` over a reader and a codec (see the module notes for the order)."""

    def __init__(self, reader: Reader, codec: Codec, cfg: LoaderConfig, describe: dict | None = None):
        if cfg.streams == 0:  # the default K knows the number of units
            cfg = dataclasses.replace(cfg, streams=default_streams(cfg.n_global, cfg.dp_size, len(reader.units())))
        self.reader, self.codec, self.cfg = reader, codec, cfg
        self.describe = dict(describe or {})
        self._steps = 0
        """Global steps whose samples this group has handed out completely."""
        self._micro = 0
        """Micro-batches handed out of the next step."""
        self._positions = {k: SlotPosition() for k in cfg.group_streams}
        """This group's stream positions after step ``_steps``."""
        self._bad_samples = [0] * cfg.workers
        self.corrupt_shards: list[str] = []
        """Names of corrupt shards skipped so far (policy 'skip'), for logs and TensorBoard."""

    @property
    def _batches(self) -> int:
        return self._steps * self.cfg.micro_per_step + self._micro

    # -- position ------------------------------------------------------------------
    def state_dict(self) -> dict:
        c = self.cfg
        return dict(format=STATE_FORMAT, seed=c.seed, streams=c.n_streams, global_batch=c.n_global,
                    steps=self._steps, micro=self._micro, dp_rank=c.dp_rank, dp_size=c.dp_size,
                    batch_size=c.batch_size, num_workers=c.num_workers, batches=self._batches,
                    samples=self._batches * c.batch_size,
                    positions={str(k): p.as_dict() for k, p in self._positions.items()},
                    **{f"source_{k}": v for k, v in self.describe.items()})

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: this source's own, or :func:`merge_states` of all dp groups of a
        run of any dp size with the same seed, streams and global batch."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: not a data source state (expected format {STATE_FORMAT!r}, got {got!r}; "
                             f"format /1 predates the elastic order and cannot be continued)")
        hints = {"seed": "data.seed", "streams": "data.streams",
                 "global_batch": "train.micro_batch x train.grad_accum x dp"}
        for key in _ORDER_KEYS:
            mine = getattr(self.cfg, {"streams": "n_streams", "global_batch": "n_global"}.get(key, key))
            if state.get(key) != mine:
                raise OrderMismatch(f"state: {key}={state.get(key)!r} in the checkpoint but {mine!r} in this source "
                                 f"({hints[key]}); the sample order depends on it, so resume with the same value")
        for k, v in self.describe.items():
            if state.get(f"source_{k}", v) != v:
                raise ValueError(f"state: source_{k}={state.get(f'source_{k}')!r} in the checkpoint but {v!r} here")
        micro = int(state.get("micro", 0))
        if micro and (state.get("dp_size"), state.get("batch_size")) != (self.cfg.dp_size, self.cfg.batch_size):
            raise ValueError(f"state: saved {micro} micro-batches into a step with dp_size={state.get('dp_size')}, "
                             f"batch_size={state.get('batch_size')}; a resume mid-step needs the same values "
                             f"(here {self.cfg.dp_size}, {self.cfg.batch_size})")
        positions = state.get("positions")
        if not isinstance(positions, dict):
            raise ValueError(f"state: 'positions' must map streams to positions, got {positions!r}")
        missing = [k for k in self.cfg.group_streams if str(k) not in positions]
        if missing:
            raise ValueError(f"state: no position of data streams {missing} (the state holds streams "
                             f"{sorted(int(k) for k in positions)}); pass the states of every dp group "
                             f"(merge_states)")
        self._positions = {k: SlotPosition(**{f: int(positions[str(k)][f])
                                              for f in ("epoch", "block", "offset", "samples")})
                           for k in self.cfg.group_streams}
        self._steps, self._micro = int(state["steps"]), micro

    def stats(self) -> dict:
        """Counters for logging: batches and samples consumed, corrupt shards and samples skipped."""
        return dict(batches=self._batches, samples=self._batches * self.cfg.batch_size,
                    corrupt_shards=len(self.corrupt_shards), bad_samples=sum(self._bad_samples))

    # -- iteration -----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        pin = cfg.pin_memory and torch.cuda.is_available()
        transport = None
        positions = copy.deepcopy(self._positions)
        if cfg.loader_workers == 0:
            messages = iter(_SlotDataset(self.reader, self.codec, cfg, positions))
        else:
            k = batches_per_message(self.codec, cfg.chunk)
            # in flight per worker: prefetch_factor messages queued, one being filled, one being consumed
            transport = BatchTransport(cfg.loader_workers, slots=cfg.prefetch_factor + 2, batches_per_slot=k)
            dataset = _SlotDataset(self.reader, self.codec, cfg, positions, transport, k)
            messages = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=cfg.loader_workers,
                                       prefetch_factor=cfg.prefetch_factor, pin_memory=False))
        try:
            yield from self._consume(messages, transport, pin)
        finally:
            # the last reference to the DataLoader iterator on a normal end or close(): the workers
            # stop before their pipes close. When an exception propagates, its traceback still holds
            # _consume's frame and the iterator with it; the workers stop when that is freed, and
            # hand-backs to the closed pipes meanwhile are ignored (_hand_back)
            del messages
            if transport is not None:
                transport.close()

    def _consume(self, messages: Iterator[list], transport: BatchTransport | None, pin: bool) -> Iterator[dict]:
        """Step by step: the group's chunks in stream order (worker ``i mod W`` for local stream
        ``i``), joined and cut into micro-batches; positions recorded as a step's last one is yielded."""
        cfg = self.cfg
        W = cfg.workers
        queued: list[collections.deque] = [collections.deque() for _ in range(W)]
        while True:
            after = dict(self._positions)
            chunks = []
            for i in range(len(cfg.group_streams)):
                due = i % W
                if not queued[due]:
                    message = next(messages)
                    w = message[0]["_meta"]["worker"]
                    if w != due:  # the DataLoader's round robin is what the order relies on
                        raise RuntimeError(f"data: a message from worker {w} where worker {due} was due; the "
                                           f"DataLoader did not deliver round robin")
                    queued[w].extend(transport.receive(b) if transport is not None else b for b in message)
                batch = queued[due].popleft()
                meta = batch.pop("_meta")
                after[meta["stream"]] = SlotPosition(**meta["position"])
                self._bad_samples[meta["worker"]] = meta["bad_samples"]
                for name in meta["new_corrupt"]:
                    self.corrupt_shards.append(name)
                chunks.append(self.codec.finalize(batch, False))
            micro = split_batch(concat_batches(chunks), cfg.batch_size)  # [G / dp] -> micro_per_step x [batch_size]
            for i in range(self._micro, len(micro)):
                if i == len(micro) - 1:
                    self._positions, self._steps, self._micro = after, self._steps + 1, 0
                else:
                    self._micro = i + 1
                yield _pinned(micro[i]) if pin else micro[i]
