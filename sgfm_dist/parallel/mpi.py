"""MPI for the corpus conversion tools: COMM_WORLD under ``mpiexec``, a one-process stand-in
otherwise, and a guard that aborts every rank when one fails.

The conversion tools (``tools/convert_*.py``, ``tools/simulate_ns.py``) run as plain MPI
programs (no torch process group): each rank plans and writes its share of the shards, and
rank 0 merges the manifests. This module is the only place that imports mpi4py.
"""
from __future__ import annotations

import os
from typing import Callable

class SerialComm:
    """The one-process stand-in for an MPI communicator (same method names as mpi4py's)."""

    rank = 0
    size = 1

    def barrier(self) -> None:
        pass

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root: int = 0):
        return obj

    def abort(self, code: int = 1) -> None:
        pass


class MPIComm:
    """mpi4py's COMM_WORLD behind the SerialComm interface."""

    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


def run_guarded(comm, fn: Callable[[], int]) -> int:
    """Run ``fn``; on an exception in any rank of a multi-rank job, print it and abort the whole job.

    Without this, one rank failing (a bad input file) would leave the others waiting in a
    barrier forever.
    """
    try:
        return fn()
    except BaseException as e:
        if comm.size > 1 and not isinstance(e, SystemExit):
            import sys
            import traceback

            traceback.print_exc()
            print(f"[rank {comm.rank}] {type(e).__name__}: {e} -- aborting all ranks", file=sys.stderr, flush=True)
            comm.abort(1)
        raise


MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID", "PMIX_RANK")


def get_comm(use_mpi: bool | None = None):
    """COMM_WORLD under ``mpiexec`` (detected from its environment), a SerialComm otherwise.

    Importing mpi4py initialises MPI, so it is only done when launched by mpiexec (or forced
    with ``use_mpi=True``); plain ``python tools/convert_*.py`` runs serially.
    """
    if use_mpi is None:
        use_mpi = any(v in os.environ for v in MPI_ENV_VARS)
    return MPIComm() if use_mpi else SerialComm()
