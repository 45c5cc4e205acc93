"""Probe batches for scoring methods (SNIP, GraSP, FORCE, ...) from a Trainer's train set.

The same batches on every rank (the scores, and so the masks, must not depend on the world size):
``batches * per_device_train_batch_size`` examples drawn with the recipe's seed from the whole train
set (not the rank's shard the Trainer's own dataloader would give), with the Trainer's collator and
its removal of columns the model does not take, moved to the Trainer's device.
"""

from __future__ import annotations

from typing import Any

import torch

from dimred_dist.distributed.probe import ProbeData

__all__ = ["probe_data_from_trainer"]


def probe_data_from_trainer(trainer: Any, n_batches: int, seed: int) -> ProbeData:
    """``n_batches`` batches of the Trainer's train set, identical on every rank.

    Raises:
        ValueError: If the Trainer has no train set, or it holds fewer examples than the batches need.
    """
    ds = getattr(trainer, "train_dataset", None)
    if ds is None:
        raise ValueError("the recipe's method scores entries on data, but the Trainer has no train_dataset")
    args = trainer.args
    if getattr(args, "remove_unused_columns", False) and hasattr(ds, "column_names"):
        ds = trainer._remove_unused_columns(ds, description="dimred probe")
    bs = int(args.per_device_train_batch_size)
    need = n_batches * bs
    if len(ds) < need:
        raise ValueError(f"the probe needs {n_batches} batches of {bs} examples, the train set holds {len(ds)}")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:need].tolist()
    collate = trainer.data_collator
    batches = [trainer._prepare_inputs(collate([ds[i] for i in order[k * bs : (k + 1) * bs]]))
               for k in range(n_batches)]
    return ProbeData(batches)
