"""Shared pytest setup: markers, GPU skipping, float64 helpers."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: keep intra-op threads low so multi-process tests do not oversubscribe.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_sessionstart(session):
    """Build the fused CPU DWT kernel (sgfm_dist/ops/_dwt_kernel.py) before any test runs: on a
    fresh machine (CI) its first use compiles for ~30-50 s, which must not land inside a test's
    subprocess that runs under a short collective timeout (tests/train/test_faults.py, the netns
    tests); later processes load it from torch's extension cache in about a second."""
    from sgfm_dist.ops import _dwt_kernel

    _dwt_kernel.available()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def devices():
    """CPU always, CUDA when present: operators are tested on both where a GPU exists."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
