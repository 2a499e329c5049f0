"""Order, dp-group split, exact resume, workers and corrupt-shard policies of the shard stream."""
from __future__ import annotations

import logging
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from sgfm_dist.data import CorruptShardError, build_text_source
from sgfm_dist.data.stream import seeded_shuffle, slot_units


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
@pytest.mark.parametrize("stop", [1, 5])
def test_exact_resume(text_shards, num_workers, stop):
    shards, _ = text_shards
    total = 9  # crosses shard, block and epoch boundaries (24 docs ~ 40 windows per epoch)
    reference = _ids(_source(shards, num_workers=num_workers), total)
    first = _source(shards, num_workers=num_workers)
    head = _ids(first, stop)
    state = first.state_dict()
    assert state["samples"] == 3 * stop and all(isinstance(v, (int, str, list)) for v in state.values())
    resumed = _source(shards, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = _ids(resumed, total - stop)
    assert head + tail == reference  # nothing lost, nothing repeated


def test_iter_again_continues(text_shards):
    shards, _ = text_shards
    src = _source(shards, units_per_block=2)
    assert _ids(src, 2) + _ids(src, 3) == _ids(_source(shards, units_per_block=2), 5)


def test_resume_refuses_a_different_layout(text_shards):
    shards, _ = text_shards
    state = _source(shards).state_dict()
    for kw, key in ((dict(num_workers=2), "num_workers"), (dict(seed=1), "seed"), (dict(dp_size=2), "dp_size"),
                    (dict(rows=3), "rows")):
        with pytest.raises(ValueError, match=key):
            _source(shards, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        _source(shards).load_state_dict({"batches": 3})


def test_dp_groups_disjoint_sp_ranks_identical(text_shards):
    shards, _ = text_shards
    dp, sp = 2, 2
    seen = {}
    for rank in range(dp * sp):
        src = _source(shards, dp_rank=rank // sp, dp_size=dp, batch_size=2)
        seen[rank] = _ids(src, 4)
        assert all(s["epoch"] == 0 for s in src.state_dict()["slots"])  # still within the first epoch
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
