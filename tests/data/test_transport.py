"""Worker -> main hand-over through lent shared buffers: reuse, lending, the one-off fallback, and
batch contents through real DataLoader workers checked against the stored arrays."""
from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from sgfm_dist.data import build_text_source
from sgfm_dist.data.fields import build_physics_source
from sgfm_dist.data.shards import json_bytes, npy_bytes
from sgfm_dist.data.transport import SHARED_MIN_BYTES, BatchTransport, SharedArray


def _batch(transport: BatchTransport, value: float) -> dict:
    """One batch as a worker makes it (begin, alloc, fill, seal) and the main process receives it."""
    alloc = transport.begin(0)
    field = alloc((4, 1024), np.float32)  # 16 KiB: a shared buffer
    field[:] = value
    small = alloc((3,), np.int64)  # below SHARED_MIN_BYTES: travels in the message
    small[:] = 7
    message = transport.seal({"field": field, "small": small, "ids": ["a", "b"]})
    assert isinstance(message["field"], SharedArray) and isinstance(message["small"], np.ndarray)
    return transport.receive(message)


def test_buffers_are_reused_and_lent_until_the_batch_is_gone():
    assert 4 * 1024 * 4 >= SHARED_MIN_BYTES
    transport = BatchTransport(workers=1, slots=2)
    try:
        held = _batch(transport, 1.0)["field"][1:]  # a view keeps the whole batch's slot lent
        b = _batch(transport, 2.0)
        ptr_b = b["field"].data_ptr()
        assert torch.equal(b["field"], torch.full((4, 1024), 2.0)) and b["small"].tolist() == [7, 7, 7]
        del b
        gc.collect()
        c = _batch(transport, 3.0)["field"]
        assert c.data_ptr() == ptr_b  # the returned slot was filled again, not new memory
        assert torch.equal(held, torch.full((3, 1024), 1.0))  # the lent slot was not touched
        # both slots out (held, c): the next batch waits briefly, then goes in one-off shared memory
        alloc = transport.begin(0)
        field = alloc((4, 1024), np.float32)
        field[:] = 4.0
        message = transport.seal({"field": field})
        assert isinstance(message["field"], torch.Tensor)  # one-off: torch hands it over
        assert torch.equal(transport.receive(message)["field"], torch.full((4, 1024), 4.0))
        assert torch.equal(held, torch.full((3, 1024), 1.0)) and torch.equal(c, torch.full((4, 1024), 3.0))
        del held
        gc.collect()
        e = _batch(transport, 5.0)["field"]  # the first slot is back
        assert torch.equal(e, torch.full((4, 1024), 5.0)) and torch.equal(c, torch.full((4, 1024), 3.0))
    finally:
        transport.close()


def test_a_message_outgrowing_its_slot_chains_a_segment_then_gets_one():
    transport = BatchTransport(workers=1, slots=1, batches_per_slot=3)
    try:
        for message in range(3):
            batches = []
            for i, n in enumerate((1024, 1024, 16384)):  # the last batch does not fit what the first sized
                alloc = transport.begin(0)
                field = alloc((n,), np.float32)
                field[:] = 10 * message + i
                batches.append(transport.receive(transport.seal({"field": field})))
            for i, (b, n) in enumerate(zip(batches, (1024, 1024, 16384))):
                assert torch.equal(b["field"], torch.full((n,), 10.0 * message + i))
            segments = {key for key in transport._received if key[1] == 0}
            assert len(transport._segments[0]) == len(segments) == (2 if message == 0 else 1)
            del batches, b
            gc.collect()  # every array back: the slot is free for the next message
    finally:
        transport.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_open_file_descriptors_stay_about_one_per_slot(text_shards):
    """torch's file_descriptor sharing keeps one open fd per shared segment received: one segment per
    slot (a message of up to 16 batches, two shared arrays each here) keeps the count small."""
    shards, _ = text_shards
    workers, prefetch = 2, 2
    base = _open_fds()
    src = build_text_source(str(shards), "train", batch_size=2, rows=4, row_len=512, num_workers=workers,
                            prefetch_factor=prefetch, shuffle_buffer=4)  # tokens 32 KiB, mask 4 KiB: both shared
    it = iter(src)
    held = next(it)  # the evaluation batch, kept
    peak = 0
    for _ in range(120):
        batch = next(it)
        peak = max(peak, _open_fds())
    assert held["tokens"].shape == batch["tokens"].shape == (2, 4, 512)
    assert peak <= base + 4 * (prefetch + 2) * workers, (base, peak)


def _write_fields(root, n_shards: int = 3, per_shard: int = 5) -> dict[str, np.ndarray]:
    """Physics-like shards of float32 [T=4, 2, 16, 16] trajectories (8 KiB each); returns key -> array."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as tar:
            for i in range(per_shard):
                key = f"s{s}-{i:03d}"
                arrays[key] = np.random.default_rng([s, i]).standard_normal((4, 2, 16, 16)).astype(np.float32)
                tar.write({"__key__": key, "npy": npy_bytes(arrays[key]),
                           "json": json_bytes(dict(nu=0.01 * (i + 1), dt=0.1))})  # nu > 0: a valid viscosity
    return arrays


@pytest.mark.parametrize("num_workers", [0, 2])
def test_worker_batches_are_the_stored_arrays_while_batches_are_held(tmp_path, num_workers):
    arrays = _write_fields(tmp_path / "shards")
    src = build_physics_source(str(tmp_path / "shards" / "*.tar"), "train", batch_size=2, frames=2, seed=3,
                               num_workers=num_workers, shuffle_buffer=4, prefetch_factor=2)
    it = iter(src)
    held = []
    for step in range(24):  # several epochs; slots are recycled many times over
        batch = next(it)
        for field, sid, nu in zip(batch["field"], batch["sample_ids"], batch["nu"].tolist()):
            key, start = sid.split("@")
            stored = arrays[key][int(start):int(start) + 2]  # [T, C, H, W]
            np.testing.assert_array_equal(field.numpy(), stored.swapaxes(0, 1))
            assert nu == pytest.approx(0.01 * (int(key.split("-")[1]) + 1))
        if step % 5 == 0:
            held.append((batch["field"], batch["field"].clone()))  # the trainer keeps some (the eval batch)
    for kept, copy in held:
        assert torch.equal(kept, copy)  # never overwritten while held
    assert json.dumps(src.state_dict())  # the position still fits a checkpoint


@pytest.mark.gpu
def test_worker_batches_are_pinned_with_cuda(tmp_path):
    _write_fields(tmp_path / "shards")
    src = build_physics_source(str(tmp_path / "shards" / "*.tar"), "train", batch_size=2, num_workers=2)
    batch = next(iter(src))
    assert batch["field"].is_pinned() and batch["nu"].is_pinned() and batch["field"].dtype == torch.float32

