"""DeepSpeed config keys checked against DeepSpeed itself (the one place outside the adapters that reads
DeepSpeed's sources): ``zero_optimization`` by DeepSpeed's own extra-forbidding schema, top-level keys
against DeepSpeed's config constants."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from dimred_dist.core.typecheck import brief

__all__ = ["config_typos"]

#: Top-level sections DeepSpeed reads that its ``runtime.constants`` do not name.
_SECTIONS = {"zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "data_types", "flops_profiler",
             "activation_checkpointing", "tensorboard", "wandb", "csv_monitor", "comms_logger", "checkpoint", "aio",
             "compile", "autotuning", "elasticity", "compression_training", "data_efficiency", "hybrid_engine"}


def config_typos(ds: Mapping[str, Any]) -> list[str]:
    """Misspelt keys DeepSpeed would ignore or reject late: ``zero_optimization`` keys it does not define, and
    top-level keys that are not DeepSpeed's but one edit away from one."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    out = []
    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    known |= _SECTIONS
    for key in ds:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.85)
            if near:
                out.append(f"unknown key {brief(key)}: did you mean {near[0]!r}? (DeepSpeed would ignore it)")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        try:
            DeepSpeedZeroConfig(**zero)
        except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported as one line
            errors = e.errors() if hasattr(e, "errors") else [{"loc": (), "msg": str(e)}]
            for err in errors[:3]:
                loc = ".".join(str(p) for p in err.get("loc", ()))
                out.append(f"zero_optimization.{loc[:80]}: {str(err.get('msg', ''))[:120]}")
    return out
