"""Resuming a Trainer run together with its dimred state, at the same or another world size / ZeRO stage.

Which checkpoint: exactly the one the Trainer resumes from (``trainer.train(resume_from_checkpoint=
path or True)``). Callbacks are not told that path, so :class:`TrainerResume` wraps two methods of
the Trainer instance: ``train``, to check before anything is loaded that the checkpoint holds a
dimred state of this model, and ``_prepare_for_training(max_steps, train_dataloader,
resume_from_checkpoint)``, which receives the resolved path just before the Trainer loads the
checkpoint. If the latter is missing (another transformers version), the fallback is
``{output_dir}/checkpoint-{global_step}`` when the Trainer state says it resumed.

Same world size and ZeRO stage family (1 and 2 partition alike; replicated runs at any world size):
the Trainer loads everything as usual (DeepSpeed's checkpoint holds the compact optimizer state) and
the callback restores the masks, step and method state: training continues exactly.

Another world size or stage: DeepSpeed refuses to repartition its ZeRO optimizer checkpoint
(``ZeRORuntimeException``), and a checkpoint without a DeepSpeed ``global_step*`` folder makes the
Trainer raise "Can't find a valid checkpoint". The wrapper then lets the Trainer prepare without its
checkpoint load and restores what does not depend on the partitioning: the model weights (fp32 from
the ZeRO checkpoint, else ``model.safetensors``), the LR scheduler (``scheduler.pt``), and the Trainer
state (restored by the Trainer itself, before). The optimizer restarts: Adam moments of every TRAIN
entry are zero and its step count starts again (bias correction restarts). Data are skipped by
optimizer steps, as the Trainer does; with another world size the global batch differs, so the
samples do not line up with the original run.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from dimred_dist.core.logging import get_logger
from dimred_dist.distributed.checkpoint import (
    DIMRED_DIR, MANIFEST, CheckpointError, Manifest, check_model, read_manifest, same_partitioning,
)

logger = get_logger(__name__)

__all__ = ["TrainerResume"]

_SIGNATURE = ["max_steps", "train_dataloader", "resume_from_checkpoint"]


class TrainerResume:
    """Learns the checkpoint a Trainer resumes from and handles a change of world size or stage.

    Args:
        trainer: The Trainer (found by the callback in ``on_init_end``), or None.
    """

    def __init__(self, trainer: Any | None) -> None:
        self.trainer = trainer
        self.checkpoint: str | None = None
        self.manifest: Manifest | None = None
        self.repartitioned = False
        self.installed = False
        orig = getattr(trainer, "_prepare_for_training", None)
        if orig is None or list(inspect.signature(orig).parameters)[:3] != _SIGNATURE:
            if trainer is not None:
                logger.warning(
                    "dimred: this transformers version has no Trainer._prepare_for_training%s; resuming at another "
                    "world size or ZeRO stage is not available", tuple(_SIGNATURE),
                )
            return

        def _prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint, *args, **kwargs):
            return self._prepare(orig, max_steps, train_dataloader, resume_from_checkpoint, *args, **kwargs)

        orig_train = trainer.train

        def train(resume_from_checkpoint=None, *args, **kwargs):
            self._validate(resume_from_checkpoint)
            return orig_train(resume_from_checkpoint, *args, **kwargs)

        trainer._prepare_for_training = _prepare_for_training
        trainer.train = train
        self.installed = True

    def checkpoint_dir(self, args: Any, state: Any) -> str | None:
        """The checkpoint this run resumes from, or None for a fresh run (call in ``on_train_begin``).

        Also refuses, before any step, a run that would save into ``checkpoint-N`` folders of
        ``output_dir`` that already hold a dimred state (the Trainer would overwrite them silently).
        """
        _check_no_later_checkpoints(args, state)
        if self.installed:
            return self.checkpoint
        if state.global_step > 0:
            guess = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not guess.is_dir():
                raise FileNotFoundError(
                    f"the Trainer resumed at step {state.global_step} but {guess} does not exist; the dimred state "
                    "must come from the checkpoint the Trainer resumed from"
                )
            return str(guess)
        return None

    # ---- the wrapped methods -------------------------------------------------------------
    def _validate(self, resume: str | bool | None) -> None:
        """Before the Trainer loads anything: the checkpoint has a dimred state saved for this model."""
        if isinstance(resume, bool):
            if not resume:
                return
            from transformers.trainer_utils import get_last_checkpoint

            resume = get_last_checkpoint(self.trainer.args.output_dir)
        if resume is None:
            return  # a fresh run, or the Trainer reports the missing checkpoint itself
        manifest = read_manifest(resume)
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.trainer.model.named_parameters()}
        check_model(manifest, shapes, managed=False)

    def _prepare(self, orig, max_steps, train_dataloader, resume, *args, **kwargs):
        self.checkpoint = None if resume is None else os.fspath(resume)
        if resume is None:
            return orig(max_steps, train_dataloader, resume, *args, **kwargs)
        self.manifest = read_manifest(resume)  # no dimred state: raise before the Trainer loads anything
        world, stage = self._layout()
        if same_partitioning(self.manifest, world, stage):
            return orig(max_steps, train_dataloader, resume, *args, **kwargs)
        self.repartitioned = True
        t = self.trainer
        if getattr(t, "is_fsdp_enabled", False):
            raise CheckpointError("resuming at another world size or ZeRO stage is not supported under FSDP")
        rng = " and the per-rank RNG states (saved for another world size)" if world != self.manifest.world_size else ""
        logger.warning(
            "dimred: resuming from %s, saved by %d ranks at ZeRO stage %d, on %d ranks at stage %d. DeepSpeed cannot "
            "repartition its ZeRO optimizer checkpoint, so the Trainer's checkpoint load is replaced. Restored: model "
            "weights, dimred topology (masks, step, method state), Trainer state, LR scheduler. Reset: the optimizer "
            "(Adam moments of every TRAIN entry restart at zero, its step count at 0)%s.",
            resume, self.manifest.world_size, self.manifest.zero_stage, world, stage, rng,
        )
        model, train_dataloader = orig(max_steps, train_dataloader, None, *args, **kwargs)
        from dimred_dist.distributed.weights import load_full_weights

        # Without DeepSpeed, Trainer.train() loaded model.safetensors already; the fp32 masters of a
        # ZeRO checkpoint are preferred to that (possibly bf16) copy.
        load_full_weights(t.model_wrapped if t.is_deepspeed_enabled else t.model, resume)
        self._load_scheduler(resume)
        return model, train_dataloader

    def _layout(self) -> tuple[int, int]:
        """(world size, ZeRO stage) of this run, before the engine exists."""
        t = self.trainer
        stage = 0
        if t.is_deepspeed_enabled:
            stage = int(t.accelerator.state.deepspeed_plugin.zero_stage)
        return int(t.args.world_size), stage

    def _load_scheduler(self, resume: str) -> None:
        path = Path(resume) / "scheduler.pt"
        sched = self.trainer.lr_scheduler
        if type(sched).__name__ == "DeepSpeedSchedulerWrapper":
            logger.warning("dimred: the LR scheduler comes from the DeepSpeed config; it restarts from step 0")
        elif path.is_file() and sched is not None:
            sched.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            logger.warning("dimred: %s not found; the LR scheduler restarts from step 0", path)


def _check_no_later_checkpoints(args: Any, state: Any) -> None:
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
        return
    later = sorted(
        (p for p in Path(args.output_dir).glob("checkpoint-*")
         if p.name.split("-")[-1].isdigit() and int(p.name.split("-")[-1]) > state.global_step
         and (p / DIMRED_DIR / MANIFEST).is_file()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if later:
        raise FileExistsError(
            f"{args.output_dir} already holds dimred checkpoints after step {state.global_step} "
            f"({', '.join(p.name for p in later[:5])}); this run would overwrite them. Use a fresh output_dir or "
            "remove them."
        )
