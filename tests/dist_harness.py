"""Run a function on several real processes joined by a gloo process group (CPU only).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, initializes
``torch.distributed`` with gloo over loopback TCP in each, calls ``fn(rank, world_size, *args)``
and returns the ranks' return values in rank order. ``fn`` must be a module-level function and its
arguments and return value picklable (tensors travel by value).

Processes come from a ``forkserver`` that imports torch and dimred_dist once per test session, so
a launch costs tens of milliseconds instead of the ~2 s of imports a ``spawn`` pays per process.
A run is judged by its results: every rank writes its return value (or its traceback) to a file
*before* the closing ``barrier`` / ``destroy_process_group``, so a crash at teardown cannot hide a
result, and a failing rank raises here with its own traceback.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

# torch._dynamo is imported by the first optimizer a process builds (~4 s); deepspeed by every ZeRO test.
_PRELOAD = [
    "torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "deepspeed", "dimred_dist", "pytest",
    "tests.dist_harness",
]
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(_PRELOAD)

#: Seconds the other ranks get to finish after one rank failed (they are usually stuck in a collective).
_GRACE_S = 3.0


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out; the message holds every rank's traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; rank 0 binds it again at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, payload: tuple[str, Any]) -> None:
    tmp = path + ".tmp"
    try:
        data = pickle.dumps(payload)
    except Exception:  # an unpicklable return value is a test bug; report it instead of hanging
        data = pickle.dumps(("error", traceback.format_exc()))
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: the parent never reads half a result


def _worker(blob: bytes, rank: int, world_size: int, port: int, out_dir: str, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
            timeout=datetime.timedelta(seconds=timeout),
        )
    except BaseException:
        _write(path, ("init_error", traceback.format_exc()))
        return
    try:
        fn, args = pickle.loads(blob)
        _write(path, ("ok", fn(rank, world_size, *args)))
    except BaseException:
        _write(path, ("error", traceback.format_exc()))
        return  # the others may wait in a collective forever: the parent ends them
    dist.barrier()
    dist.destroy_process_group()


def _read(path: str) -> tuple[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def _stop(procs: list, wait: float = 0.0) -> None:
    """Let the processes exit by themselves for up to ``wait`` seconds, then end them."""
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def _launch(blob: bytes, world_size: int, timeout: float) -> list[tuple[str, Any] | None]:
    out_dir = tempfile.mkdtemp(prefix="dimred_dist_test_")
    port = free_port()
    paths = [os.path.join(out_dir, f"rank{r}.pkl") for r in range(world_size)]
    procs = [
        _CTX.Process(target=_worker, args=(blob, r, world_size, port, out_dir, timeout), daemon=True)
        for r in range(world_size)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        while True:
            results = [_read(p) for p in paths]
            if all(r is not None and r[0] == "ok" for r in results):
                break
            failed = any(r is not None and r[0] != "ok" for r in results)
            died = any(p.exitcode is not None and r is None for p, r in zip(procs, results))
            now = time.monotonic()
            if failed or died:
                failed_at = failed_at or now
                if now - failed_at > _GRACE_S or all(p.exitcode is not None for p in procs):
                    break
            if now > deadline:
                failed_at = failed_at or now
                break
            time.sleep(0.01)
        _stop(procs, wait=10.0 if failed_at is None else 0.0)
        results = [_read(p) for p in paths]
        return [r if r is not None else ("missing", f"exit code {p.exitcode}") for r, p in zip(results, procs)]
    finally:
        _stop(procs)
        shutil.rmtree(out_dir, ignore_errors=True)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo-connected processes.

    Returns:
        The ranks' return values, in rank order.

    Raises:
        DistributedTestError: If a rank raised (its traceback is in the message), died without a
            result, or did not finish within ``timeout`` seconds.
    """
    blob = pickle.dumps((fn, args))
    for attempt in range(3):
        results = _launch(blob, world_size, timeout)
        in_use = any(r[0] == "init_error" and "address already in use" in str(r[1]).lower() for r in results)
        if not in_use:  # another process took the port between free_port() and rank 0's bind: retry
            break
    if all(r[0] == "ok" for r in results):
        return [r[1] for r in results]
    report = []
    for rank, (kind, detail) in enumerate(results):
        if kind == "missing":
            detail = f"no result within {timeout} s or died ({detail})"
        if kind != "ok":
            report.append(f"--- rank {rank}: {kind} ---\n{detail}")
    raise DistributedTestError(f"{fn.__qualname__} failed on {world_size} ranks:\n" + "\n".join(report))
