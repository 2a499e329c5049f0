"""Batches from DataLoader workers to the main process through reused shared-memory buffers.

torch's default hand-over allocates a new shared-memory segment for every tensor of every
batch and passes its file descriptor through a socket round trip to the worker's resource
sharer thread (which waits for the worker's GIL: up to the 5 ms switch interval per tensor).
Fresh pages are the other cost: on a VM a first touch of a page costs several microseconds,
so writing an 8 MB batch into new shared memory costs more than reading it from the shard.
Here each worker owns a few *slots* (at least the DataLoader's prefetch depth + 2), each
holding the ``batches_per_slot`` batches of one worker message, that it fills again and again:

* worker: ``begin()`` starts a batch (the first batch of a message takes a free slot), the
  codec's ``collate`` asks ``alloc(shape, dtype)`` for its arrays (large ones are views at
  byte offsets of the slot's shared segment, small ones plain arrays that travel pickled),
  ``seal(batch)`` replaces the segment views by ``SharedArray`` references and attaches any
  segment the main process has not seen yet (sent once, via torch);
* main process: ``receive(batch)`` turns every reference into a tensor over the segment (no
  copy) and *lends* it to the consumer: when the last tensor or view of an array is gone, a
  ``weakref.finalize`` on the array's own numpy base tells its worker through a pipe; the
  slot is free again once every array of its message is back. (With CUDA, the codec's
  ``finalize`` copies the batch into page-locked memory, the copy the DataLoader's pin thread
  would make, and the arrays come back at once.)

So a batch stays valid for as long as anything holds it (the evaluation batch, a slab view
of the field): its slot is simply not reused until then. A worker whose slots are all lent or
in flight (the consumer holds batches of more messages than the prefetch depth) waits
briefly for one, then sends that message in one-off shared memory instead.

One segment per slot, not per array or per batch: with torch's default ``file_descriptor``
sharing strategy the main process keeps one open file descriptor per segment it received, so
per-array buffers (``slots x batches x arrays``: ~128 per text worker) ran 8 workers into the
usual ``ulimit -n`` of 1024. A slot's segment grows by chaining a further segment when a
message does not fit; the next message in that slot gets one segment of the whole size.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SHARED_MIN_BYTES = 1 << 12
"""Arrays below this size (a page) travel pickled in the worker's message; from here up a lent
buffer was cheaper (text batches of 32 KiB: ~15% less CPU than pickling them)."""
ALIGN = 64
WAIT_FOR_SLOT_S = 0.02
"""How long a worker waits for a slot to come back before it uses one-off shared memory."""

Alloc = Callable[[tuple, np.dtype], np.ndarray]
"""``alloc(shape, dtype)``: an uninitialised array for a batch (where it lives is the transport's choice)."""


def local_alloc(shape: tuple, dtype) -> np.ndarray:
    """The allocator without workers: ordinary memory."""
    return np.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class SharedArray:
    """A batch array at byte ``offset`` of segment ``segment`` of ``slot`` of logical worker ``worker``."""

    worker: int
    slot: int
    segment: int
    offset: int
    shape: tuple
    dtype: str


def _shared_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_()


def _hand_back(pipe, slot: int) -> None:
    """Return one array of a slot to its worker (the finalizer of a lent batch array)."""
    try:
        pipe.send_bytes(slot.to_bytes(4, "little"))  # one atomic pipe write, safe from any thread; no pickling
    except (OSError, ValueError):
        pass  # the iteration is over and its workers are gone


class BatchTransport:
    """The shared state of one DataLoader iteration: one free-slot pipe per logical worker.

    Built in the main process before the workers start (they inherit it); the worker side
    (``begin``/``seal``) and the main side (``receive``) keep their own caches. A slot holds
    the ``batches_per_slot`` consecutive batches of one message (``begin`` counts them).
    """

    def __init__(self, workers: int, slots: int, batches_per_slot: int = 1):
        if slots < 1 or batches_per_slot < 1:
            raise ValueError(f"slots, batches_per_slot: must be >= 1, got {slots}, {batches_per_slot}")
        self.slots, self.batches_per_slot = slots, batches_per_slot
        self._pipes = [mp.Pipe(duplex=False) for _ in range(workers)]  # (worker's end, main's end)
        # worker side
        self._worker: int | None = None
        self._free: list[int] = []
        self._segments: dict[int, list[torch.Tensor]] = {}  # slot -> its uint8 shared segments
        self._new: dict[tuple[int, int], torch.Tensor] = {}  # (slot, segment) the main process has not seen yet
        self._dropped: list[tuple[int, int]] = []  # (slot, segment) replaced: the main process can let go
        self._slot: int | None = None  # the slot of the message being filled (None: the one-off way)
        self._batch = 0  # batches of the message being filled sealed so far
        self._cursor = (0, 0)  # (segment, byte offset) where the next array goes
        self._used = 0  # bytes the message being filled asked for so far
        self._need = 0  # the most bytes a message asked for: the size of a slot's single segment
        self._lent: dict[int, int] = {}  # slot -> its arrays the main process has not handed back yet
        self._allocated: dict[int, tuple[int, int, np.ndarray]] = {}  # id -> (segment, offset, array) of this batch
        # main side
        self._received: dict[tuple[int, int, int], memoryview] = {}

    # -- worker side ---------------------------------------------------------------
    def begin(self, worker: int) -> Alloc:
        """Start a batch of logical worker ``worker``; returns the allocator for its arrays."""
        if self._worker is None:
            self._worker = worker
            self._free = list(range(self.slots))
        reader = self._pipes[worker][0]
        while reader.poll():
            self._returned(int.from_bytes(reader.recv_bytes(), "little"))
        if self._batch == 0:  # a new message: a free slot, with one segment big enough for it
            while not self._free and reader.poll(WAIT_FOR_SLOT_S):
                self._returned(int.from_bytes(reader.recv_bytes(), "little"))
            self._slot = self._free.pop(0) if self._free else None  # None: this message goes the one-off way
            self._used, self._cursor = 0, (0, 0)
            if self._slot is not None:
                self._lent[self._slot] = 0
                self._merge_segments(self._slot)
        self._allocated = {}
        return self._alloc

    def _merge_segments(self, slot: int) -> None:
        """Give a free slot one segment of ``_need`` bytes if it has several or a smaller one."""
        segments = self._segments.get(slot, [])
        if len(segments) == 1 and segments[0].numel() >= self._need or not segments and not self._need:
            return
        self._dropped += [(slot, j) for j in range(1, len(segments))]  # (slot, 0) is replaced below
        self._segments[slot] = [_shared_bytes(self._need)]
        self._new[(slot, 0)] = self._segments[slot][0]
        for j in range(1, len(segments)):
            self._new.pop((slot, j), None)

    def _returned(self, slot: int) -> None:
        self._lent[slot] -= 1
        if self._lent[slot] == 0 and slot != self._slot:
            self._free.append(slot)

    def _alloc(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < SHARED_MIN_BYTES or self._slot is None:
            return np.empty(shape, dtype=dtype)
        size = -(-nbytes // ALIGN) * ALIGN
        self._used += size
        segments = self._segments.setdefault(self._slot, [])
        j, offset = self._cursor
        if j < len(segments) and offset + size > segments[j].numel():
            j, offset = j + 1, 0  # the rest of this segment stays unused until the slot's segments are merged
        if j == len(segments):  # the message outgrew its slot: chain a segment (room for the batches to come)
            grow = max(size * (self.batches_per_slot - self._batch), sum(s.numel() for s in segments))
            segments.append(_shared_bytes(grow))
            self._new[(self._slot, j)] = segments[j]
        self._cursor = (j, offset + size)
        arr = segments[j].numpy()[offset:offset + nbytes].view(dtype).reshape(shape)
        self._allocated[id(arr)] = (j, offset, arr)  # holding the array keeps its id unique
        return arr

    def seal(self, batch: dict) -> dict:
        """The message for the main process: segment arrays replaced by references, new segments attached.

        Large arrays that are not segment arrays (the one-off way, or a codec that built a new
        array) become tensors, which torch hands over in one-off shared memory.
        """
        referenced = 0
        for k, v in batch.items():
            if not isinstance(v, np.ndarray):
                continue
            segment, offset, arr = self._allocated.get(id(v), (None, None, None))
            if arr is v:
                batch[k] = SharedArray(self._worker, self._slot, segment, offset, v.shape, v.dtype.str)
                referenced += 1
            elif v.nbytes >= SHARED_MIN_BYTES:
                batch[k] = torch.from_numpy(v)
        if self._new or self._dropped:
            batch["_segments"] = dict(new={(self._worker, s, j): buf for (s, j), buf in self._new.items()},
                                      dropped=[(self._worker, s, j) for s, j in self._dropped])
            self._new, self._dropped = {}, []
        self._allocated = {}
        self._batch += 1
        if self._slot is not None:
            self._lent[self._slot] += referenced  # each array comes back on its own
        if self._batch == self.batches_per_slot:  # the message is complete
            self._batch = 0
            self._need = max(self._need, self._used)
            if self._slot is not None and self._lent[self._slot] == 0:
                self._free.append(self._slot)  # nothing of this message lives in the slot: it stays ours
            self._slot = None
        return batch

    # -- main side -----------------------------------------------------------------
    def receive(self, batch: dict) -> dict:
        """The batch with tensors over the shared segments, each array lent until it and its views are gone."""
        segments = batch.pop("_segments", None)
        if segments is not None:
            for key in segments["dropped"]:
                self._received.pop(key, None)  # its fd closes with the last array over it
            for key, buf in segments["new"].items():
                self._received[key] = memoryview(buf.numpy())
        for k, v in batch.items():
            if isinstance(v, SharedArray):
                dtype = np.dtype(v.dtype)
                # a numpy array of its own per array (its base is the memoryview, so numpy does not
                # collapse it away): every tensor and view made from it keeps it alive, and only it
                holder = np.frombuffer(self._received[(v.worker, v.slot, v.segment)], dtype=np.uint8,
                                       count=math.prod(v.shape) * dtype.itemsize, offset=v.offset)
                weakref.finalize(holder, _hand_back, self._pipes[v.worker][1], v.slot).atexit = False
                batch[k] = torch.from_numpy(holder.view(dtype).reshape(v.shape))
        return batch

    def close(self) -> None:
        for r, w in self._pipes:
            r.close()
            w.close()
