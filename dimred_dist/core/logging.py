"""A rank-aware logger: library code logs through it, never with print."""

from __future__ import annotations

import logging
import os


class _RankAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[rank {_rank()}] {msg}", kwargs

    def log(self, level, msg, *args, main_process_only: bool = True, **kwargs):
        if main_process_only and _rank() != 0:
            return
        super().log(level, msg, *args, **kwargs)


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover - torch always importable here
        pass
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str) -> _RankAdapter:
    """Logger whose calls run on rank 0 only unless ``main_process_only=False`` is passed."""
    return _RankAdapter(logging.getLogger(name), {})
