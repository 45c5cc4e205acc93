"""``dimred-train``: run a YAML-described training job with a dimred_dist recipe.

    dimred-train --config configs/jobs/tiny_gpt2_fortunes.yaml                       # one process
    deepspeed --num_gpus 2 --module dimred_dist.cli.train --config JOB.yaml         # DeepSpeed launcher
    accelerate launch --config_file launch/accelerate/zero2.yaml -m dimred_dist.cli.train --config JOB.yaml
    torchrun --nnodes 2 --node_rank R ... -m dimred_dist.cli.train --config JOB.yaml  # see launch/

``--set section.key=value`` overrides one job value (parsed as YAML) before validation;
``--check`` validates the job against this launch and exits. The whole job (model, data, recipe,
DeepSpeed JSON, training arguments and their conflicts) is validated before anything is built or
written. At the end rank 0 writes ``<output_dir>/dimred_summary.json``: the optimizer chain inside
the engine, the manager's metrics, the largest |w| over pruned entries of the gathered weights,
losses and timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dimred_dist.cli.job import JobConfig, ModelConfig, load_job
from dimred_dist.cli.plan import RunPlan, plan_run
from dimred_dist.core.logging import get_logger

logger = get_logger("dimred_dist.cli.train")

SUMMARY_FILE = "dimred_summary.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dimred-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the job YAML (model, data, recipe, deepspeed, training)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job value, e.g. training.max_steps=20 or recipe.sparsity=0.8 (repeatable)")
    p.add_argument("--check", action="store_true", help="validate the job for this launch and exit")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        job = load_job(args.config, args.set)
        plan = plan_run(job)
        training_args = training_arguments(job, plan)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"dimred-train: invalid job {args.config}: {e}", file=sys.stderr)
        return 2
    logger.info(
        "dimred-train: launcher %s, world size %d, DeepSpeed %s, recipe %s at sparsity %.3f",
        plan.launcher, plan.world_size, plan.deepspeed_source or "off", job.recipe.method, job.recipe.sparsity,
    )
    if plan.launcher == "python" and job.deepspeed is not None:
        logger.warning("dimred-train: started by plain python, so %s is not used (no distribution)", job.deepspeed)
    if args.check:
        return 0
    from dimred_dist.integrations.hf import TrainingDiverged

    try:
        run(job, plan, training_args, job_path=args.config)
    except TrainingDiverged as e:
        print(f"dimred-train: {e}", file=sys.stderr)
        if int(os.environ.get("RANK", "0")) == 0:
            path = Path(training_args.output_dir, SUMMARY_FILE)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"job": args.config, "status": "diverged", "error": str(e),
                                        "global_step": e.step}, indent=1))
        return 3
    return 0


def training_arguments(job: JobConfig, plan: RunPlan) -> Any:
    """``TrainingArguments`` from the job; value errors are reported as the job's."""
    import torch
    from transformers import TrainingArguments

    kwargs = dict(job.training)
    kwargs.setdefault("use_cpu", not torch.cuda.is_available())
    if plan.pass_to_training_args:
        kwargs["deepspeed"] = copy.deepcopy(plan.deepspeed_config)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"training: {e}") from None


def load_tokenizer(mc: ModelConfig) -> Any:
    """The pretrained / named tokenizer, else the byte-level fallback."""
    from dimred_dist.cli.data import ByteTokenizer

    path = mc.tokenizer or mc.pretrained
    if path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and mc.task == "sequence-classification":
        if tok.eos_token is None:
            raise ValueError(f"model.tokenizer: {path} has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    return tok


def build_model(mc: ModelConfig, label_names: list[str] | None, pad_token_id: int | None) -> Any:
    """The model for the job's task: from the pretrained folder, or randomly initialized from its config."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if mc.task == "causal-lm" else AutoModelForSequenceClassification
    extra: dict[str, Any] = {}
    if mc.task == "sequence-classification":
        extra = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
        if pad_token_id is not None:
            extra["pad_token_id"] = pad_token_id
    if mc.pretrained is not None:
        model = auto.from_pretrained(mc.pretrained, **extra)
    else:
        config = mc.hf_config()
        for key, value in extra.items():
            setattr(config, key, value)
        model = auto.from_config(config)
    if mc.task == "sequence-classification":
        # The classification heads average their loss over the local batch and ignore the
        # ``num_items_in_batch`` the Trainer passes to any forward with ``**kwargs``; the Trainer then
        # multiplies the loss by the world size (average_tokens_across_devices), so gradients and the
        # logged loss would be world-size times too large. Declaring the model kwarg-blind stops that.
        model.accepts_loss_kwargs = False
    return model


def run(job: JobConfig, plan: RunPlan, args: Any, *, job_path: str) -> dict[str, Any]:
    """Build everything, train, evaluate, save (unless ``save_strategy`` is ``no``), write the summary."""
    import torch.distributed as dist
    from transformers import Trainer, default_data_collator, set_seed

    from dimred_dist.cli import data as data_mod
    from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer

    t0 = time.perf_counter()
    set_seed(args.seed)
    tokenizer = load_tokenizer(job.model)
    with args.main_process_first(local=False, desc="dimred-train: load and tokenize the data"):
        raw = data_mod.load_raw(job.data)
        if job.model.task == "causal-lm":
            ds = data_mod.causal_lm(raw, tokenizer, job.data)
        else:
            ds = data_mod.sequence_classification(raw, tokenizer, job.data, job.model.num_labels)
    model = build_model(job.model, ds.label_names, ds.pad_token_id)
    callback = DimRedCallback(job.recipe, max_nonfinite_steps=job.max_nonfinite_steps)
    trainer = Trainer(
        model=model, args=args, train_dataset=ds.train, eval_dataset=ds.validation,
        data_collator=default_data_collator, callbacks=[callback], optimizer_cls_and_kwargs=compact_optimizer(args),
        processing_class=None if isinstance(tokenizer, data_mod.ByteTokenizer) else tokenizer,
        compute_metrics=accuracy if job.model.task == "sequence-classification" else None,
    )
    t_train = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - t_train
    evaluation = trainer.evaluate() if ds.validation is not None else {}
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
        trainer.save_model()
    summary = summarize(trainer, callback, job, plan, job_path=job_path)
    summary.update(train_loss=out.training_loss, eval_loss=evaluation.get("eval_loss"),
                   eval_accuracy=evaluation.get("eval_accuracy"), train_seconds=train_seconds,
                   total_seconds=time.perf_counter() - t0)
    if trainer.is_world_process_zero():
        path = Path(args.output_dir, SUMMARY_FILE)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str))
        logger.info("dimred-train: done in %.1fs; summary in %s", summary["total_seconds"], path)
    if dist.is_available() and dist.is_initialized():
        # A clean shutdown: without it ZeRO runs occasionally abort at exit.
        dist.barrier()
        dist.destroy_process_group()
    return summary


def accuracy(eval_pred: Any) -> dict[str, float]:
    """Fraction of validation examples whose arg-max logit is the label."""
    logits, labels = eval_pred
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def optimizer_chain(optimizer: Any) -> list[str]:
    """Class names from the Trainer's optimizer inwards (wrapper, ZeRO optimizer, client optimizer)."""
    names, obj = [], optimizer
    for _ in range(5):
        if obj is None:
            break
        names.append(type(obj).__name__)
        obj = getattr(obj, "optimizer", None)
    return names


def summarize(trainer: Any, callback: Any, job: JobConfig, plan: RunPlan, *, job_path: str) -> dict[str, Any]:
    """What ran and how it ended; collective (every rank must call it)."""
    import torch
    import torch.distributed as dist

    mgr = callback.manager
    model = getattr(trainer.model_wrapped, "module", trainer.model_wrapped)
    stage = getattr(getattr(mgr.adapter, "topology", None), "zero_stage", None)
    max_pruned = _max_abs_pruned(mgr, stage)
    chain = optimizer_chain(trainer.optimizer)
    rank = {"rank": dist.get_rank() if dist.is_initialized() else 0, "inner_optimizer": chain[-1],
            "opt_state_bytes": mgr.optimizer.state_bytes() if hasattr(mgr.optimizer, "state_bytes") else None}
    ranks = [rank]
    if dist.is_initialized():
        t = torch.tensor([max_pruned], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        max_pruned = float(t.item())
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rank)
    return {
        "job": job_path, "status": "completed", "launcher": plan.launcher, "world_size": plan.world_size,
        "deepspeed": plan.deepspeed_source,
        "zero_stage": stage, "engine": type(trainer.model_wrapped).__name__, "optimizer_chain": chain,
        "inner_optimizer": chain[-1], "ranks": ranks, "recipe": mgr.recipe.to_dict(),
        "frozen_tensors": [n for n, p in model.named_parameters() if not p.requires_grad],
        # ZeRO-3 leaves each module parameter empty outside a gather; ds_numel is its full size.
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad),
        "global_step": trainer.state.global_step, "manager_step": mgr.step, "metrics": mgr.metrics(),
        "max_abs_pruned": max_pruned, **entry_counts(model, mgr),
    }


def entry_counts(model: Any, mgr: Any) -> dict[str, int]:
    """``model_entries``: every entry of the model; ``trainable_entries``: the TRAIN entries of the managed
    tensors plus every entry of the trainable tensors it does not manage (collective)."""
    from dimred_dist.core.state import ElementState

    numel = {n: getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()}
    counts = mgr.global_counts()
    managed_train = sum(int(c[ElementState.TRAIN]) for c in counts.values())
    unmanaged = sum(numel[n] for n, p in model.named_parameters() if p.requires_grad and n not in counts)
    return {"model_entries": sum(numel.values()), "trainable_entries": managed_train + unmanaged}


def _max_abs_pruned(mgr: Any, stage: int | None) -> float:
    """Largest |w| over this rank's PRUNE entries, read from the module's (gathered) weights."""
    import torch

    from dimred_dist.distributed.zero import gathered_parameters

    out = 0.0
    with gathered_parameters(list(mgr.params.values()), stage), torch.no_grad():
        for name, v in mgr.views.items():
            full = mgr.params[name].detach().reshape(-1)[v.start : v.end].float()
            pruned = full[~mgr.state[name].keep]
            if pruned.numel():
                out = max(out, float(pruned.abs().max()))
    return out


if __name__ == "__main__":
    sys.exit(main())
