"""Full model weights from a checkpoint of any world size or ZeRO stage, into a DeepSpeed engine or a module.

Used when resuming at another world size or stage, where DeepSpeed cannot load its own ZeRO
checkpoint. The weights come from, in this order:

* a DeepSpeed checkpoint (``global_step*`` folder): DeepSpeed's ``zero_to_fp32`` rebuilds the fp32
  master weights from the ranks' partitions, for any saved world size and ZeRO stage 1-3. Its
  ``torch.load`` calls run with ``weights_only=True`` and an allow-list of the few DeepSpeed classes
  its files hold (:data:`DEEPSPEED_SAFE_GLOBALS`), so a planted pickle cannot run code here;
* ``model.safetensors`` (or its sharded index) written by the Trainer's ``save_model``.

Into an engine, they are loaded into the module (ZeRO-3: gathered, rank 0 writes, DeepSpeed
re-partitions) and the fp32 master partitions are refreshed from the module weights (exact for fp32
weights; with bf16 weights the masters are rounded to bf16 once).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dimred_dist.core.logging import get_logger
from dimred_dist.distributed.zero import zero_optimizer_of

logger = get_logger(__name__)

__all__ = ["DEEPSPEED_SAFE_GLOBALS", "full_state_dict", "load_full_weights"]

#: The classes (besides tensors and containers) that DeepSpeed's ZeRO checkpoint files hold.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextmanager
def _weights_only_torch_load():
    """``torch.load`` forced to ``weights_only=True`` with :data:`DEEPSPEED_SAFE_GLOBALS` allowed, for the
    duration (``zero_to_fp32`` asks for ``weights_only=False``)."""
    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None:
            allowed.append(obj)
    orig = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return orig(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = orig


def full_state_dict(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unpartitioned) model state dict of a Trainer / DeepSpeed checkpoint folder.

    Raises:
        FileNotFoundError: If the folder holds neither a DeepSpeed checkpoint nor model.safetensors.
    """
    ckpt = Path(checkpoint)
    if glob.glob(str(ckpt / "global_step*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _weights_only_torch_load():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt)))
    if (ckpt / "model.safetensors").is_file():
        return load_file(ckpt / "model.safetensors")
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(ckpt / shard))
        return out
    raise FileNotFoundError(
        f"{ckpt} holds no model weights: neither a DeepSpeed global_step* folder nor model.safetensors "
        "(under ZeRO-3 the Trainer writes model.safetensors only with stage3_gather_16bit_weights_on_model_save)"
    )


def load_full_weights(target: Any, checkpoint: str | os.PathLike) -> None:
    """Load the full weights of ``checkpoint`` into a DeepSpeed engine of any ZeRO stage (collective), or
    into a plain module (single process / DDP replica)."""
    sd = full_state_dict(checkpoint)
    if not hasattr(target, "load_module_state_dict"):
        _check_covers(target, sd, checkpoint)
        target.load_state_dict(sd, strict=False)
        return
    engine, module = target, target.module
    _check_covers(module, sd, checkpoint)
    zero = zero_optimizer_of(engine)
    stage3 = type(zero).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    engine.load_module_state_dict({"module": sd}, strict=False, fetch_z3_params=stage3)
    zero.refresh_fp32_params()
    logger.info("dimred: loaded the model weights of %s into the ZeRO-%s engine", checkpoint, 3 if stage3 else "1/2")


def _check_covers(module: torch.nn.Module, sd: dict[str, torch.Tensor], checkpoint) -> None:
    """Every parameter (or one of its tied aliases) must be in ``sd`` with its shape."""
    aliases: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append((name, p))
    for group in aliases.values():
        found = [(n, p) for n, p in group if n in sd]
        if not found:
            raise KeyError(f"{checkpoint}: no weights for parameter {group[0][0]!r}")
        for n, p in found:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(sd[n].shape) != shape:
                raise ValueError(f"{checkpoint}: {n!r} has shape {tuple(sd[n].shape)} in the checkpoint, {shape} here")
