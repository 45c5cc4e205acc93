"""The W&B-specific part of reporting: log saved plot files as ``wandb.Image`` to the active run.

Scalars need nothing here: the manager's flat metrics reach W&B through whatever already logs the
run (the Trainer's ``WandbCallback`` for ``report_to=["wandb"]``). Only images are logged directly,
to the run that is already active; this module never starts or finishes a run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from dimred_dist.core.logging import get_logger

logger = get_logger(__name__)

__all__ = ["active_run", "log_images"]

#: Prefix of the image keys (``dimred/plots/layer_density``, ``dimred/plots/churn``).
IMAGE_PREFIX = "dimred/plots/"


def active_run() -> Any | None:
    """The active W&B run of this process, or None (wandb not installed, or no run started)."""
    wandb = sys.modules.get("wandb")  # a run needs wandb imported: never import it only to look
    return None if wandb is None else getattr(wandb, "run", None)


def log_images(paths: dict[str, str | os.PathLike], extra: dict[str, Any] | None = None) -> bool:
    """Log PNG files to the active W&B run as ``dimred/plots/<name>`` images.

    Args:
        paths: Plot name -> PNG path (as returned by :func:`dimred_dist.integrations.plots.save_plots`).
        extra: Further values for the same history row (e.g. the Trainer's ``train/global_step``,
            which its W&B callback uses as the x-axis of every key).

    Returns:
        Whether a run was active and the images were logged.
    """
    run = active_run()
    if run is None or not paths:
        return False
    import wandb

    row = {IMAGE_PREFIX + name: wandb.Image(str(p), caption=name) for name, p in paths.items()}
    run.log({**row, **(extra or {})})
    logger.info("dimred: logged %d plots to W&B run %s", len(row), run.id)
    return True
