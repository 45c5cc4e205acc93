"""Shared pieces of the tests that run the manager under real DeepSpeed ZeRO engines on CPU.

Everything here is plain data or runs inside a :func:`tests.dist_harness.run_distributed` worker:

* :func:`init_deepspeed` / :func:`ds_config` / :func:`build_engine`: a DeepSpeed engine over the
  harness's gloo group, with small buckets (ZeRO-3's default ``reduce_bucket_size`` allocates
  ~1.9 GB per rank), a persistence threshold that makes the smallest parameters persistent, and
  several ZeRO-3 sub-groups;
* :class:`Net` / :class:`WideNet`: small models whose first parameter has a single element (so one
  rank owns none of it under every stage); ``Net``'s parameter sizes are all odd (never divisible
  by the world size);
* :func:`gather_objects`, :func:`assemble`: rebuild full tensors from the ranks' local pieces by
  their global ranges (test-side only; the code under test never sends tensors);
* :class:`ArrayView`: a single-process shard view over given full tensors (weight and gradient of
  any dtype), for reference computations;
* :func:`launch_once` / :func:`run_scenarios`: one cached launch per key running several scenarios.

DeepSpeed's CPU shared-memory all-reduce writes a ~66 MB ``/dev/shm`` file per rank, named after
the uid, ``MASTER_ADDR`` and ``MASTER_PORT``, and never deletes it; it does so only when
``LOCAL_SIZE`` equals the world size (DeepSpeed's launcher sets it). Workers drop ``LOCAL_SIZE`` so
the gloo path is used, and at the end delete their own file should it exist anyway and report
whether it did (``results["_shm"]``), so a test can assert that none appeared. Files of other
processes are never touched.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from dimred_dist.distributed.views import ShardView

STAGES = (1, 2, 3)
PRECISIONS = ("fp32", "bf16")
SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


# ---- models ------------------------------------------------------------------------------
class Net(nn.Module):
    """tiny (1 element, first) -> l1 (7 -> 33) -> l2 (33 -> 5): 435 parameters, odd sizes."""

    in_features, out_features = 7, 5

    def __init__(self) -> None:
        super().__init__()
        self.tiny = nn.Linear(1, 1, bias=False)
        self.l1 = nn.Linear(7, 33)
        self.l2 = nn.Linear(33, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.tiny(torch.ones(1, 1, dtype=x.dtype))
        return self.l2(torch.relu(self.l1(x))) * (1.0 + scale)


class WideNet(nn.Module):
    """tiny (1) -> 96 -> 301 -> 77 without biases (~52k entries): the bitmask dominates fixed costs."""

    in_features, out_features = 96, 77

    def __init__(self) -> None:
        super().__init__()
        self.tiny = nn.Linear(1, 1, bias=False)
        self.l1 = nn.Linear(96, 301, bias=False)
        self.l2 = nn.Linear(301, 77, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.tiny(torch.ones(1, 1, dtype=x.dtype))
        return self.l2(torch.relu(self.l1(x))) * (1.0 + scale)


def make_model(cls: type[nn.Module] = Net, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls()


# ---- DeepSpeed ---------------------------------------------------------------------------
def ds_config(stage: int, precision: str = "fp32", *, micro_batch: int = 2, grad_acc: int = 1, clip: float = 1.0,
              **zero: Any) -> dict[str, Any]:
    """A small DeepSpeed config. ``precision``: ``fp32``, ``bf16``, or ``bf16acc32`` (bf16 weights,
    fp32 gradient accumulation)."""
    z = {
        "stage": stage, "reduce_bucket_size": 5e5, "allgather_bucket_size": 5e5,
        "stage3_param_persistence_threshold": 10, "stage3_prefetch_bucket_size": 5e5,
        "stage3_max_live_parameters": 1e6, "sub_group_size": 100,
    }
    z.update(zero)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_acc,
        "gradient_clipping": clip, "zero_optimization": z, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if precision in ("bf16", "bf16acc32"):
        cfg["bf16"] = {"enabled": True}
    if precision == "bf16acc32":
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}")
    return cfg


def init_deepspeed() -> None:
    """Hand the harness's gloo group to DeepSpeed (inside a worker)."""
    os.environ.pop("LOCAL_SIZE", None)  # keeps DeepSpeed's shm all-reduce (and its /dev/shm files) off
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")


def build_engine(model: nn.Module, config: dict[str, Any], optimizer: Any = None):
    """``deepspeed.initialize`` with a client optimizer (default: CompactAdamW over trainable params)."""
    import deepspeed

    from dimred_dist.optim import CompactAdamW

    if optimizer is None:
        optimizer = CompactAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def low_precision(precision: str) -> torch.dtype:
    return torch.float32 if precision == "fp32" else torch.bfloat16


def batch(model: nn.Module, step: int, micro: int, rank: int, precision: str, size: int = 2):
    """Deterministic (x, y) of one rank's micro-batch; x in the engine's weight dtype."""
    g = torch.Generator().manual_seed(100_003 * step + 1009 * micro + rank)
    x = torch.randn(size, model.in_features, generator=g)
    y = torch.randn(size, model.out_features, generator=g)
    return x.to(low_precision(precision)), y


def train(engine, model: nn.Module, steps: int, precision: str, *, grad_acc: int = 1,
          after_step: Callable[[int], None] | None = None) -> None:
    """``steps`` optimizer steps of ``grad_acc`` micro-batches each (MSE loss)."""
    rank = dist.get_rank()
    for t in range(steps):
        for m in range(grad_acc):
            x, y = batch(model, t, m, rank, precision)
            loss = nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
        if after_step is not None:
            after_step(t)


def zero_stage(engine) -> int:
    return 3 if type(engine.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3" else 1


def flat_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 tensors the client optimizer updates (one per param group / ZeRO-3 sub-group)."""
    z = engine.optimizer
    if type(z).__name__ == "DeepSpeedZeroOptimizer_Stage3":
        return list(z.fp32_partitioned_groups_flat)
    return list(z.single_partition_of_fp32_groups)


def real_entries(engine) -> list[torch.Tensor]:
    """Per flat partition: True where the entry belongs to a parameter, False for alignment padding.

    ZeRO-3 pads every parameter's partition on the last rank, and the padding of its fp32 master
    is uninitialized memory (it can hold NaN); comparisons must skip it.
    """
    z = engine.optimizer
    real = [torch.zeros(f.numel(), dtype=torch.bool) for f in flat_partitions(engine)]
    if zero_stage(engine) == 3:
        for sg, params in enumerate(z.fp16_groups):
            for p in params:
                sg2, off, _ = z.grad_position[z.get_param_id(p)]
                pn = p.ds_tensor.ds_numel
                start = min(z._get_param_partition_rank(p) * pn, p.ds_numel)
                real[sg2][off : off + min(start + pn, p.ds_numel) - start] = True
    else:
        for p in engine.module.parameters():
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                a = m.hp_fragment_address
                real[m.param_group_index][a.start : a.start + a.numel] = True
    return real


@torch.no_grad()
def full_module_params(engine) -> dict[str, torch.Tensor]:
    """Every module parameter in full, as the module holds it (collective).

    ZeRO-3 gathers the partitioned parameters; persistent ones are read from the full copy every
    rank keeps (gathering them would re-partition them on exit and drop that copy).
    """
    import deepspeed

    params = dict(engine.module.named_parameters())
    persistent = persistent_copies(engine)
    gather = [p for n, p in params.items() if n not in persistent]
    with deepspeed.zero.GatheredParameters(gather, enabled=zero_stage(engine) == 3):
        return {n: persistent[n] if n in persistent else p.detach().clone() for n, p in params.items()}


@torch.no_grad()
def persistent_copies(engine) -> dict[str, torch.Tensor]:
    """ZeRO-3: the full copies small persistent parameters keep on every rank (no gather)."""
    if zero_stage(engine) != 3:
        return {}
    return {n: p.data.detach().clone() for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False)}


# ---- gathering and reassembly ------------------------------------------------------------
def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (test-side reassembly only)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def local_masks(manager) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {ps.name: (ps.keep.clone(), ps.train.clone()) for ps in manager.state}


def assemble(pieces: list[tuple[int, int, torch.Tensor]], numel: int) -> torch.Tensor:
    """A full flat tensor from ``(start, end, local)`` pieces that must cover ``0 .. numel-1`` exactly once."""
    covered = torch.zeros(numel, dtype=torch.int64)
    dtype = next((t.dtype for _, _, t in pieces), torch.float32)
    full = torch.zeros(numel, dtype=dtype)
    for start, end, t in pieces:
        assert t.numel() == end - start, f"local piece of {t.numel()} entries for range [{start}, {end})"
        full[start:end] = t.reshape(-1)
        covered[start:end] += 1
    assert bool((covered == 1).all()), f"ranges do not cover the parameter exactly once: {covered.tolist()[:20]}"
    return full


def assemble_named(ranks: list[dict], key: str, ranges_key: str = "ranges",
                   numels: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Per parameter name: the full tensor from each rank's ``rec[key][name]`` over ``rec[ranges_key][name]``."""
    names = list(ranks[0][ranges_key])
    numels = numels or ranks[0]["numels"]
    return {
        n: assemble([(*r[ranges_key][n], r[key][n]) for r in ranks], numels[n]) for n in names
    }


class ArrayView(ShardView):
    """A whole parameter over given flat tensors (weight and gradient of any dtype), single process."""

    def __init__(self, name: str, shape: tuple[int, ...], weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        n = weight.numel()
        super().__init__(name, tuple(shape), 0, n, replicated=False)
        self._w = weight.reshape(-1)
        self._g = None if grad is None else grad.reshape(-1)

    def weight(self) -> torch.Tensor:
        return self._w

    def grad(self) -> torch.Tensor | None:
        return self._g


# ---- launching -----------------------------------------------------------------------------
def own_shm_file() -> str:
    """The ``/dev/shm`` file DeepSpeed's shm all-reduce would create for this worker."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"


_CACHE: dict[Any, tuple[str, Any, float]] = {}


def launch_once(key: Any, fn: Callable[..., Any], *args: Any, timeout: float = 240) -> Any:
    """Run ``fn`` on 2 ranks once per test session for ``key`` and return rank 0's result; later
    calls get the same result (or the same failure)."""
    from tests.dist_harness import run_distributed

    if key not in _CACHE:
        t0 = time.perf_counter()
        try:
            entry = ("ok", run_distributed(fn, 2, *args, timeout=timeout)[0])
        except Exception:
            entry = ("error", traceback.format_exc())
        _CACHE[key] = (*entry, time.perf_counter() - t0)
    kind, value, _ = _CACHE[key]
    if kind != "ok":
        raise AssertionError(f"launch {key!r} failed:\n{value}")
    return value


def launch_results() -> dict[Any, Any]:
    """Rank 0's results of every successful launch so far, by key."""
    return {k: v[1] for k, v in _CACHE.items() if v[0] == "ok"}


def scenario(results: dict[str, Any], name: str) -> list[Any]:
    """The per-rank records of one scenario of a grouped launch; fails with the ranks' tracebacks."""
    sc = results[name]
    errors = [e for e in sc["errors"] if e]
    if errors:
        raise AssertionError(f"scenario {name!r} raised inside the workers:\n" + "\n".join(errors))
    return sc["ranks"]


def run_scenarios(scenarios: dict[str, Callable[[], Any]]) -> dict[str, Any] | None:
    """Run each scenario on every rank; rank 0 returns ``{name: {"ranks": [...], "errors": [...]}}``.

    A scenario that raises on every rank is recorded and the next one runs; one that raises on some
    ranks only leaves the others in a collective, and the harness timeout reports it.
    """
    out: dict[str, Any] = {}
    for name, fn in scenarios.items():
        try:
            rec, err = fn(), None
        except Exception:
            rec, err = None, traceback.format_exc()
        gathered = gather_objects((rec, err))
        out[name] = {"ranks": [g[0] for g in gathered], "errors": [g[1] for g in gathered]}
    dist.barrier()  # nobody uses the shm buffers any more
    path = own_shm_file()
    existed = os.path.exists(path)
    if existed:
        os.remove(path)
    out["_shm"] = gather_objects({"path": path, "existed": existed, "local_size": os.environ.get("LOCAL_SIZE")})
    return out if dist.get_rank() == 0 else None
