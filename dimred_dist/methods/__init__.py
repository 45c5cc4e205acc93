"""Built-in methods; importing this package registers them."""

from dimred_dist.methods import dynamic, finetune, freezing, granet, lottery, mest, pai, progressive, snfs, static  # noqa: F401
from dimred_dist.methods.base import Method, MethodContext

__all__ = ["Method", "MethodContext"]
