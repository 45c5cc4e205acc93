"""Hugging Face Trainer integration: a thin callback around :class:`~dimred_dist.DimRedManager`.

Three added lines in a Trainer script::

    recipe = dimred_dist.load_recipe("configs/rigl_90.yaml")
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DimRedCallback(recipe)],
                      optimizer_cls_and_kwargs=compact_optimizer(args))

Under DeepSpeed (``TrainingArguments(deepspeed=...)`` or ``accelerate launch`` with a DeepSpeed
config) the manager runs inside the ZeRO step, before the norm. The DeepSpeed config must not have
an ``optimizer`` section: DeepSpeed would then build its own dense optimizer, and a Trainer given
``optimizers=(instance, None)`` silently drops the instance; ``optimizer_cls_and_kwargs`` reaches
the engine.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from dimred_dist.core.config import Recipe, load_recipe, recipe_from_dict
from dimred_dist.core.logging import get_logger
from dimred_dist.core.targets import freeze_whole_tensors
from dimred_dist.distributed.checkpoint import load_dimred_state, read_manifest, save_dimred_state
from dimred_dist.integrations.hf_resume import TrainerResume
from dimred_dist.manager import DimRedManager
from dimred_dist.optim.compact import CompactAdamW

logger = get_logger(__name__)

__all__ = ["DimRedCallback", "TrainingDiverged", "compact_optimizer"]


def compact_optimizer(args: Any) -> tuple[type, dict[str, Any]]:
    """``optimizer_cls_and_kwargs`` for the Trainer: CompactAdamW with the TrainingArguments' settings."""
    return CompactAdamW, {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.weight_decay,
    }


def _deepspeed_engine_optimizer(optimizer: Any) -> Any | None:
    """The ZeRO optimizer if ``optimizer`` wraps one (accelerate's DeepSpeedOptimizerWrapper), else None."""
    obj = optimizer
    for _ in range(3):
        if obj is None:
            return None
        if type(obj).__name__.startswith(("DeepSpeedZeroOptimizer", "BF16_Optimizer")):
            return obj
        obj = getattr(obj, "optimizer", None)
    return None


class TrainingDiverged(RuntimeError):
    """Raised by :class:`DimRedCallback` on every rank when the gradients stayed non-finite."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


class DimRedCallback(TrainerCallback):
    """Applies a recipe during ``Trainer.train()`` and adds the manager's metrics to the logs.

    At the end of training rank 0 saves plots (per-layer density, churn per topology update) as PNG
    in ``{output_dir}/dimred_plots/`` and logs them as images to the active W&B run, if any
    (needs matplotlib; without it the plots are skipped with a warning).

    Every logging step adds the manager's metrics (see :mod:`dimred_dist.metrics`) to the logs the
    reporters (W&B, TensorBoard) and ``trainer.state.log_history`` receive; the console line keeps
    only :data:`CONSOLE_KEYS` of them (density, train fraction, churn, optimizer bytes) next to the loss.

    Every checkpoint the Trainer saves gets the dimred state in ``checkpoint-N/dimred/`` (see
    :mod:`dimred_dist.distributed.checkpoint`), and ``trainer.train(resume_from_checkpoint=...)``
    restores it from the checkpoint the Trainer resumes from, also at another world size or ZeRO
    stage (see :mod:`dimred_dist.integrations.hf_resume` for what is restored and what restarts).

    A run whose gradients are non-finite (inf or NaN on some rank) for ``max_nonfinite_steps`` optimizer
    steps in a row has diverged: :class:`TrainingDiverged` is raised on every rank at the same step
    (the Trainer's logged loss would read 0 there: ``logging_nan_inf_filter`` drops such losses).
    Topology updates due on a step with non-finite gradients are skipped (``dimred/skipped_updates``).

    Args:
        recipe: A :class:`~dimred_dist.Recipe` or the path of a recipe YAML file.
        plot_every: Also plot every this many logging events (0: only at the end of training).
        max_nonfinite_steps: Steps in a row with non-finite gradients before the run stops (0: never
            stop). Under fp16 loss scaling a few overflow steps in a row are normal.
    """

    def __init__(self, recipe: Recipe | str, *, plot_every: int = 0, max_nonfinite_steps: int = 10) -> None:
        if plot_every < 0:
            raise ValueError(f"plot_every must be >= 0, got {plot_every}")
        if isinstance(max_nonfinite_steps, bool) or not isinstance(max_nonfinite_steps, int) or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be an integer >= 0, got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        self.plot_every = plot_every
        self.manager: DimRedManager | None = None
        self._trainer = None
        self._logged: tuple[int, dict[str, float]] | None = None  # (manager step, metrics) of the last log
        self._n_logs = 0

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _move_to_front(self)
        _before_console(ConsoleMetrics(), self)
        self._trainer = _find_on_stack(lambda obj: hasattr(obj, "accelerator") and hasattr(obj, "callback_handler"))
        self._resume = TrainerResume(self._trainer, save=self._save_into)
        if self.recipe.freeze:
            names = freeze_whole_tensors(model, self.recipe.freeze)
            logger.info("dimred: froze %d whole tensors before the optimizer is built", len(names))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.manager is not None:
            return
        zero = _deepspeed_engine_optimizer(optimizer)
        if zero is not None:
            from dimred_dist.distributed.zero import ZeroAdapter

            engine = getattr(self._trainer, "model_wrapped", None)
            adapter = ZeroAdapter(engine if hasattr(engine, "backward") else zero, module=model)
            self.manager = self._new_manager(args, state, model, adapter)
            self.manager.attach(zero, lr_scheduler=lr_scheduler)
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        self.manager = self._new_manager(args, state, model, None)
        # The manager runs in the optimizer's pre-step hook, once per step. Without DeepSpeed the Trainer
        # computes the norm (and clips) through accelerator.clip_grad_norm_ before optimizer.step(): run it
        # there first, so the norm sees TRAIN entries only (the pre-hook then finds the step done). Where
        # the Trainer computes no norm (transformers 4 with max_grad_norm=0) the pre-hook runs it.
        self.manager.attach(inner, pre_step=False, lr_scheduler=lr_scheduler)
        accelerator = getattr(getattr(self, "_trainer", None), "accelerator", None)
        if accelerator is None:
            logger.warning(
                "dimred: Trainer not found; gradients are masked in the optimizer's pre-step hook, after the Trainer "
                "computed the gradient norm"
            )
            return
        clip = accelerator.clip_grad_norm_

        def masked_clip_grad_norm_(*a, **kw):
            self.manager.before_optimizer_step()
            return clip(*a, **kw)

        accelerator.clip_grad_norm_ = masked_clip_grad_norm_

    def _new_manager(self, args, state, model, adapter) -> DimRedManager:
        """A prepared manager: a fresh topology, or the one of the checkpoint the Trainer resumes from."""
        resume = getattr(self, "_resume", None) or TrainerResume(None)
        checkpoint = resume.checkpoint_dir(args, state)
        if checkpoint is not None:
            self.recipe = _recipe_in_force(self.recipe, checkpoint)
        manager = DimRedManager(self.recipe, model, adapter=adapter, total_steps=state.max_steps)
        probe = None
        if checkpoint is None and manager.method.needs_probe and self._trainer is not None:
            from dimred_dist.integrations.hf_probe import probe_data_from_trainer

            # data-free methods take one batch for the shape of their synthetic input
            n = manager.method.probe_batches if manager.method.needs_data else 1
            probe = probe_data_from_trainer(self._trainer, n, self.recipe.seed)
        manager.prepare(resuming=checkpoint is not None, probe=probe)
        if checkpoint is not None:
            load_dimred_state(manager, checkpoint)  # before attach: the optimizer gets the saved masks
        return manager

    def _save_into(self, folder: Path) -> None:
        # Every rank writes its own file into the folder the Trainer just wrote.
        if self.manager is not None:
            save_dimred_state(self.manager, folder, record_checkpoint=True)

    def on_save(self, args, state, control, **kwargs):
        # Without the Trainer's _save_checkpoint wrapped (another transformers version), here: after the
        # Trainer's rotation of older checkpoints.
        resume = getattr(self, "_resume", None)
        if resume is None or resume.saved_step != state.global_step:
            self._save_into(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        mgr = self.manager
        if mgr is not None and self.max_nonfinite_steps and mgr.nonfinite_streak >= self.max_nonfinite_steps:
            raise TrainingDiverged(
                f"dimred: the gradients were non-finite (inf or NaN) for {mgr.nonfinite_streak} optimizer steps in a "
                f"row, up to step {state.global_step}: the run diverged (lower the learning rate, check the data, "
                "or resume from an earlier checkpoint)", step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Every rank logs (metrics() holds a collective); the Trainer appended a copy of ``logs`` to
        # the history just before calling back, so that copy gets the metrics too.
        if self.manager is not None and logs is not None:
            metrics = self.manager.metrics()
            logs.update(metrics)
            if state.log_history:
                state.log_history[-1].update(metrics)
            self._logged = (self.manager.step, metrics)
            self._n_logs += 1
            if self.plot_every and self._n_logs % self.plot_every == 0:
                self._plot(args, state, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.manager is None:
            return
        if self._logged is not None and self._logged[0] == self.manager.step:
            metrics = self._logged[1]  # the Trainer logs once more just before the end: reuse, no collective
        else:
            metrics = self.manager.metrics()  # every rank calls it (collective)
        self._plot(args, state, metrics)

    def _plot(self, args, state, metrics: dict[str, float]) -> None:
        """Rank 0: save the plots next to the run and log them to the active W&B run."""
        if not state.is_world_process_zero:
            return
        try:
            from dimred_dist.integrations.plots import save_plots
        except ImportError as e:
            logger.warning("dimred: plots skipped (%s); pip install 'dimred_dist[plots]' (matplotlib)", e)
            return
        from dimred_dist.integrations.wandb import log_images

        paths = save_plots(metrics, self.manager.topology_history, Path(args.output_dir) / "dimred_plots",
                           title=f"step {state.global_step}")
        log_images(paths, extra={"train/global_step": state.global_step})


def _recipe_in_force(recipe: Recipe, checkpoint: str) -> Recipe:
    """The recipe a resumed run continues with: the one saved in the checkpoint (its topology, schedule and
    method state belong to it); a different recipe given now is named in a warning and not applied."""
    saved = read_manifest(checkpoint).recipe
    here = json.loads(json.dumps(recipe.to_dict()))
    if saved == here:
        return recipe
    keys = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
    logger.warning("dimred: this run's recipe differs from the one saved in %s (%s); the saved recipe stays in "
                   "force and is the one recorded. Start a fresh run to change it.", checkpoint, ", ".join(keys))
    return recipe_from_dict(saved, where=f"the recipe saved in {checkpoint}")


#: The dimred keys the console line keeps; the per-layer keys go to the reporters (W&B, TensorBoard) only.
CONSOLE_KEYS = ("dimred/density", "dimred/fraction/train", "dimred/churn", "dimred/optimizer/state_bytes",
                "dimred/optimizer/rank_state_bytes")


class ConsoleMetrics(TrainerCallback):
    """Placed just before the Trainer's progress / printer callback: drops from the logs it prints every
    ``dimred/`` key but :data:`CONSOLE_KEYS`, so the loss stays readable. The reporters before it and
    ``trainer.state.log_history`` keep them all."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            for k in [k for k in logs if k.startswith("dimred/") and k not in CONSOLE_KEYS]:
                del logs[k]


_CONSOLE_CALLBACKS = ("ProgressCallback", "PrinterCallback", "NotebookProgressCallback")


def _before_console(callback: TrainerCallback, owner: TrainerCallback) -> None:
    """Insert ``callback`` before the Trainer's progress / printer callback (the console), if any, in the
    callback list that holds ``owner``."""
    handler = _handler_of(owner)
    if handler is None or any(isinstance(c, ConsoleMetrics) for c in handler.callbacks):
        return
    for i, c in enumerate(handler.callbacks):
        if type(c).__name__ in _CONSOLE_CALLBACKS:
            handler.callbacks.insert(i, callback)
            return


def _handler_of(callback: TrainerCallback) -> Any | None:
    """The Trainer's callback handler whose list holds ``callback`` (found on the stack), or None."""
    return _find_on_stack(
        lambda obj: isinstance(getattr(obj, "callbacks", None), list) and any(c is callback for c in obj.callbacks)
    )


def _find_on_stack(predicate) -> Any | None:
    """The first ``self`` of a calling frame that satisfies ``predicate`` (the Trainer hands callbacks
    no handle on itself or on its callback list, so ``on_init_end`` looks them up on the stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if obj is not None and predicate(obj):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def _move_to_front(callback: TrainerCallback) -> None:
    """Put ``callback`` first among the Trainer's callbacks, so ``on_log`` adds the metrics before the
    reporting callbacks (W&B, TensorBoard, ...) read the logs; the Trainer adds its defaults first."""
    handler = _handler_of(callback)
    if handler is None:
        logger.warning("dimred: could not reorder the Trainer callbacks; reporters may log before the dimred metrics")
        return
    handler.callbacks.remove(callback)
    handler.callbacks.insert(0, callback)
