"""How this process was launched, which DeepSpeed config applies, and whether it fits the training args.

The launcher decides the distribution, read from the environment it sets:

* ``accelerate launch`` with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED=true``): accelerate
  builds the DeepSpeed plugin from its own config, so ``deepspeed=`` must *not* be passed to
  ``TrainingArguments`` (accelerate would raise); the job's ``deepspeed`` JSON, if any, must equal
  the one the accelerate config names.
* ``deepspeed``, ``torchrun`` (also multi-node, also under SLURM) and other launchers that set
  ``WORLD_SIZE``: the job's JSON goes to ``TrainingArguments(deepspeed=...)``; without one, DDP.
* plain ``python``: one process, no distribution; a DeepSpeed JSON in the job is not used
  (DeepSpeed would look for MPI to find its peers).

All checks here run before anything is built, so a conflict costs no start-up time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dimred_dist.cli.job import JobConfig, read_deepspeed_json, training_defaults

__all__ = ["RunPlan", "check_deepspeed_config", "plan_run"]


@dataclass(frozen=True)
class RunPlan:
    """What the CLI does in this process.

    Attributes:
        launcher: ``accelerate``, ``deepspeed``, ``torchrun``, ``other`` (``WORLD_SIZE`` set by
            something else) or ``python``.
        world_size: Processes in the job.
        deepspeed_config: The DeepSpeed config that will run (None: no DeepSpeed).
        deepspeed_source: Where it came from (a file path, or accelerate's config).
        pass_to_training_args: Whether ``TrainingArguments(deepspeed=...)`` gets the config.
    """

    launcher: str
    world_size: int
    deepspeed_config: dict[str, Any] | None
    deepspeed_source: str | None
    pass_to_training_args: bool


def detect_launcher(env: Mapping[str, str]) -> str:
    """The launcher that started this process, from the variables it sets."""
    if "ACCELERATE_MIXED_PRECISION" in env or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "accelerate"
    if "WORLD_SIZE" not in env:
        return "python"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    return "deepspeed" if "LOCAL_SIZE" in env else "other"


def plan_run(job: JobConfig, env: Mapping[str, str] | None = None) -> RunPlan:
    """Decide how DeepSpeed is used and check its config against ``job.training``.

    Raises:
        ValueError: If the DeepSpeed configs of the job and of accelerate disagree, or the DeepSpeed
            config conflicts with the training arguments or with dimred_dist.
    """
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    world_size = int(env.get("WORLD_SIZE", "1"))
    ds, source, pass_it = job.deepspeed_config, job.deepspeed, True
    if launcher == "accelerate":
        pass_it = False
        if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            ds, source = _accelerate_deepspeed(job, env)
        elif job.deepspeed is not None:
            raise ValueError(
                f"deepspeed: the job names {job.deepspeed}, but accelerate was not launched with a DeepSpeed config; "
                "use launch/accelerate/zero{1,2,3}.yaml or set deepspeed: null"
            )
    elif launcher == "python":
        pass_it = False
    if ds is not None:
        check_deepspeed_config(ds, job.training, world_size=world_size, source=source)
    if launcher == "python":
        ds = None
    return RunPlan(launcher, world_size, ds, source if ds is not None else None, pass_it and ds is not None)


def _accelerate_deepspeed(job: JobConfig, env: Mapping[str, str]) -> tuple[dict[str, Any] | None, str | None]:
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path in (None, "", "none", "None"):
        if job.deepspeed is not None:
            raise ValueError(
                f"deepspeed: the job names {job.deepspeed}, but the accelerate config sets DeepSpeed inline; point its "
                "deepspeed_config_file at that JSON or set deepspeed: null in the job"
            )
        offload = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
        if offload != "none":
            raise ValueError(f"accelerate config: offload_optimizer_device={offload} is not supported by dimred_dist")
        return None, "accelerate config"
    ds = read_deepspeed_json(path, "accelerate config deepspeed_config_file")
    if job.deepspeed is not None and job.deepspeed_config != ds:
        raise ValueError(
            f"deepspeed: the job names {job.deepspeed} but accelerate launches with {path}, a different DeepSpeed "
            "config; make them the same file or set deepspeed: null in the job"
        )
    return ds, path


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_deepspeed_config(ds: Mapping[str, Any], training: Mapping[str, Any], *, world_size: int = 1,
                           source: str | None = None) -> None:
    """Raise one ``ValueError`` listing every conflict between a DeepSpeed config, the training
    arguments (``TrainingArguments`` keyword arguments; defaults fill the rest) and dimred_dist."""
    where = source or "DeepSpeed config"
    problems = _unsupported(ds)
    args = {**training_defaults(), **training}
    ga = args["gradient_accumulation_steps"]
    bs = args["per_device_train_batch_size"]
    pairs = [
        ("train_micro_batch_size_per_gpu", bs, "per_device_train_batch_size"),
        ("gradient_accumulation_steps", ga, "gradient_accumulation_steps"),
        ("train_batch_size", bs * ga * world_size, f"batch size x accumulation x world size {world_size}"),
        ("gradient_clipping", args["max_grad_norm"], "max_grad_norm"),
        ("bf16.enabled", bool(args["bf16"]), "bf16"),
        ("fp16.enabled", bool(args["fp16"]), "fp16"),
        ("scheduler.params.warmup_max_lr", args["learning_rate"], "learning_rate"),
    ]
    for ds_key, value, arg in pairs:
        got = _get(ds, ds_key)
        if got is None or got == "auto":
            continue
        differs = bool(got) != value if isinstance(value, bool) else float(got) != float(value)
        if differs:
            problems.append(f"{ds_key}={got!r} but training {arg} = {value!r} (set it to \"auto\" or make them match)")
    if problems:
        raise ValueError(f"{where} conflicts with the job: " + "; ".join(problems))


def _unsupported(ds: Mapping[str, Any]) -> list[str]:
    """Settings dimred_dist cannot serve (mirrors what the ZeRO adapter rejects at start-up)."""
    from dimred_dist.distributed.ds_config import config_typos

    out = config_typos(ds)
    if "optimizer" in ds:
        out.append(
            'an "optimizer" section: DeepSpeed would build its own dense optimizer and bypass dimred_dist\'s compact '
            "optimizer; remove it (training's learning_rate, adam_beta1/2, adam_epsilon and weight_decay apply)"
        )
    stage = _get(ds, "zero_optimization.stage")
    if stage not in (1, 2, 3):
        out.append(f"zero_optimization.stage={stage!r}: dimred_dist runs under ZeRO stage 1, 2 or 3")
    for key in ("zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device"):
        device = _get(ds, key)
        if device not in (None, "none"):
            out.append(f"{key}={device!r}: offload is not supported by dimred_dist yet")
    if _get(ds, "zero_optimization.round_robin_gradients"):
        out.append("zero_optimization.round_robin_gradients=true breaks DeepSpeed's parameter-to-partition mapping")
    bf16 = _get(ds, "bf16.enabled") not in (None, False)
    if stage == 1 and bf16 and _get(ds, "data_types.grad_accum_dtype") == "fp32":
        out.append("ZeRO stage 1 with bf16 and data_types.grad_accum_dtype=fp32 (BF16_Optimizer) is not served")
    return out
