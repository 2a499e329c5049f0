"""Global-mean loss reduction over the sp ranks, for equal and unequal blocks (run on 2 ranks).

For a field ``x`` split along t and a replicated scalar weight ``w``, the loss is the mean of
``(w x)^2`` over the whole field. Each rank reports: the global mean from
:func:`global_mean` and the naive mean of the per-rank means, the single-device mean, and the
gradient DeepSpeed would apply (``sp * dloss/dw`` averaged over the ranks, the
``backward_scale`` convention) next to the single-device gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# equal blocks: 8 rows over 2 ranks = 4, 4; unequal: 5 rows = 3, 2
SHAPES = {"equal": (8, 6), "unequal": (5, 6)}


def run_job() -> dict:
    from sgfm_dist.parallel.domain import SplitDomain
    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.train.distributed import backward_scale, global_mean

    torch.set_num_threads(1)
    mesh = ProcessMesh.create(dp=1, sp=dist.get_world_size())
    out = {}
    for name, S in SHAPES.items():
        domain = SplitDomain.create(mesh, S, (2,))
        x = torch.randn(2, 3, *S, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # [B, C, T, L]
        w_ref = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        ref = (w_ref * x).square().mean()
        ref.backward()

        w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        xl = domain.shard(x)  # [B, C, T_loc, L]
        sq = (w * xl).square()
        loss = global_mean(sq.sum(), sq.numel(), domain)
        (loss * backward_scale(mesh.sp)).backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= mesh.world_size  # DeepSpeed's average over all ranks

        local_mean = sq.detach().mean()
        mean_of_means = local_mean.clone()
        dist.all_reduce(mean_of_means)
        mean_of_means /= mesh.sp
        out[name] = {"global_mean": float(loss), "mean_of_means": float(mean_of_means), "reference": float(ref),
                     "grad": float(grad), "grad_reference": float(w_ref.grad), "local_rows": xl.shape[2]}
    return out
