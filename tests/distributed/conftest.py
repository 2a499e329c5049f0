"""One spawned job per world size, shared by the tests of this folder (spawning and importing
DeepSpeed on every rank is the slow part, so every case of a world size runs in one job)."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.testing import cached_job_results


@pytest.fixture(scope="session")
def exact_results():
    """``get(world_size) -> list of per-rank result dicts`` (see exact_cases.run_job), cached."""
    from .exact_cases import run_job

    return cached_job_results(run_job, pass_world_size=True, timeout_s=400, pg_timeout_s=120)
