"""dimred_dist: train fewer weights by pruning and freezing during distributed training.

The top-level package imports torch only; DeepSpeed, transformers and wandb are imported by the
integrations that need them.
"""

from dimred_dist import methods  # noqa: F401  (registers the built-in methods)
from dimred_dist.core.config import Recipe, load_recipe
from dimred_dist.core.registry import register_method, registered_methods
from dimred_dist.core.state import DimRedState, ElementState, ParamState
from dimred_dist.core.targets import TargetConfig
from dimred_dist.distributed.probe import ProbeData
from dimred_dist.manager import DimRedManager
from dimred_dist.scoring import score_entries

__version__ = "0.1.0"

__all__ = [
    "DimRedManager",
    "DimRedState",
    "ElementState",
    "ParamState",
    "ProbeData",
    "Recipe",
    "TargetConfig",
    "load_recipe",
    "register_method",
    "registered_methods",
    "score_entries",
]
