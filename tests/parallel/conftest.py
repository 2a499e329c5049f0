"""One spawned job per world size, shared by the split-vs-whole test files (see split_cases.py)."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.testing import run_distributed

from .split_cases import run_job

_RESULTS: dict = {}


@pytest.fixture(scope="session")
def split_results():
    """``get(world_size) -> list of per-rank result dicts`` (spawned once, then cached)."""

    def get(world_size: int):
        if world_size not in _RESULTS:
            try:
                _RESULTS[world_size] = run_distributed(run_job, world_size, timeout_s=600, pg_timeout_s=60)
            except Exception as e:  # every test of this world size reports the same failure
                _RESULTS[world_size] = e
        res = _RESULTS[world_size]
        if isinstance(res, Exception):
            raise res
        return res

    return get
