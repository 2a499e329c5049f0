"""tools/simulate_ns.py: initial conditions, Navier-Stokes consistency, shards and the physics source."""
from __future__ import annotations

import io
import math

import fsspec
import numpy as np
import pytest
import torch

from sgfm_dist.data.converters.physics import NSConfig, initial_velocity, simulate_ns, simulate_trajectory
from sgfm_dist.data.fields import build_physics_source
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
