"""A resumable, deterministic, sharded sample stream: the engine under every batch source.

A *reader* knows where samples live (in-memory documents, WebDataset tar shards on fsspec
URLs) and splits them into *units* (a document, a shard). A *codec* knows what a sample
means (text, video, physics): it expands one raw sample into training samples (a document
into [T, L] windows, a trajectory into T-frame windows), decodes one into numpy arrays and
collates a list into a batch of tensors. This module owns the order.

Notes
-----
Order. Readers are split into ``n_slots = dp_size * max(1, num_workers)`` independent
*slots*; slot ``s = dp_rank * W + w`` is DataLoader worker ``w`` of data-parallel group
``dp_rank``. sp ranks are not a parameter: every sp rank of one dp group builds the same
slots and therefore reads the same samples (each keeps its slab of the field later).
Epoch ``e`` permutes all units with a seed of ``(seed, e)``; slot ``s`` takes the units at
permuted positions ``s, s + n_slots, ...``, padded by wrapping around to
``ceil(n_units / n_slots)`` units, so every slot gets the same number of units (this is the
seeded resampling that keeps ranks from running dry at different times). Every slot
streams forever (epoch after epoch), so every rank gets exactly as many batches as the
trainer asks for and no DDP collective can hang on an uneven split.

Shuffle. A slot's units are grouped into *blocks* of ``units_per_block``; the samples of one
block go through a shuffle buffer seeded by ``(seed, epoch, slot, block)`` that is drained
at the end of the block. Samples therefore never mix across blocks, which is what makes
the resume position small and exact.

Resume. A slot's position is ``(epoch, block, offset)``: the number of shuffled samples
already taken from that block. Resuming re-reads the block and drops the first ``offset``
samples *before* decoding them (replay costs at most one block of raw reads), so the
sample sequence continues exactly, with nothing lost or repeated.

Workers. With ``num_workers = W > 0`` the torch DataLoader takes batches from its workers
round robin, starting at worker 0. A worker's batches are consecutive batches of its slot,
so the source records ``batches`` consumed in total and on resume renames the physical
workers so that the one whose turn it is comes first. The order depends on W (as any
worker split does); ``load_state_dict`` refuses a state written with another W.

Messages. Batches, not samples, cross process boundaries: a worker reads, decodes and
collates whole batches (into reused shared memory, ``transport``), and one DataLoader item
(``batch_size=None``) is a *message* of ``k`` consecutive batches of one worker, ``k`` chosen
from the codec's batch size so that small batches (text) do not pay the DataLoader's
per-item cost (~0.25 ms) each. The consumer keeps a queue per worker and still takes batches
round robin one at a time, so the batch order, the positions and the resume are those of
``k = 1``: buffered batches that were not yet yielded are simply produced again after a
resume. Throughput and where the time goes: docs/data.md.
"""
from __future__ import annotations

import collections
import copy
import ctypes
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .transport import Alloc, BatchTransport, local_alloc

log = logging.getLogger("sgfm_dist.data")

STATE_FORMAT = "sgfm_dist.data.stream/1"
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
    seed: int = 0
    """Seed of the unit permutation and of the shuffle buffers; the same on every rank."""
    dp_rank: int = 0
    """Index of this rank's data-parallel group (NOT the global rank: sp ranks of one group share it)."""
    dp_size: int = 1
    """Number of data-parallel groups."""
    num_workers: int = 0
    """torch DataLoader worker processes; 0 reads in the calling process."""
    shuffle_buffer: int = 256
    """Shuffle buffer size in samples (1 = no shuffling within a block)."""
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

    @property
    def workers(self) -> int:
        """Number of slots per dp group (at least one, the calling process)."""
        return max(1, self.num_workers)

    @property
    def n_slots(self) -> int:
        return self.dp_size * self.workers


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
            raise ValueError(f"no samples: a whole epoch of data slot {slot} (units {names}) yielded nothing; "
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
                 stats: dict, begin: Callable[[], Alloc] = lambda: local_alloc) -> Iterator[tuple[dict, SlotPosition]]:
    """Collated batches of ``slot`` with the slot position after each (``begin()`` gives each
    batch's allocator)."""
    pending: list[dict] = []
    for sample, pos in slot_samples(reader, codec, cfg, slot, start, stats):
        pending.append(sample)
        if len(pending) == cfg.batch_size:
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
    """One dp group's slots as a torch IterableDataset (one slot per worker process), yielding
    messages: lists of ``per_message`` consecutive batches."""

    def __init__(self, reader: Reader, codec: Codec, cfg: LoaderConfig, positions: list[SlotPosition],
                 first_worker: int, transport: BatchTransport | None = None, per_message: int = 1):
        self.reader, self.codec, self.cfg = reader, codec, cfg
        self.positions = positions
        self.first_worker = first_worker
        self.transport = transport
        self.per_message = per_message

    def __iter__(self):
        info = get_worker_info()
        physical = 0 if info is None else info.id
        if info is not None:
            torch.set_num_threads(1)  # workers decode; intra-op threads would oversubscribe the cores
            keep_freed_memory()
        w = (physical + self.first_worker) % self.cfg.workers  # logical worker: resume starts at the right turn
        slot = self.cfg.dp_rank * self.cfg.workers + w
        stats: dict = {}
        reported = len(getattr(self.reader, "corrupt_seen", []))  # in-process readers keep their list across iter()
        transport = self.transport if info is not None else None
        begin = (lambda: transport.begin(w)) if transport is not None else (lambda: local_alloc)
        message = []
        for batch, pos in slot_batches(self.reader, self.codec, self.cfg, slot, self.positions[w], stats, begin):
            corrupt = getattr(self.reader, "corrupt_seen", [])
            batch["_meta"] = dict(worker=w, position=pos.as_dict(), new_corrupt=list(corrupt[reported:]),
                                  bad_samples=stats.get("bad_samples", 0))
            reported = len(corrupt)
            message.append(transport.seal(batch) if transport is not None else batch)
            if len(message) == self.per_message:
                yield message
                message = []


class StreamingSource:
    """A ``BatchSource`` over a reader and a codec (see the module notes for the order)."""

    def __init__(self, reader: Reader, codec: Codec, cfg: LoaderConfig, describe: dict | None = None):
        self.reader, self.codec, self.cfg = reader, codec, cfg
        self.describe = dict(describe or {})
        self._batches = 0
        self._positions = [SlotPosition() for _ in range(cfg.workers)]
        self._bad_samples = [0] * cfg.workers
        self.corrupt_shards: list[str] = []
        """Names of corrupt shards skipped so far (policy 'skip'), for logs and TensorBoard."""

    # -- position ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(format=STATE_FORMAT, seed=self.cfg.seed, dp_rank=self.cfg.dp_rank, dp_size=self.cfg.dp_size,
                    num_workers=self.cfg.num_workers, batch_size=self.cfg.batch_size, batches=self._batches,
                    samples=self._batches * self.cfg.batch_size, slots=[p.as_dict() for p in self._positions],
                    **{f"source_{k}": v for k, v in self.describe.items()})

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: not a data source state (expected format {STATE_FORMAT!r}, "
                             f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        for key in ("seed", "dp_rank", "dp_size", "num_workers", "batch_size"):
            if state.get(key) != getattr(self.cfg, key):
                raise ValueError(f"state: {key}={state.get(key)!r} in the checkpoint but {getattr(self.cfg, key)!r} "
                                 f"in this source; the sample order depends on it, so resume with the same value")
        for k, v in self.describe.items():
            if state.get(f"source_{k}", v) != v:
                raise ValueError(f"state: source_{k}={state.get(f'source_{k}')!r} in the checkpoint but {v!r} here")
        slots = state.get("slots")
        if not isinstance(slots, list) or len(slots) != self.cfg.workers:
            raise ValueError(f"state: 'slots' must list {self.cfg.workers} slot positions, got {slots!r}")
        self._positions = [SlotPosition(**{k: int(s[k]) for k in ("epoch", "block", "offset", "samples")})
                           for s in slots]
        self._batches = int(state["batches"])

    def stats(self) -> dict:
        """Counters for logging: batches and samples consumed, corrupt shards and samples skipped."""
        return dict(batches=self._batches, samples=self._batches * self.cfg.batch_size,
                    corrupt_shards=len(self.corrupt_shards), bad_samples=sum(self._bad_samples))

    # -- iteration -----------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        first = self._batches % cfg.workers
        pin = cfg.pin_memory and torch.cuda.is_available()
        transport = None
        positions = copy.deepcopy(self._positions)
        if cfg.num_workers == 0:
            messages = iter(_SlotDataset(self.reader, self.codec, cfg, positions, first))
        else:
            k = batches_per_message(self.codec, cfg.batch_size)
            # in flight per worker: prefetch_factor messages queued, one being filled, one being consumed
            transport = BatchTransport(cfg.num_workers, slots=cfg.prefetch_factor + 2, batches_per_slot=k)
            dataset = _SlotDataset(self.reader, self.codec, cfg, positions, first, transport, k)
            messages = iter(DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=cfg.num_workers,
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
        """Batches in round-robin worker order, positions recorded as each is yielded (module notes)."""
        cfg = self.cfg
        queued: list[collections.deque] = [collections.deque() for _ in range(cfg.workers)]
        while True:
            due = self._batches % cfg.workers
            if not queued[due]:
                message = next(messages)
                w = message[0]["_meta"]["worker"]
                if w != due:  # the DataLoader's round robin is what the order and the resume rely on
                    raise RuntimeError(f"data: a message from worker {w} where worker {due} was due; the "
                                       f"DataLoader did not deliver round robin")
                queued[w].extend(transport.receive(b) if transport is not None else b for b in message)
            batch = queued[due].popleft()
            meta = batch.pop("_meta")
            w = meta["worker"]
            self._positions[w] = SlotPosition(**meta["position"])
            self._bad_samples[w] = meta["bad_samples"]
            for name in meta["new_corrupt"]:
                self.corrupt_shards.append(name)
            self._batches += 1
            yield self.codec.finalize(batch, pin)

