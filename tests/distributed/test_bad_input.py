"""Bad dp x sp setups fail before any step, every rank with the same ValueError naming the numbers."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.batch import BatchAccounting, shard_batch
from sgfm_dist.parallel.parallelize import ParallelizeConfig, apply_zero, check_parallel_setup
from sgfm_dist.ops.domain import LOCAL

OK = dict(world_size=4, dp=-1, sp=2, field_shape=(32, 16), split_axes=(2,), wavelet="db2", levels=2, zero_stage=1)


@pytest.mark.parametrize("world,sp", [(4, 1), (4, 2), (4, 4), (2, 2)])
def test_good_setups_resolve(world, sp):
    assert check_parallel_setup(**{**OK, "world_size": world, "sp": sp}) == (world // sp, sp)


@pytest.mark.parametrize("change,match", [
    (dict(sp=3), "sp=3 does not divide the world size 4"),
    (dict(dp=3, sp=2), r"dp x sp = 3 x 2 = 6 ranks, but the world size is 4"),
    (dict(field_shape=(24, 16), sp=4), r"local extents \(6, 6, 6, 6\) \(global 24 over 4 ranks\), not all divisible "
                                       r"by 2\*\*levels = 4"),
    (dict(field_shape=(36, 16), sp=2), r"local extents \(18, 18\)"),
    (dict(levels=3, sp=4), "levels: 3 is too many|not all divisible by 2\\*\\*levels = 8"),
    (dict(zero_stage=4), "zero_stage: must be 0, 1, 2 or 3, got 4"),
    (dict(split_axes=(2, 3)), r"split_axes: \(2, 3\) names 2 axes but the sp grid \(2,\)"),
])
def test_bad_setup_is_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        check_parallel_setup(**{**OK, **change})


def test_parallelize_config_checks():
    with pytest.raises(ValueError, match="zero_stage"):
        ParallelizeConfig(zero_stage=5)
    with pytest.raises(ValueError, match="levels"):
        ParallelizeConfig(levels=0)


@pytest.mark.parametrize("change,match", [
    ({"mesh_param": [2, 2]}, "'mesh_param' must not be set"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3"),
])
def test_deepspeed_config_rejects(change, match):
    acc = BatchAccounting(2, 1, 2, 2)
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match=match):
        apply_zero({**base, **change}, acc, 1)


def test_deepspeed_config_counts_every_rank():
    acc = BatchAccounting(2, 3, 2, 2)
    cfg = apply_zero({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, acc, 2)
    assert cfg["train_batch_size"] == 24 and acc.global_batch == 12 and cfg["zero_optimization"]["stage"] == 2


def test_shard_batch_checks_and_passes_local():
    import torch

    b = {"tokens": torch.zeros(2, 4, 4, dtype=torch.long), "meta": ["a", "b"]}
    assert shard_batch(b, LOCAL) is b
    with pytest.raises(ValueError, match="batch: expected a dict"):
        shard_batch([1], LOCAL)


def _model_cfg(modality, **kw):
    from sgfm_dist.model.config import ModelConfig

    return ModelConfig(modality=modality, channels=2 if modality == "physics" else 4, **kw)


@pytest.mark.parametrize("modality,parallel,axes", [
    ("text", dict(sp=2), (2,)),                                    # t: a periodic flow axis
    ("physics", dict(sp=2), (3,)),                                 # y: d_t reads t whole
    ("physics", dict(sp=4, sp_grid=(2, 2)), (3, 4)),               # pencil over (y, x)
    ("physics", dict(sp=2, split_axes=(2,)), (4,)),                # x, as asked
    ("video", dict(sp=4, sp_grid=(2, 2), split_axes=(0, 1)), (2, 3)),
])
def test_split_axes_resolve(modality, parallel, axes):
    from sgfm_dist.train.config import ParallelConfig
    from sgfm_dist.train.setup import resolve_split_axes

    kw = {"time_derivative": "periodic2"} if parallel.get("split_axes") == (0, 1) else {}
    assert resolve_split_axes(_model_cfg(modality, **kw), ParallelConfig(**parallel)) == axes


@pytest.mark.parametrize("modality,parallel,match", [
    ("physics", dict(sp=2, split_axes=(0,)), r"splits t, but model.time_derivative='one_sided2'"),
    ("text", dict(sp=4, sp_grid=(2, 2)), r"a pencil \[2, 2\] needs a 3-D field"),
    ("text", dict(sp=2, split_axes=(2,)), r"field axis 2 does not exist; a text field has 2 axes \('t', 'x'\)"),
])
def test_split_axes_rejected(modality, parallel, match):
    from sgfm_dist.train.config import ParallelConfig
    from sgfm_dist.train.setup import resolve_split_axes

    with pytest.raises(ValueError, match=match):
        resolve_split_axes(_model_cfg(modality), ParallelConfig(**parallel))


@pytest.mark.parametrize("parallel,match", [
    (dict(sp=4, sp_grid=(2, 3)), r"parallel.sp_grid: \[2, 3\] has 6 ranks but parallel.sp=4"),
    (dict(sp=8, sp_grid=(2, 2, 2)), "expected 1 or 2 positive ints"),
    (dict(sp=2, split_axes=(3,)), r"expected distinct field axes in 0..2"),
    (dict(sp=4, sp_grid=(2, 2), split_axes=(1,)), r"names 1 axes but the sp grid \[2, 2\] has 2 dim"),
])
def test_parallel_config_rejects(parallel, match):
    from sgfm_dist.train.config import ParallelConfig

    with pytest.raises(ValueError, match=match):
        ParallelConfig(**parallel)


def test_shard_batch_rejects_other_extents():
    """A batch whose field is not the one the model was split for fails instead of being cut
    into blocks of the wrong field (the layout is read from the domain, no process group)."""
    import torch

    from sgfm_dist.parallel.mesh import FieldLayout

    class _Split:  # what shard_batch reads of a SplitDomain before sharding
        is_split = True
        layout = FieldLayout((8, 16, 16), (3,), (2,), (0,))

    with pytest.raises(ValueError, match=r"batch\['field'\]: field extents \(8, 32, 16\).*differ from the extents "
                                         r"\(8, 16, 16\)"):
        shard_batch({"field": torch.zeros(1, 2, 8, 32, 16)}, _Split())
