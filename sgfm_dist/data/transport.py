"""Batches from DataLoader workers to the main process through reused shared-memory buffers.

torch's default hand-over allocates a new shared-memory segment for every tensor of every
batch and passes its file descriptor through a socket round trip to the worker's resource
sharer thread (which waits for the worker's GIL: up to the 5 ms switch interval per tensor).
Fresh pages are the other cost: on a VM a first touch of a page costs several microseconds,
so writing an 8 MB batch into new shared memory costs more than reading it from the shard.
Here each worker owns a few buffers per batch array (``slots``, at least the DataLoader's
prefetch depth + 2) that it fills again and again:

* worker: ``begin()`` takes a free slot, the codec's ``collate`` asks ``alloc(shape, dtype)``
  for its arrays (large ones are views of the slot's buffers, small ones plain arrays that
  travel pickled), ``seal(batch)`` replaces the buffer views by ``SharedArray`` references
  and attaches any buffer the main process has not seen yet (sent once, via torch);
* main process: ``receive(batch)`` turns every reference into a tensor over the buffer (no
  copy) and *lends* the slot to the consumer: when the last tensor or view of that memory
  is gone, a ``weakref.finalize`` on the batch's own numpy base sends the slot back to its
  worker through a pipe. (With CUDA, the codec's ``finalize`` copies the batch into
  page-locked memory, the copy the DataLoader's pin thread would make, and the slot comes
  back at once.)

So a batch stays valid for as long as anything holds it (the evaluation batch, a slab view
of the field): its slot is simply not reused until then. A worker whose slots are all lent or
in flight (the consumer holds more batches than the prefetch depth) waits briefly for one,
then sends that batch in one-off shared memory instead.
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
    """A batch array in buffer ``index`` of ``slot`` of logical worker ``worker``."""

    worker: int
    slot: int
    index: int
    shape: tuple
    dtype: str


def _shared_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_()


def _hand_back(pipe, slot: int) -> None:
    """Return a slot's array to its worker (the finalizer of a lent batch array)."""
    try:
        pipe.send_bytes(slot.to_bytes(4, "little"))  # one atomic pipe write, safe from any thread; no pickling
    except (OSError, ValueError):
        pass  # the iteration is over and its workers are gone


class BatchTransport:
    """The shared state of one DataLoader iteration: one free-slot pipe per logical worker.

    Built in the main process before the workers start (they inherit it); the worker side
    (``begin``/``seal``) and the main side (``receive``) keep their own caches.
    """

    def __init__(self, workers: int, slots: int):
        if slots < 1:
            raise ValueError(f"slots: must be >= 1, got {slots}")
        self.slots = slots
        self._pipes = [mp.Pipe(duplex=False) for _ in range(workers)]  # (worker's end, main's end)
        # worker side
        self._worker: int | None = None
        self._free: list[int] = []
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}  # (slot, index) -> uint8 shared buffer
        self._new: dict[tuple[int, int], torch.Tensor] = {}  # buffers the main process has not seen yet
        self._slot: int | None = None
        self._lent: dict[int, int] = {}  # slot -> its arrays the main process has not handed back yet
        self._allocated: dict[int, tuple[int, np.ndarray]] = {}  # id -> (buffer index, array) of this batch
        # main side
        self._received: dict[tuple[int, int, int], np.ndarray] = {}

    # -- worker side ---------------------------------------------------------------
    def begin(self, worker: int) -> Alloc:
        """Start a batch of logical worker ``worker``; returns the allocator for its arrays."""
        if self._worker is None:
            self._worker = worker
            self._free = list(range(self.slots))
        reader = self._pipes[worker][0]
        while reader.poll():
            self._returned(int.from_bytes(reader.recv_bytes(), "little"))
        while not self._free and reader.poll(WAIT_FOR_SLOT_S):
            self._returned(int.from_bytes(reader.recv_bytes(), "little"))
        self._slot = self._free.pop(0) if self._free else None  # None: this batch goes the one-off way
        self._allocated = {}
        return self._alloc

    def _returned(self, slot: int) -> None:
        self._lent[slot] -= 1
        if self._lent[slot] == 0:
            self._free.append(slot)

    def _alloc(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < SHARED_MIN_BYTES or self._slot is None:
            return np.empty(shape, dtype=dtype)
        index = len(self._allocated)
        key = (self._slot, index)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = _shared_bytes(-(-nbytes // ALIGN) * ALIGN)
            self._new[key] = buf
        arr = buf.numpy()[:nbytes].view(dtype).reshape(shape)
        self._allocated[id(arr)] = (index, arr)  # holding the array keeps its id unique
        return arr

    def seal(self, batch: dict) -> dict:
        """The message for the main process: buffer arrays replaced by references, new buffers attached.

        Large arrays that are not buffer arrays (the one-off way, or a codec that built a new
        array) become tensors, which torch hands over in one-off shared memory.
        """
        referenced = 0
        for k, v in batch.items():
            if not isinstance(v, np.ndarray):
                continue
            index, arr = self._allocated.get(id(v), (None, None))
            if arr is v:
                batch[k] = SharedArray(self._worker, self._slot, index, v.shape, v.dtype.str)
                referenced += 1
            elif v.nbytes >= SHARED_MIN_BYTES:
                batch[k] = torch.from_numpy(v)
        if self._new:
            batch["_buffers"] = {(self._worker, s, i): buf for (s, i), buf in self._new.items()}
            self._new = {}
        if self._slot is not None:
            if referenced:
                self._lent[self._slot] = referenced  # each array comes back on its own
            else:
                self._free.append(self._slot)  # nothing of this batch lives in the slot: it stays ours
        self._allocated = {}
        return batch

    # -- main side -----------------------------------------------------------------
    def receive(self, batch: dict) -> dict:
        """The batch with tensors over the shared buffers, each lent until it and its views are gone."""
        for key, buf in batch.pop("_buffers", {}).items():
            self._received[key] = memoryview(buf.numpy())
        for k, v in batch.items():
            if isinstance(v, SharedArray):
                dtype = np.dtype(v.dtype)
                # a numpy array of its own per batch (its base is the memoryview, so numpy does not
                # collapse it away): every tensor and view made from it keeps it alive, and only it
                holder = np.frombuffer(self._received[(v.worker, v.slot, v.index)], dtype=np.uint8,
                                       count=math.prod(v.shape) * dtype.itemsize)
                weakref.finalize(holder, _hand_back, self._pipes[v.worker][1], v.slot).atexit = False
                batch[k] = torch.from_numpy(holder.view(dtype).reshape(v.shape))
        return batch

    def close(self) -> None:
        for r, w in self._pipes:
            r.close()
            w.close()
