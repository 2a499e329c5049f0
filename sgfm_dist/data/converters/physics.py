"""The physics corpus: pseudo-spectral incompressible Navier-Stokes trajectories (``tools/simulate_ns.py``).

Each trajectory starts from a random band-limited, divergence-free velocity field and is
integrated with ``sgfm_dist.ops.dynamics`` (ETDRK4 by default, or RK4, or Euler-Maruyama
when stochastic forcing is on) on the periodic box [0, 2 pi)^d. Stored per sample:
``<key>.npy`` float32 ``[T, d, *S]`` (velocity components along the spatial axes in axis
order: (u_y, u_x) in 2-D, (u_z, u_y, u_x) in 3-D) and ``<key>.json`` with nu, seed, dt
(time between frames), the solver step, forcing and grid. ``nu``, ``dt`` and ``forcing_strength``
are the physical parameters the model reads per sample (``sgfm_dist.data.fields``):
``forcing_strength`` is the scale of what drives the flow besides its own dynamics, the
Kolmogorov amplitude plus the stochastic forcing's strength, 0 for a freely decaying flow
(so the model's learned forcing is switched off where the data has none).

Initial condition. 2-D: vorticity w is white noise filtered to the shell
``k_min <= |k| <= k_max``; the stream function solves ``-Lap psi = w`` and
``u = (u_y, u_x) = (-d_x psi, d_y psi)``, so ``d_x u_y - d_y u_x = w`` exactly. 3-D: a velocity
field filtered to the same shell and Leray-projected (its vorticity is then band-limited
too). The speed is scaled to ``u_rms``.

Determinism. Trajectory i uses its own seed (a hash of the base seed and i), is simulated
alone in float64 and is written by whichever rank owns its shard, so the corpus is the same
for any number of MPI ranks, and a re-run skips the (expensive) simulation of finished shards.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from sgfm_dist.ops import spectral
from sgfm_dist.ops.domain import LOCAL
from sgfm_dist.ops.dynamics import FlowSpec, integrate

from ..corpus import split_of
from ..shards import TAR_OVERHEAD, PlanItem, json_bytes, npy_bytes
from .common import run_conversion


@dataclass
class NSConfig:
    """One simulated Navier-Stokes corpus (every field enters the plan fingerprint)."""

    dims: Literal[2, 3] = 2
    """Spatial dimensions d (3-D is meant for small grids)."""
    grid: int = 64
    """Cells per spatial axis (the box is [0, 2 pi)^d)."""
    frames: int = 32
    """T: stored frames per trajectory, the initial condition included."""
    dt: float = 1e-2
    """Solver time step."""
    save_every: int = 10
    """Solver steps between stored frames (time between frames = dt * save_every)."""
    nu: float = 1e-3
    """Kinematic viscosity (the lower end of the range when nu_max is set)."""
    nu_max: float | None = None
    """When set, each trajectory draws nu log-uniformly from [nu, nu_max] (stored in its metadata)."""
    k_min: float = 1.0
    """Lowest wavenumber magnitude of the initial condition."""
    k_max: float = 4.0
    """Highest wavenumber magnitude of the initial condition."""
    u_rms: float = 1.0
    """Root-mean-square speed of the initial condition."""
    forcing: Literal["none", "kolmogorov"] = "none"
    """Deterministic forcing: none, or Kolmogorov f_x = A sin(k_f y)."""
    forcing_amplitude: float = 0.1
    """A of the Kolmogorov forcing."""
    forcing_k: int = 4
    """k_f of the Kolmogorov forcing."""
    noise_std: float = 0.0
    """Strength of the stochastic (projected white-noise) forcing; > 0 needs method='euler_maruyama'."""
    method: Literal["etdrk4", "rk4", "euler_maruyama"] = "etdrk4"
    """Time integrator of sgfm_dist.ops.dynamics."""
    dealias: bool = True
    """2/3-rule dealiasing of the advection term."""
    seed: int = 0
    """Base seed; trajectory i uses a hash of (seed, i)."""
    trajectories: int = 16
    """Number of trajectories."""
    val_fraction: float = 0.1
    """Share of trajectories in the 'val' split (hash of seed and index)."""
    shard_samples: int | None = 64
    """Trajectories per shard (None: no limit)."""
    shard_mb: float | None = 256.0
    """About this many MB per shard (None: no limit)."""

    def __post_init__(self):
        if self.dims not in (2, 3):
            raise ValueError(f"dims: must be 2 or 3, got {self.dims!r}")
        for name in ("grid", "frames", "save_every", "trajectories", "forcing_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.grid < 4:
            raise ValueError(f"grid: need at least 4 cells per axis, got {self.grid}")
        for name in ("dt", "nu", "u_rms"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be finite and > 0, got {v}")
        if self.nu_max is not None and not self.nu_max >= self.nu:
            raise ValueError(f"nu_max: must be >= nu={self.nu}, got {self.nu_max}")
        if not 0 <= self.k_min <= self.k_max:
            raise ValueError(f"k_min, k_max: need 0 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.k_max >= self.grid / 2:
            raise ValueError(f"k_max: {self.k_max} must stay below the Nyquist wavenumber {self.grid // 2}")
        if self.forcing not in ("none", "kolmogorov"):
            raise ValueError(f"forcing: must be 'none' or 'kolmogorov', got {self.forcing!r}")
        if self.method not in ("etdrk4", "rk4", "euler_maruyama"):
            raise ValueError(f"method: must be 'etdrk4', 'rk4' or 'euler_maruyama', got {self.method!r}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std: must be >= 0, got {self.noise_std}")
        if self.noise_std > 0 and self.method != "euler_maruyama":
            raise ValueError(f"noise_std: stochastic forcing ({self.noise_std}) needs method='euler_maruyama', "
                             f"got {self.method!r}")
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction: must lie in [0, 1], got {self.val_fraction}")

    @property
    def frame_dt(self) -> float:
        return self.dt * self.save_every


def trajectory_seed(base: int, index: int) -> int:
    """Seed of trajectory ``index`` (63-bit, from a hash so neighbouring indices are unrelated)."""
    h = hashlib.blake2b(f"{base}:{index}".encode(), digest_size=8, person=b"sgfm-ns").digest()
    return int.from_bytes(h, "little") >> 1


def _band_limited(noise: torch.Tensor, axes: tuple[int, ...], k_min: float, k_max: float) -> torch.Tensor:
    """``noise`` with every Fourier mode outside ``k_min <= |k| <= k_max`` removed."""
    ks = LOCAL.wavenumbers(noise, axes)
    k_mag = torch.sqrt(sum(k * k for k in ks))
    mask = ((k_mag >= k_min) & (k_mag <= k_max)).to(noise.dtype)
    return LOCAL.irfft(LOCAL.rfft(noise, axes) * mask, axes, noise.shape)


def initial_velocity(cfg: NSConfig, generator: torch.Generator) -> torch.Tensor:
    """Random band-limited divergence-free velocity ``[1, d, *S]`` float64 with RMS speed ``u_rms``."""
    d, n = cfg.dims, cfg.grid
    axes = tuple(range(2, 2 + d))
    if d == 2:
        w = _band_limited(torch.randn((1, 1, n, n), generator=generator, dtype=torch.float64), axes,
                          cfg.k_min, cfg.k_max)  # [1, 1, Y, X] vorticity
        ks = LOCAL.wavenumbers(w, axes)
        k2 = sum(k * k for k in ks)
        psi_hat = LOCAL.rfft(w, axes) / torch.where(k2 == 0, torch.ones_like(k2), k2)  # -Lap psi = w
        psi_hat = psi_hat * (k2 != 0)
        psi = LOCAL.irfft(psi_hat, axes, w.shape)  # [1, 1, Y, X]
        u = torch.cat([-spectral.derivative(psi, 3), spectral.derivative(psi, 2)], dim=1)  # [1, 2, Y, X] (u_y, u_x)
    else:
        noise = torch.randn((1, 3, n, n, n), generator=generator, dtype=torch.float64)
        u = spectral.leray_project(_band_limited(noise, axes, cfg.k_min, cfg.k_max), axes)  # [1, 3, Z, Y, X]
    rms = u.square().sum(1).mean().sqrt()
    if not rms > 0:
        raise ValueError(f"k_min, k_max: the band [{cfg.k_min}, {cfg.k_max}] holds no Fourier mode on a "
                         f"{n}^{d} grid")
    return u * (cfg.u_rms / rms)


def kolmogorov_forcing(cfg: NSConfig) -> torch.Tensor:
    """f_x = A sin(k_f y) as a ``[1, d, *S]`` float64 field (zero in the other components)."""
    d, n = cfg.dims, cfg.grid
    y = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    f = torch.zeros((1, d) + (n,) * d, dtype=torch.float64)
    profile = cfg.forcing_amplitude * torch.sin(cfg.forcing_k * y)  # [Y]
    shape = [1] * d
    shape[d - 2] = n  # the y axis is the second to last spatial axis
    f[:, d - 1] = profile.reshape(shape)  # x component (last)
    return f


def simulate_trajectory(cfg: NSConfig, index: int) -> tuple[np.ndarray, dict]:
    """Trajectory ``index``: float32 ``[T, d, *S]`` and its metadata."""
    seed = trajectory_seed(cfg.seed, index)
    gen = torch.Generator().manual_seed(seed)
    nu = cfg.nu
    if cfg.nu_max is not None and cfg.nu_max > cfg.nu:
        r = torch.rand((), generator=gen, dtype=torch.float64).item()
        nu = math.exp(math.log(cfg.nu) + r * (math.log(cfg.nu_max) - math.log(cfg.nu)))
    spec = FlowSpec(flow_axes=tuple(range(2, 2 + cfg.dims)), nu=nu, dealias=cfg.dealias)
    forcing = kolmogorov_forcing(cfg) if cfg.forcing == "kolmogorov" else None
    u = initial_velocity(cfg, gen)  # [1, d, *S]
    frames = [u[0].to(torch.float32)]
    with torch.no_grad():
        for _ in range(cfg.frames - 1):
            u = integrate(u, cfg.save_every, cfg.dt, spec, method=cfg.method, forcing=forcing,
                          noise_std=cfg.noise_std, generator=gen)
            if not torch.isfinite(u).all():
                raise ValueError(f"trajectory {index} (seed {seed}) blew up; lower dt={cfg.dt} or u_rms, "
                                 f"or raise nu={nu}")
            frames.append(u[0].to(torch.float32))
    traj = torch.stack(frames).numpy()  # [T, d, *S]
    amplitude = cfg.forcing_amplitude if cfg.forcing != "none" else 0.0
    meta = dict(index=index, seed=seed, nu=nu, dt=cfg.frame_dt, solver_dt=cfg.dt, save_every=cfg.save_every,
                frames=cfg.frames, grid=[cfg.grid] * cfg.dims, box=[2 * math.pi] * cfg.dims, method=cfg.method,
                forcing=cfg.forcing, forcing_amplitude=amplitude, forcing_strength=amplitude + cfg.noise_std,
                forcing_k=cfg.forcing_k, noise_std=cfg.noise_std, k_band=[cfg.k_min, cfg.k_max], u_rms=cfg.u_rms,
                layout="[T, d, *S], components along the spatial axes in axis order")
    return traj, meta


def simulate_ns(out: str, cfg: NSConfig, comm, overwrite: bool = False, progress: bool = True) -> dict:
    """Simulate ``cfg.trajectories`` trajectories into shards under ``out``; returns the run summary."""
    names = [f"trajectory-{i:07d}" for i in range(cfg.trajectories)]
    nbytes = cfg.frames * cfg.dims * cfg.grid ** cfg.dims * 4 + 3 * TAR_OVERHEAD

    def split(i: int) -> str:
        return split_of(f"{cfg.seed}:{i}".encode(), cfg.val_fraction)

    def scan(i: int, stats: dict) -> list[PlanItem]:
        stats["trajectories"] = stats.get("trajectories", 0) + 1
        return [PlanItem(i, 0, split(i), nbytes)]

    def produce(i: int, wanted: set):
        traj, meta = simulate_trajectory(cfg, i)
        meta["split"] = split(i)
        yield 0, {"__key__": f"ns{i:07d}", "npy": npy_bytes(traj), "json": json_bytes(meta)}

    max_bytes = None if cfg.shard_mb is None else int(cfg.shard_mb * 1e6)
    return run_conversion("physics", comm, names, scan, produce, out, asdict(cfg), cfg.shard_samples, max_bytes,
                          overwrite=overwrite, progress=progress,
                          meta=dict(dims=cfg.dims, grid=cfg.grid, frames=cfg.frames, dt=cfg.frame_dt))
