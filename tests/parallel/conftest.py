"""One spawned job per world size, shared by the split-vs-whole test files (see split_cases.py)."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.testing import cached_job_results

from .split_cases import run_job


@pytest.fixture(scope="session")
def split_results():
    """``get(world_size) -> list of per-rank result dicts`` (spawned once, then cached)."""
    return cached_job_results(run_job, timeout_s=600, pg_timeout_s=60)
