"""Built-in methods; importing this package registers them."""

from dimred_dist.methods import (  # noqa: F401
    dynamic,
    finetune,
    freezing,
    granet,
    lottery,
    mest,
    pai,
    progressive,
    snfs,
    static,
    supermask,
    topkast,
)
from dimred_dist.methods.base import Method, MethodContext

__all__ = ["Method", "MethodContext"]
