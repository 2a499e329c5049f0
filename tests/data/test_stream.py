"""Order, dp-group split, exact and elastic resume, workers and corrupt-shard policies of the shard stream."""
from __future__ import annotations

import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from sgfm_dist.data import CorruptShardError, build_text_source
from sgfm_dist.data.stream import merge_states, seeded_shuffle, slot_units


def _source(shards, **kw):
    args = dict(split="train", batch_size=3, rows=2, row_len=16, shuffle_buffer=5, seed=7)
    args.update(kw)
    return build_text_source(str(shards), **args)


def _ids(source, n_batches):
    it = iter(source)
    return [sid for _ in range(n_batches) for sid in next(it)["sample_ids"]]


@pytest.mark.parametrize("n_units", [1, 5, 12])
@pytest.mark.parametrize("n_slots", [1, 4, 7])
def test_slot_units_partition(n_units, n_slots):
    per_epoch = [slot_units(n_units, 3, 11, s, n_slots) for s in range(n_slots)]
    assert len({len(u) for u in per_epoch}) == 1  # every slot gets the same number of units
    flat = [u for units in per_epoch for u in units]
    assert set(flat) == set(range(n_units))  # every unit is read in every epoch
    if n_units % n_slots == 0:
        assert sorted(flat) == list(range(n_units))  # and exactly once when the split is even


def test_seeded_shuffle_is_a_permutation():
    out = list(seeded_shuffle(range(50), 8, np.random.default_rng(1)))
    assert sorted(out) == list(range(50)) and out != list(range(50))
    assert out == list(seeded_shuffle(range(50), 8, np.random.default_rng(1)))


def _shuffle_one_draw_per_sample(samples, buffer, rng):
    """The reference: one generator call per sample (what resume positions were defined with)."""
    buf = []
    for s in samples:
        if len(buf) < buffer:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        out, buf[i] = buf[i], s
        yield out
    for i in rng.permutation(len(buf)):
        yield buf[int(i)]


@pytest.mark.parametrize("n", [0, 5, 8, 9, 300, 520, 1000])
@pytest.mark.parametrize("buffer", [1, 8, 64])
def test_seeded_shuffle_draws_ahead_exactly(n, buffer):
    # bulk draws must give the order of one call per sample, also across the rewind at the drain
    got = list(seeded_shuffle(range(n), buffer, np.random.default_rng([3, n, buffer])))
    assert got == list(_shuffle_one_draw_per_sample(range(n), buffer, np.random.default_rng([3, n, buffer])))


def test_order_is_seeded(text_shards):
    shards, _ = text_shards
    a = _ids(_source(shards), 6)
    assert a == _ids(_source(shards), 6)
    assert a != _ids(_source(shards, seed=8), 6)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stop", [1, 4, 5])
def test_exact_resume(text_shards, num_workers, stop):
    shards, _ = text_shards
    total = 9  # crosses shard, block and epoch boundaries (24 docs ~ 40 windows per epoch)
    order = dict(global_batch=6, streams=2)  # two micro-batches of 3 per step: 1 and 5 stop mid-step
    reference = _ids(_source(shards, num_workers=num_workers, **order), total)
    first = _source(shards, num_workers=num_workers, **order)
    head = _ids(first, stop)
    state = first.state_dict()
    assert state["samples"] == 3 * stop and all(isinstance(v, (int, str, list, dict)) for v in state.values())
    assert (state["steps"], state["micro"]) == divmod(stop, 2)
    resumed = _source(shards, num_workers=num_workers, **order)
    resumed.load_state_dict(state)
    tail = _ids(resumed, total - stop)
    assert head + tail == reference  # nothing lost, nothing repeated


def test_iter_again_continues(text_shards):
    shards, _ = text_shards
    src = _source(shards, units_per_block=2)
    assert _ids(src, 2) + _ids(src, 3) == _ids(_source(shards, units_per_block=2), 5)


def test_resume_refuses_a_different_order(text_shards):
    shards, _ = text_shards
    order = dict(global_batch=12, streams=4)
    state = _source(shards, **order).state_dict()
    for kw, key in ((dict(seed=1), "seed"), (dict(streams=2), "streams"), (dict(global_batch=6), "global_batch"),
                    (dict(rows=3), "rows")):
        with pytest.raises(ValueError, match=key):
            _source(shards, **{**order, **kw}).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        _source(shards).load_state_dict({"batches": 3})
    # the workers are not part of the order
    _source(shards, num_workers=2, **order).load_state_dict(state)


def _global_order(shards, dp, steps, num_workers=0, batch_size=2, state=None, **kw):
    """Per global step: the global batch (dp groups in order) of ``dp`` sources; and their states."""
    srcs = [_source(shards, dp_rank=r, dp_size=dp, batch_size=batch_size, num_workers=num_workers, **kw)
            for r in range(dp)]
    if state is not None:
        for s in srcs:
            s.load_state_dict(state)
    per = kw["global_batch"] // (dp * batch_size)
    its = [iter(s) for s in srcs]
    out = [[sid for it in its for _ in range(per) for sid in next(it)["sample_ids"]] for _ in range(steps)]
    return out, merge_states([s.state_dict() for s in srcs])


@pytest.mark.parametrize("dp,batch_size,num_workers", [(2, 2, 0), (4, 1, 0), (2, 1, 2), (1, 4, 2), (8, 1, 0)])
def test_global_order_does_not_depend_on_dp_or_workers(text_shards, dp, batch_size, num_workers):
    shards, _ = text_shards
    order = dict(global_batch=8, streams=8)
    reference, _ = _global_order(shards, 1, 7, batch_size=8, **order)
    got, _ = _global_order(shards, dp, 7, num_workers=num_workers, batch_size=batch_size, **order)
    assert got == reference


@pytest.mark.parametrize("dp_after", [1, 2, 4])
def test_elastic_resume_onto_another_dp(text_shards, dp_after):
    shards, _ = text_shards
    order = dict(global_batch=8, streams=4)
    reference, _ = _global_order(shards, 2, 9, **order)  # crosses shard and epoch boundaries
    head, state = _global_order(shards, 2, 4, **order)
    tail, _ = _global_order(shards, dp_after, 5, batch_size=8 // (4 * dp_after) or 1, state=state, **order)
    assert head + tail == reference  # nothing lost, nothing repeated


def test_elastic_resume_needs_every_group(text_shards):
    shards, _ = text_shards
    order = dict(global_batch=8, streams=4)
    srcs = [_source(shards, dp_rank=r, dp_size=2, batch_size=4, **order) for r in range(2)]
    with pytest.raises(ValueError, match=r"no position of data streams \[2, 3\]"):
        _source(shards, dp_rank=1, dp_size=2, batch_size=4, **order).load_state_dict(srcs[0].state_dict())
    with pytest.raises(ValueError, match=r"no position of data streams \[2, 3\]"):
        _source(shards, batch_size=8, **order).load_state_dict(srcs[0].state_dict())
    with pytest.raises(ValueError, match="streams: 4 canonical streams cannot be split over dp_size=8"):
        _source(shards, dp_rank=0, dp_size=8, batch_size=1, **order)


def test_dp_groups_disjoint_sp_ranks_identical(text_shards):
    shards, _ = text_shards
    dp, sp = 2, 2
    seen = {}
    for rank in range(dp * sp):
        src = _source(shards, dp_rank=rank // sp, dp_size=dp, batch_size=2)
        seen[rank] = _ids(src, 4)
        assert all(s["epoch"] == 0 for s in src.state_dict()["positions"].values())  # still the first epoch
    assert seen[0] == seen[1] and seen[2] == seen[3]  # sp ranks of one group read the same samples
    assert set(seen[0]).isdisjoint(seen[2])  # the two groups read different shards


def test_uneven_ranks_never_run_dry(text_shards):
    shards, _ = text_shards
    # 6 shards over 4 slots: slots get 2 shards each (2 resampled), of different sample counts;
    # every rank still delivers as many batches as asked for, across epochs
    for dp_rank in range(4):
        assert len(_ids(_source(shards, dp_rank=dp_rank, dp_size=4, batch_size=4), 30)) == 120


def _truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction) // 512 * 512 + 100)  # mid-member: tarfile sees unexpected EOF


def test_corrupt_shard_fail_names_it(text_shards, tmp_path):
    shards, _ = text_shards
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    _truncate(copy / "train-000002.tar")
    with pytest.raises(CorruptShardError, match="train-000002.tar"):
        _ids(_source(copy, shuffle=False), 30)


def test_corrupt_shard_skip_warns_and_counts(text_shards, tmp_path, caplog):
    shards, _ = text_shards
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    _truncate(copy / "train-000002.tar")
    src = _source(copy, corrupt="skip", shuffle=False)
    with caplog.at_level(logging.WARNING, logger="sgfm_dist.data"):
        ids = _ids(src, 30)
    assert any("train-000002.tar" in r.getMessage() for r in caplog.records)
    assert src.stats()["corrupt_shards"] >= 1 and src.corrupt_shards[0].endswith("train-000002.tar")
    intact = _ids(_source(shards, shuffle=False), 30)
    assert set(ids) < set(intact) or set(ids) != set(intact)
    # a truncation exactly at a member boundary is caught by the manifest's sample count
    copy2 = tmp_path / "shards2"
    shutil.copytree(shards, copy2)
    with tarfile.open(copy2 / "train-000001.tar") as tar:
        second = tar.getmembers()[1]  # .json and .txt of the first sample
        end = second.offset_data + -(-second.size // 512) * 512
    with open(copy2 / "train-000001.tar", "r+b") as f:
        f.truncate(end)  # one whole sample, no end-of-archive blocks: a valid-looking tar
    with pytest.raises(CorruptShardError, match="train-000001.tar.*holds 1 samples, its manifest says 4"):
        _ids(_source(copy2, shuffle=False), 30)


def test_all_corrupt_never_hangs(text_shards, tmp_path):
    shards, _ = text_shards
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    for p in copy.glob("*.tar"):
        p.write_bytes(b"not a tar file at all" * 3)
    with pytest.raises(ValueError, match="no samples"):
        _ids(_source(copy, corrupt="skip"), 1)


def test_missing_shard_is_named(text_shards):
    shards, _ = text_shards
    with pytest.raises(FileNotFoundError, match="train-000006.tar"):
        _source(f"{shards}/train-{{000000..000009}}.tar")
    with pytest.raises(ValueError, match="no split 'dev'"):
        _source(shards, split="dev")


@pytest.mark.gpu
def test_batches_are_pinned_with_cuda(text_shards):
    shards, _ = text_shards
    batch = next(iter(_source(shards, num_workers=1)))
    assert batch["tokens"].is_pinned() and batch["pad_mask"].is_pinned() and batch["tokens"].dtype == torch.long
