"""tools/simulate_ns.py: initial conditions, Navier-Stokes consistency, shards and the physics source."""
from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import pytest
import torch

from sgfm_dist.data.converters.physics import NSConfig, initial_velocity, simulate_ns, simulate_trajectory
from sgfm_dist.data.fields import PhysicsMetadataError, build_physics_source, ensure_corpus
from sgfm_dist.parallel.mpi import SerialComm
from sgfm_dist.data.urls import iter_shard_samples, resolve_shards


def _fft_grad(u: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Reference spectral gradient with torch.fft alone: [d/d dim for dim in dims]."""
    out = []
    for dim in dims:
        n = u.shape[dim]
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
        if n % 2 == 0:
            k[n // 2] = 0.0  # the Nyquist mode has no derivative sign
        shape = [1] * u.ndim
        shape[dim] = n
        out.append(torch.fft.ifft(1j * k.reshape(shape) * torch.fft.fft(u, dim=dim), dim=dim).real)
    return out


@pytest.mark.parametrize("dims, grid", [(2, 16), (3, 8)])
def test_initial_condition_is_band_limited_and_divergence_free(dims, grid):
    cfg = NSConfig(dims=dims, grid=grid, k_min=1.0, k_max=3.0, u_rms=0.7)
    u = initial_velocity(cfg, torch.Generator().manual_seed(5))  # [1, d, *S] float64
    assert u.shape == (1, dims) + (grid,) * dims
    spatial = tuple(range(2, 2 + dims))
    div = sum(_fft_grad(u[:, i:i + 1], (2 + i,))[0] for i in range(dims))
    assert div.abs().max() < 1e-10
    assert math.isclose(u.square().sum(1).mean().sqrt().item(), 0.7, rel_tol=1e-9)
    spec = torch.fft.fftn(u, dim=spatial).abs().amax(dim=(0, 1))  # [*S]
    k = torch.stack(torch.meshgrid(*[torch.fft.fftfreq(grid, 1.0 / grid, dtype=torch.float64)] * dims,
                                   indexing="ij")).square().sum(0).sqrt()
    assert spec[(k < 1.0) | (k > 3.0)].max() < 1e-10 * spec.max()
    if dims == 2:  # vorticity d_x u_y - d_y u_x is the filtered noise itself: band-limited, mean zero
        w = _fft_grad(u[:, 0:1], (3,))[0] - _fft_grad(u[:, 1:2], (2,))[0]
        assert abs(w.mean().item()) < 1e-12 and w.abs().max() > 0


def test_energy_budget_matches_viscous_dissipation():
    # unforced incompressible NS: dE/dt = -nu <|grad u|^2> (advection conserves energy);
    # reference derivatives by torch.fft, time derivative by central differences of the frames
    cfg = NSConfig(grid=32, frames=5, dt=2e-3, save_every=5, nu=0.05, k_max=4.0, method="etdrk4")
    traj, meta = simulate_trajectory(cfg, 0)
    u = torch.from_numpy(traj).double()  # [T, 2, Y, X]
    energy = 0.5 * u.square().sum(1).mean((-1, -2))  # [T]
    grads = _fft_grad(u, (2, 3))
    dissipation = cfg.nu * sum(g.square().sum(1).mean((-1, -2)) for g in grads)  # [T]
    dedt = (energy[2:] - energy[:-2]) / (2 * meta["dt"])
    torch.testing.assert_close(dedt, -dissipation[1:-1], rtol=2e-3, atol=0.0)


def test_shards_round_trip_and_source(memory_url):
    cfg = NSConfig(grid=8, k_max=2.0, frames=4, dt=0.05, save_every=2, trajectories=5, val_fraction=0.0,
                   shard_samples=2, nu=1e-2, nu_max=1e-1, seed=3)
    summary = simulate_ns(memory_url, cfg, SerialComm(), progress=False)
    assert summary["shards"] == 3 and summary["samples_written"] == 5
    samples = {s["__key__"]: s for url in resolve_shards(memory_url, "train") for s in iter_shard_samples(url)}
    assert sorted(samples) == [f"ns{i:07d}" for i in range(5)]
    expect, meta = simulate_trajectory(cfg, 2)
    got = np.load(io.BytesIO(samples["ns0000002"]["npy"]))
    np.testing.assert_array_equal(got, expect)  # deterministic per trajectory index
    assert 1e-2 <= meta["nu"] <= 1e-1 and meta["dt"] == pytest.approx(0.1)
    src = build_physics_source(memory_url, "train", batch_size=3, frames=3, frame_stride=1, shuffle_buffer=1,
                               shuffle=False)
    batch = next(iter(src))
    assert batch["field"].shape == (3, 2, 3, 8, 8) and batch["field"].dtype == torch.float32
    for b, sid in enumerate(batch["sample_ids"]):
        key, start = sid.split("@")
        traj, m = simulate_trajectory(cfg, int(key[2:]))
        ref = torch.from_numpy(traj[int(start):int(start) + 3]).transpose(0, 1)  # [C, T, H, W]
        torch.testing.assert_close(batch["field"][b], ref, rtol=0, atol=0)
        assert batch["nu"][b].item() == pytest.approx(m["nu"], rel=1e-6)
        assert batch["dt"][b].item() == pytest.approx(m["dt"], rel=1e-6)
        assert batch["forcing_strength"][b].item() == 0.0 == m["forcing_strength"]  # a freely decaying flow
    too_long = build_physics_source(memory_url, "train", batch_size=1, frames=9)  # longer than any trajectory
    with pytest.raises(ValueError, match="no samples"):
        next(iter(too_long))  # an error, not an endless search for a window
    again = simulate_ns(memory_url, cfg, SerialComm(), progress=False)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3  # finished shards are not re-simulated
    assert not [p for p in fsspec.filesystem("memory").find(memory_url.split("://")[1]) if ".tmp-" in p]


def test_stochastic_forcing_is_seeded():
    cfg = NSConfig(grid=8, k_max=2.0, frames=3, dt=0.01, save_every=2, method="euler_maruyama", noise_std=0.5,
                   forcing="kolmogorov", forcing_k=1)
    a, _ = simulate_trajectory(cfg, 0)
    b, _ = simulate_trajectory(cfg, 0)
    c, _ = simulate_trajectory(cfg, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_3d_trajectory_shape():
    traj, meta = simulate_trajectory(NSConfig(dims=3, grid=8, k_max=2.0, frames=2, dt=0.05, save_every=1), 0)
    assert traj.shape == (2, 3, 8, 8, 8) and traj.dtype == np.float32 and meta["grid"] == [8, 8, 8]


@pytest.mark.parametrize("kwargs, match", [
    (dict(dims=4), "dims"), (dict(grid=2), "grid"), (dict(k_max=40.0), "k_max"), (dict(nu=-1.0), "nu"),
    (dict(noise_std=0.1), "euler_maruyama"), (dict(nu_max=1e-5), "nu_max"), (dict(forcing="random"), "forcing"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NSConfig(**kwargs)


def test_blow_up_is_reported():
    cfg = NSConfig(grid=16, frames=3, dt=5.0, save_every=5, nu=1e-4, u_rms=50.0, method="rk4", dealias=False)
    with pytest.raises(ValueError, match="blew up"):
        simulate_trajectory(cfg, 0)


def test_forcing_strength_in_metadata():
    _, meta = simulate_trajectory(NSConfig(grid=8, k_max=2.0, frames=2, dt=0.01, save_every=1, method="euler_maruyama",
                                           noise_std=0.25, forcing="kolmogorov", forcing_amplitude=0.5), 0)
    assert meta["forcing_strength"] == 0.75 and meta["forcing_amplitude"] == 0.5


def _tar(path, members: dict[str, bytes]) -> str:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("meta, match", [
    ({"dt": 0.1}, "has no 'nu'"),
    ({"nu": 1e-3}, "has no 'dt'"),
    ({"nu": 0.0, "dt": 0.1}, "'nu' = 0.0 is invalid"),
    ({"nu": -1e-3, "dt": 0.1}, "'nu' = -0.001 is invalid"),
    ({"nu": float("nan"), "dt": 0.1}, "'nu' = nan is invalid"),
    ({"nu": 1e-3, "dt": 0.0}, "'dt' = 0.0 is invalid"),
    ({"nu": 1e-3, "dt": "0.1"}, "'dt' = '0.1' is invalid"),
    ({"nu": 1e-3, "dt": 0.1, "forcing_strength": -1.0}, "'forcing_strength' = -1.0 is invalid"),
    (None, "no .json metadata"),
])
@pytest.mark.parametrize("corrupt", ["fail", "skip"])
def test_missing_or_invalid_metadata_names_shard_and_key(tmp_path, meta, match, corrupt):
    """A physics shard without valid nu / dt is an error naming the shard, the sample and the key,
    under either corrupt policy (it used to give NaN conditioning)."""
    import json

    members = {"ns0.npy": _npy(np.zeros((4, 2, 8, 8), np.float32))}
    if meta is not None:
        members["ns0.json"] = json.dumps(meta).encode()
    url = _tar(tmp_path / "bad-000000.tar", members)
    src = build_physics_source(url, "train", batch_size=1, corrupt=corrupt, shuffle=False)
    with pytest.raises(PhysicsMetadataError, match=match) as info:
        next(iter(src))
    assert "bad-000000.tar" in str(info.value) and "'ns0'" in str(info.value)


def test_a_batch_mixing_stated_and_unstated_forcing_is_refused(tmp_path):
    import json

    members = {}
    for i, meta in enumerate([{"nu": 1e-3, "dt": 0.1, "forcing_strength": 0.5}, {"nu": 1e-3, "dt": 0.1}]):
        members[f"ns{i}.npy"] = _npy(np.zeros((2, 2, 8, 8), np.float32))
        members[f"ns{i}.json"] = json.dumps(meta).encode()
    src = build_physics_source(_tar(tmp_path / "mix-000000.tar", members), "train", batch_size=2, shuffle=False,
                               shuffle_buffer=1)
    with pytest.raises(ValueError, match="'forcing_strength' is in the metadata of some samples"):
        next(iter(src))


def test_3d_source_batches(memory_url):
    cfg = NSConfig(dims=3, grid=8, k_max=2.0, frames=4, dt=0.05, save_every=1, trajectories=2, val_fraction=0.0,
                   nu=1e-2, nu_max=5e-2)
    simulate_ns(memory_url, cfg, SerialComm(), progress=False)
    batch = next(iter(build_physics_source(memory_url, "train", batch_size=2, shuffle=False)))
    assert batch["field"].shape == (2, 3, 4, 8, 8, 8)  # [B, (u_z, u_y, u_x), T, Z, Y, X]
    assert batch["nu"].shape == batch["dt"].shape == (2,) and len(set(batch["nu"].tolist())) == 2


def test_ensure_corpus_makes_a_missing_corpus_once(tmp_path, capfd):
    target = tmp_path / "made"
    cmd = ("{python} -c \"import os, sys; os.makedirs(sys.argv[1]); "
           "open(os.path.join(sys.argv[1], 'manifest.json'), 'w').write('{}')\" {source}")
    assert ensure_corpus(str(target), cmd) is True
    assert (target / "manifest.json").exists() and not (tmp_path / "made.lock").exists()
    assert "making it (data.generate)" in capfd.readouterr().err
    assert ensure_corpus(str(target), cmd) is False  # made: left alone
    assert ensure_corpus(str(tmp_path / "other"), "") is False  # no command: nothing to do
    assert ensure_corpus("memory://x/y", cmd) is False and ensure_corpus(str(tmp_path / "a-{0..3}.tar"), cmd) is False
    with pytest.raises(RuntimeError, match="exited 3"):
        ensure_corpus(str(tmp_path / "broken"), "{python} -c 'import sys; sys.exit(3)'")
    with pytest.raises(RuntimeError, match="wrote no"):
        ensure_corpus(str(tmp_path / "empty"), "true {source}")
