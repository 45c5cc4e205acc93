"""Resuming a Trainer run together with its dimred state, at the same or another world size / ZeRO stage.

Which checkpoint: exactly the one the Trainer resumes from (``trainer.train(resume_from_checkpoint=
path or True)``). Callbacks are not told that path, so :class:`TrainerResume` wraps three methods of
the Trainer instance:

* ``train``: before anything is loaded, ``True`` becomes the newest **complete** checkpoint of
  ``output_dir`` (newer ones whose save was cut short, or whose files changed since, are named in
  a warning and skipped), and the checkpoint is verified: the dimred manifest is there, every file
  the Trainer and DeepSpeed will load has the SHA-256 recorded at save time and no other file was
  added (:mod:`dimred_dist.distributed.integrity`), the manifest's step equals the Trainer's
  ``global_step`` in ``trainer_state.json``, and the saved parameters belong to this model;
* ``_prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)``, which receives the
  resolved path just before the Trainer loads the checkpoint. If it is missing (another
  transformers version), the fallback is ``{output_dir}/checkpoint-{global_step}`` when the Trainer
  state says it resumed;
* ``_save_checkpoint``: the dimred state is written right after the Trainer's files and *before* the
  Trainer deletes older checkpoints (``save_total_limit``), so a crash at any moment of a save leaves
  at least one complete checkpoint. ``checkpoint-N`` folders later than the resume point that hold
  no dimred manifest (cut short) are renamed ``incomplete-checkpoint-N`` at the start of training,
  so neither the Trainer's rotation nor a later resume takes them for checkpoints.

Same world size and ZeRO stage family (1 and 2 partition alike; replicated runs at any world size):
the Trainer loads everything as usual (DeepSpeed's checkpoint holds the compact optimizer state) and
the callback restores the masks, step and method state: training continues exactly.

Another world size or stage: DeepSpeed refuses to repartition its ZeRO optimizer checkpoint
(``ZeRORuntimeException``), and a checkpoint without a DeepSpeed ``global_step*`` folder makes the
Trainer raise "Can't find a valid checkpoint". The wrapper then lets the Trainer prepare without its
checkpoint load and restores what does not depend on the partitioning: the model weights (fp32 from
the ZeRO checkpoint, else ``model.safetensors``), the LR scheduler (``scheduler.pt``), and the Trainer
state (restored by the Trainer itself, before), and the compact optimizer's moments and step count,
which the dimred state holds in a layout-independent form (a checkpoint of an older format holds
none: the moments then restart at zero). Data are skipped by
optimizer steps, as the Trainer does; with another world size the global batch differs, so the
samples do not line up with the original run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dimred_dist.core.logging import get_logger
from dimred_dist.distributed.checkpoint import (
    CheckpointError,
    Manifest,
    check_model,
    read_manifest,
    same_partitioning,
)
from dimred_dist.distributed.integrity import (
    checkpoints,
    has_manifest,
    incomplete_later,
    newest_complete,
    resumable,
    set_aside,
)

logger = get_logger(__name__)

__all__ = ["TrainerResume"]

_SIGNATURE = ["max_steps", "train_dataloader", "resume_from_checkpoint"]


class TrainerResume:
    """Learns the checkpoint a Trainer resumes from and handles a change of world size or stage.

    Args:
        trainer: The Trainer (found by the callback in ``on_init_end``), or None.
        save: Called with the checkpoint folder on every rank once the Trainer wrote its files there,
            before older checkpoints are deleted (writes the dimred state).
    """

    def __init__(self, trainer: Any | None, save: Callable[[Path], None] | None = None) -> None:
        self.trainer = trainer
        self.checkpoint: str | None = None
        self.manifest: Manifest | None = None
        self.repartitioned = False
        self.installed = False
        #: The Trainer step of the latest checkpoint whose dimred state the ``_save_checkpoint`` wrapper wrote.
        self.saved_step: int | None = None
        if save is not None and _signature(getattr(trainer, "_save_checkpoint", None))[:2] == ["model", "trial"]:
            self._wrap_save(save)
        orig = getattr(trainer, "_prepare_for_training", None)
        if _signature(orig)[:3] != _SIGNATURE:
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
            return orig_train(self._validate(resume_from_checkpoint), *args, **kwargs)

        trainer._prepare_for_training = _prepare_for_training
        trainer.train = train
        self.installed = True

    def checkpoint_dir(self, args: Any, state: Any) -> str | None:
        """The checkpoint this run resumes from, or None for a fresh run (call in ``on_train_begin``).

        Also refuses, before any step, a run that would save into ``checkpoint-N`` folders of
        ``output_dir`` that already hold a dimred state (the Trainer would overwrite them silently).
        """
        _check_no_later_checkpoints(args, state)
        _set_aside_incomplete(args, state)
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
    def _validate(self, resume: str | bool | None) -> str | bool | None:
        """Before the Trainer loads anything: the checkpoint to resume from (``True`` resolved to the newest
        complete one), verified whole, at the Trainer's step, and saved for this model."""
        if isinstance(resume, bool):
            if not resume:
                return resume
            resume = self._newest_complete(self.trainer.args.output_dir)
        if resume is None:
            return None  # a fresh run
        manifest = resumable(resume)
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.trainer.model.named_parameters()}
        check_model(manifest, shapes, managed=False)
        return os.fspath(resume)

    @staticmethod
    def _newest_complete(output_dir: str) -> str:
        best, skipped = newest_complete(output_dir)
        for path, why in skipped:
            logger.warning("dimred: resume_from_checkpoint=True skips %s: %s", path, why)
        if best is None:
            detail = f"; the newest, {skipped[0][0].name}: {skipped[0][1]}" if skipped else ""
            raise CheckpointError(f"resume_from_checkpoint=True: no complete checkpoint in {output_dir}{detail}")
        logger.info("dimred: resuming from %s, the newest complete checkpoint", best)
        return os.fspath(best)

    def _wrap_save(self, save: Callable[[Path], None]) -> None:
        t = self.trainer
        orig = t._save_checkpoint

        def _save_checkpoint(model, trial, *args, **kwargs):
            limit = t.args.save_total_limit
            t.args.save_total_limit = None  # the Trainer's rotation waits until the dimred state is whole
            try:
                orig(model, trial, *args, **kwargs)
            finally:
                t.args.save_total_limit = limit
            run_dir = Path(t._get_output_dir(trial=trial)) if hasattr(t, "_get_output_dir") else Path(t.args.output_dir)
            save(run_dir / f"checkpoint-{t.state.global_step}")
            self.saved_step = t.state.global_step
            if limit and t.args.should_save:
                _rotate(t, run_dir, limit)

        t._save_checkpoint = _save_checkpoint

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
            "weights, dimred topology (masks, step, method state), Trainer state, LR scheduler, %s.%s",
            resume, self.manifest.world_size, self.manifest.zero_stage, world, stage,
            "the compact optimizer's moments and step count (resharded from the dimred state)"
            if self.manifest.optimizer_step is not None else
            "but not the optimizer (this checkpoint holds no moments: they restart at zero)",
            f" Reset:{rng}" if rng else "",
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


def _signature(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters) if fn is not None else []
    except (TypeError, ValueError):
        return []


def _rotate(trainer: Any, run_dir: Path, limit: int) -> None:
    """The Trainer's deletion of older checkpoints, as ``_save_checkpoint`` would have run it."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # transformers 4: a Trainer method
        trainer._rotate_checkpoints(use_mtime=True, output_dir=str(run_dir))
        return
    rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


def _set_aside_incomplete(args: Any, state: Any) -> None:
    """Rank 0 renames ``checkpoint-N`` folders after this run's start that hold no dimred manifest."""
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
        return
    if state.is_world_process_zero:
        for path in incomplete_later(args.output_dir, state.global_step):
            logger.warning("dimred: %s holds no complete dimred state (its save was cut short); renamed to %s",
                           path, set_aside(path).name)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_no_later_checkpoints(args: Any, state: Any) -> None:
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "no":
        return
    later = [p for n, p in checkpoints(args.output_dir) if n > state.global_step and has_manifest(p)]
    if later:
        raise FileExistsError(
            f"{args.output_dir} already holds dimred checkpoints after step {state.global_step} "
            f"({', '.join(p.name for p in later[:5])}); this run would overwrite them. Use a fresh output_dir or "
            "remove them."
        )
