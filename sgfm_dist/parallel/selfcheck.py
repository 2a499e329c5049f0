"""Check a real multi-process launch: split operators against the single-device ones.

    torchrun --nproc_per_node 4 -m sgfm_dist.parallel.selfcheck
    mpiexec -n 4 python -m sgfm_dist.parallel.selfcheck
    deepspeed --num_gpus 4 --module sgfm_dist.parallel.selfcheck     (GPU nodes)

Starts the process group with :func:`~sgfm_dist.parallel.mesh.init_distributed` (env:// or
MPI discovery), builds a ``dp x sp`` mesh (``--sp``, default: the whole world; ``--pencil`` for
a 2-D sp grid), splits a seeded float64 field and compares the halo exchange, a Leray
projection and a finite-difference Laplacian, gathered, and the input gradient of a
random loss with the single-device operators. Rank 0 prints one line
``selfcheck ok world=.. dp=.. sp=.. max_err=..``; any mismatch or error exits non-zero on
every rank.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist


def _factor2(n: int) -> tuple[int, int]:
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return (n // a, a)


def run_checks(sp: int | None = None, pencil: bool = False, tol: float = 1e-10) -> float:
    """Run the checks on the initialised default group; return the largest error (all ranks)."""
    from ..ops import finite_diff, spectral
    from ..ops.domain import LOCAL, Domain
    from .domain import SplitDomain
    from .mesh import ProcessMesh

    world = dist.get_world_size()
    sp = world if sp is None else sp
    grid = _factor2(sp) if pencil else (sp,)
    mesh = ProcessMesh.create(sp=sp, sp_grid=grid)
    S = (12, 8, 10) if pencil else (12, 10)
    split = (2, 3) if pencil else (2,)
    dom = SplitDomain.create(mesh, S, split)
    axes = tuple(range(2, 2 + len(S)))
    g = torch.Generator().manual_seed(1234 + mesh.dp_rank)  # one sample per dp group
    u = torch.randn(2, 2 * len(S), *S, generator=g, dtype=torch.float64)  # [B, G*k, *S], G = 2 groups
    w = torch.randn(u.shape, generator=g, dtype=torch.float64)
    flow = axes  # every field axis is a flow axis (the text-field convention)

    def ops(x, domain: Domain):
        pad = domain.pad(x, [(1, 2)] * len(S))
        proj = spectral.leray_project(x, flow, domain=domain)
        lap = finite_diff.fd_laplacian(x, axes, accuracy=4, domain=domain)
        return pad, proj, lap

    ref = ops(u.clone().requires_grad_(True), LOCAL)
    u_l = dom.shard(u).requires_grad_(True)
    out = ops(u_l, dom)
    errs = []
    for name, r, o in zip(("halo", "leray", "fd_laplacian"), ref, out):
        if name == "halo":  # the padded block is a window of the padded global field
            sl = tuple(slice(off, off + n + 3) for off, n in zip(dom.layout.offsets, dom.layout.local_extents))
            errs.append((o - r[(slice(None), slice(None)) + sl]).abs().max().item())
        else:
            errs.append((dom.gather(o) - r).abs().max().item())
    x_ref = u.clone().requires_grad_(True)
    loss_ref = sum((r * w).sum() for r in ops(x_ref, LOCAL)[1:])
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref)
    loss = sum((o * dom.shard(w)).sum() for o in out[1:])  # each rank's own part of the same loss
    (grad,) = torch.autograd.grad(loss, u_l)
    errs.append((dom.gather(grad) - grad_ref).abs().max().item())
    err = torch.tensor(max(errs), dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return err.item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sp", type=int, default=None, help="ranks per sample (default: the world)")
    parser.add_argument("--pencil", action="store_true", help="split a 3-D field on two axes")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="collective timeout")
    parser.add_argument("--tol", type=float, default=1e-10)
    args = parser.parse_args(argv)
    from .mesh import init_distributed

    torch.set_num_threads(1)
    rank, world = init_distributed(timeout_s=args.timeout_s)
    try:
        err = run_checks(args.sp, args.pencil, args.tol)
        sp = args.sp or world
        if rank == 0:
            print(f"selfcheck {'ok' if err <= args.tol else 'FAILED'} world={world} dp={world // sp} sp={sp} "
                  f"backend={dist.get_backend()} max_err={err:.3e}", flush=True)
        return 0 if err <= args.tol else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
