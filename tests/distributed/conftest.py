"""One spawned job per world size, shared by the tests of this folder (spawning and importing
DeepSpeed on every rank is the slow part, so every case of a world size runs in one job)."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.testing import run_distributed

_RESULTS: dict = {}


@pytest.fixture(scope="session")
def exact_results():
    """``get(world_size) -> list of per-rank result dicts`` (see exact_cases.run_job), cached."""
    from .exact_cases import run_job

    def get(world_size: int):
        if world_size not in _RESULTS:
            try:
                _RESULTS[world_size] = run_distributed(run_job, world_size, world_size, timeout_s=400,
                                                       pg_timeout_s=120)
            except Exception as e:  # every case of this world size reports the same failure
                _RESULTS[world_size] = e
        res = _RESULTS[world_size]
        if isinstance(res, Exception):
            raise res
        return res

    return get
