"""Shared fixtures and markers. Multi-process tests use :func:`tests.dist_harness.run_distributed`
and carry ``@pytest.mark.distributed`` (deselect with ``-m "not distributed"``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and restores the thread count it found."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def pytest_collection_modifyitems(config, items):
    if _gloo_available():
        return
    skip = pytest.mark.skip(reason="torch.distributed with the gloo backend is not available in this torch build")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(skip)
