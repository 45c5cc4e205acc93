"""The multi-process harness itself: results come back in rank order, failures raise loudly."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_harness import DistributedTestError, run_distributed

pytestmark = pytest.mark.distributed


def _allreduce_rank(rank: int, world_size: int, offset: int) -> dict:
    t = torch.tensor([rank + offset])
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "sum": int(t), "backend": dist.get_backend()}


def _raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a rank that never comes: the harness must end it
    return rank


def _sleep(rank: int, world_size: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


def test_results_come_back_in_rank_order():
    out = run_distributed(_allreduce_rank, 3, 10)
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["backend"] == "gloo" for o in out)
    assert all(o["sum"] == 10 + 11 + 12 for o in out)


def test_failure_raises_with_the_rank_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="boom on rank 1") as info:
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    assert "rank 1: error" in str(info.value)
    assert "rank 0" in str(info.value)  # the hung rank is reported as missing, not silently ignored
    assert time.monotonic() - t0 < 30  # ended after the grace period, not after the timeout


def test_timeout_raises():
    with pytest.raises(DistributedTestError, match="no result within"):
        run_distributed(_sleep, 2, 60.0, timeout=2)
