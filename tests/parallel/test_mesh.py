"""Mesh and layout bookkeeping (in-process) and the multi-rank harness: a failing rank's exception
reaches the caller with its rank, and a rank stuck in a collective times out instead of hanging."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from sgfm_dist.parallel.mesh import FieldLayout, MeshConfig, block_offset, block_sizes, detect_launcher
from sgfm_dist.parallel.testing import run_distributed


@pytest.mark.parametrize("p", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [7, 8, 13, 64])
def test_block_sizes_match_tensor_split(n, p):
    sizes = block_sizes(n, p)
    assert sizes == tuple(len(c) for c in torch.arange(n).tensor_split(p))
    assert [block_offset(n, p, i) for i in range(p)] == [sum(sizes[:i]) for i in range(p)]


@pytest.mark.parametrize("coords", [(0, 0), (1, 1), (0, 1)])
@pytest.mark.parametrize("S,axes,ranks", [((9, 6, 8), (2, 3), (2, 2)), ((8, 8, 5), (4, 3), (2, 2))])
def test_layout_blocks_tile_the_field(S, axes, ranks, coords):
    layout = FieldLayout(S, axes, ranks, coords)
    x = torch.arange(torch.Size(S).numel()).reshape(1, 1, *S)
    blocks = [x[FieldLayout(S, axes, ranks, (i, j)).local_slices()] for i in range(ranks[0]) for j in range(ranks[1])]
    assert sum(b.numel() for b in blocks) == x.numel()
    assert torch.cat([b.flatten() for b in blocks]).sort().values.equal(x.flatten())
    assert tuple(layout.local_extents) == tuple(x[layout.local_slices()].shape[2:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_extents=(8, 8), split_axes=(2, 3), ranks=(2, 2), coords=(0, 0)), "a pencil .* needs a 3-D field"),
    (dict(global_extents=(3, 8), split_axes=(2,), ranks=(4,), coords=(0,)),
     "axis 2 has extent 3, too small to split over 4 ranks"),
    (dict(global_extents=(8, 8), split_axes=(4,), ranks=(2,), coords=(0,)), "split_axes: .* field dims in 2..3"),
    (dict(global_extents=(8, 8), split_axes=(2,), ranks=(2,), coords=(2,)), "coords: .* must lie in"),
    (dict(global_extents=(8, 8, 8, 8, 8), split_axes=(), ranks=(), coords=()), "1 to 4 positive extents"),
    (dict(global_extents=(8, 8, 8), split_axes=(2, 3, 4), ranks=(1, 1, 1), coords=(0, 0, 0)), "at most 2"),
])
def test_layout_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FieldLayout(**kwargs)


@pytest.mark.parametrize("cfg,world,expected", [
    (MeshConfig(), 4, (4, 1, (1,))),
    (MeshConfig(sp=4), 8, (2, 4, (4,))),
    (MeshConfig(dp=2, sp=4, sp_grid=(2, 2)), 8, (2, 4, (2, 2))),
])
def test_mesh_config_resolve(cfg, world, expected):
    assert cfg.resolve(world) == expected


@pytest.mark.parametrize("kwargs,world,match", [
    (dict(dp=3, sp=2), 4, r"mesh: sp=2 does not divide|dp x sp = 3 x 2 = 6 ranks, but the world size is 4"),
    (dict(dp=1, sp=2), 4, r"dp x sp = 1 x 2 = 2 ranks, but the world size is 4"),
    (dict(sp=3), 4, r"sp=3 does not divide the world size 4"),
])
def test_mesh_config_mismatch(kwargs, world, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**kwargs).resolve(world)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sp=4, sp_grid=(2, 3)), r"sp_grid: \(2, 3\) has 6 ranks but sp=4"),
    (dict(sp=0), "sp: expected a positive int"),
    (dict(dp=0), "dp: expected a positive int or -1"),
])
def test_mesh_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**kwargs)


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "0"}, "env"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "mpi"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "mpi"),
    ({}, "none"),
])
def test_detect_launcher(env, expected):
    assert detect_launcher(env) == expected


# ---- the harness -------------------------------------------------------------------------------
def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("bad shard on purpose")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for a peer that has died
    return t.item()


def _stall_in_collective(timeout_s: float):
    """Rank 1 never joins the all-reduce; rank 0 must get an error after ~timeout_s."""
    from sgfm_dist.parallel.mesh import ProcessMesh

    mesh = ProcessMesh.create(sp=2, timeout_s=timeout_s)
    if dist.get_rank() == 1:
        time.sleep(timeout_s + 1.5)
        return None
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=mesh.sp_group)
    except Exception as e:  # gloo raises on the timeout
        return (time.monotonic() - t0, type(e).__name__, str(e)[:200])
    return (time.monotonic() - t0, None, "")


@pytest.mark.distributed
def test_failing_rank_reraises_with_its_rank():
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"\[rank 1\] bad shard on purpose"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=120, pg_timeout_s=60)
    assert time.monotonic() - t0 < 100  # not the collective timeout: the harness stops the job


@pytest.mark.distributed
def test_rank_stuck_in_collective_times_out():
    res = run_distributed(_stall_in_collective, 2, 2.0, timeout_s=120, pg_timeout_s=60)
    elapsed, err_type, msg = res[0]
    assert err_type is not None, "the all-reduce returned although a rank never joined"
    assert 1.5 <= elapsed < 30, f"timed out after {elapsed:.1f} s ({err_type}: {msg})"
