"""Domain parallelism: the only package code that communicates.

    from sgfm_dist.parallel import init_distributed, ProcessMesh, SplitDomain
    init_distributed()                                   # torchrun / deepspeed / mpiexec / lone process
    mesh = ProcessMesh.create(sp=4)                      # dp = world // 4 groups of 4 ranks
    domain = SplitDomain.create(mesh, (T, Y, X), (2,))   # slab along t; (2, 3) with sp_grid=(2, 2): pencil
    u = domain.shard(u_global)                           # this rank's block
    v = spectral.leray_project(u, (3, 4), domain=domain) # any ops/ or model/ code, unchanged

Modules: ``mesh`` (process groups, field layouts), ``halo`` (periodic ghost cells),
``fft`` (distributed FFT by transposes), ``collectives`` (replicated sums, gather/shard),
``domain`` (``SplitDomain``, the split twin of ``ops.domain.LocalDomain``), ``wavelets``
(DWT split checks), ``comm_stats`` (bytes sent), ``comm_model`` (predicted communication
times), ``testing`` (multi-rank test harness), ``selfcheck`` (launcher smoke test).
"""
from .comm_stats import COMM_STATS, CommStats
from .domain import SplitDomain
from .halo import HaloConfig, halo_exchange, halo_pad
from .mesh import FieldLayout, MeshConfig, ProcessMesh, block_offset, block_sizes, init_distributed
from .wavelets import check_dwt_split, max_split_levels, split_dwt, split_idwt

__all__ = [
    "COMM_STATS",
    "CommStats",
    "FieldLayout",
    "HaloConfig",
    "MeshConfig",
    "ProcessMesh",
    "SplitDomain",
    "block_offset",
    "block_sizes",
    "check_dwt_split",
    "halo_exchange",
    "halo_pad",
    "init_distributed",
    "max_split_levels",
    "split_dwt",
    "split_idwt",
]
