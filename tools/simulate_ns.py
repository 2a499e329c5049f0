#!/usr/bin/env python
"""Simulate the physics corpus: 2-D (or small 3-D) incompressible Navier-Stokes trajectories.

Pseudo-spectral solver built from ``sgfm_dist.ops`` (ETDRK4 / RK4, or Euler-Maruyama with
stochastic forcing), random band-limited initial vorticity, optional Kolmogorov forcing.
Writes ``<split>-NNNNNN.tar`` shards (``<key>.npy`` float32 [T, d, *S], ``<key>.json`` with
nu, seed, dt, forcing) and ``manifest.json`` under OUT (local path or fsspec URL).

    python tools/simulate_ns.py --out data/ns2d --trajectories 256 --grid 64 --frames 32
    mpiexec -n 16 python tools/simulate_ns.py --out s3://bucket/ns2d --trajectories 10000 --nu 1e-4 --nu-max 1e-2
    python tools/simulate_ns.py --out data/ns3d --dims 3 --grid 16 --frames 16 --trajectories 32

The corpus is the same for any number of MPI ranks; a re-run skips finished shards.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgfm_dist.data.converters.common import add_output_arguments, run_tool  # noqa: E402
from sgfm_dist.data.converters.physics import NSConfig, simulate_ns  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    d = NSConfig()
    p.add_argument("--dims", type=int, choices=[2, 3], default=d.dims)
    p.add_argument("--grid", type=int, default=d.grid, help="cells per axis")
    p.add_argument("--frames", type=int, default=d.frames, help="stored frames per trajectory (T)")
    p.add_argument("--dt", type=float, default=d.dt, help="solver time step")
    p.add_argument("--save-every", type=int, default=d.save_every, help="solver steps between frames")
    p.add_argument("--nu", type=float, default=d.nu, help="viscosity (lower end with --nu-max)")
    p.add_argument("--nu-max", type=float, default=None, help="draw nu log-uniformly from [nu, nu-max]")
    p.add_argument("--k-min", type=float, default=d.k_min, help="initial condition band, low end")
    p.add_argument("--k-max", type=float, default=d.k_max, help="initial condition band, high end")
    p.add_argument("--u-rms", type=float, default=d.u_rms, help="initial RMS speed")
    p.add_argument("--forcing", choices=["none", "kolmogorov"], default=d.forcing)
    p.add_argument("--forcing-amplitude", type=float, default=d.forcing_amplitude)
    p.add_argument("--forcing-k", type=int, default=d.forcing_k)
    p.add_argument("--noise-std", type=float, default=d.noise_std,
                   help="stochastic forcing strength (needs --method euler_maruyama)")
    p.add_argument("--method", choices=["etdrk4", "rk4", "euler_maruyama"], default=d.method)
    p.add_argument("--no-dealias", action="store_true", help="no 2/3-rule dealiasing")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--trajectories", type=int, default=d.trajectories)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    add_output_arguments(p, "trajectories", d.shard_samples, d.shard_mb)
    args = p.parse_args(argv)
    cfg = NSConfig(dims=args.dims, grid=args.grid, frames=args.frames, dt=args.dt, save_every=args.save_every,
                   nu=args.nu, nu_max=args.nu_max, k_min=args.k_min, k_max=args.k_max, u_rms=args.u_rms,
                   forcing=args.forcing, forcing_amplitude=args.forcing_amplitude, forcing_k=args.forcing_k,
                   noise_std=args.noise_std, method=args.method, dealias=not args.no_dealias, seed=args.seed,
                   trajectories=args.trajectories, val_fraction=args.val_fraction,
                   shard_samples=args.shard_samples or None, shard_mb=args.shard_mb or None)
    import torch

    torch.set_num_threads(max(1, args.threads))
    return run_tool(lambda comm: simulate_ns(args.out, cfg, comm, overwrite=args.overwrite,
                                             progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
