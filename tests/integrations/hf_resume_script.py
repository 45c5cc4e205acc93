"""Trainer runs that save and resume the dimred state; launched by tests/integrations/test_hf_resume.py.

    torchrun --nproc_per_node 2 hf_resume_script.py crash --attempt A --out DIR --zero-config zero2.json
        N steps, a checkpoint every 2, three runs each killed by SIGKILL once and resumed with
        ``resume_from_checkpoint=True`` by the next attempt (A = 0, 1, 2, 3: four launches, as a job
        scheduler would relaunch; each on its own port):
        L (save_total_limit=1) killed on rank 1 as it starts writing the dimred state of checkpoint-4;
        U killed on rank 0 in step 5, after its backward; W killed on rank 0 while the manifest of
        checkpoint-6 is being written. The last attempt also trains R uninterrupted and compares each
        run's final masks, weights, compact optimizer state, losses and metric counters with R's.
    [deepspeed --num_gpus 2] hf_resume_script.py resume --out DIR --resume CKPT [--zero-config Z]
        Resumes from CKPT (any world size / stage), compares the masks and weights right after the
        resume with the checkpoint's, trains to N and saves checkpoints every 2 steps.
        With ``--errors`` (one process), then resumes from a corrupted copy of CKPT and, for another
        model, from CKPT itself, and starts a fresh run whose output_dir already holds a later dimred
        checkpoint; records the errors.

Writes DIR/result_rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

import dimred_dist
from dimred_dist.distributed.checkpoint import read_full_masks
from dimred_dist.distributed.weights import full_state_dict
from dimred_dist.integrations.hf import DimRedCallback, compact_optimizer

K, N = 4, 8


class Probe(TrainerCallback):
    """Right after the dimred callback restored (or chose) the topology: local masks and weights."""

    def __init__(self, dimred: DimRedCallback) -> None:
        self.dimred = dimred
        self.begin = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = snapshot(self.dimred.manager)
        opt = self.dimred.manager.optimizer
        self.optimizer_steps = sorted({float(st["step"]) for st in opt.state.values() if "step" in st})


def snapshot(mgr) -> dict:
    return {n: (v.start, v.end, mgr.state[n].keep.clone(), mgr.state[n].train.clone(), v.weight().detach().clone())
            for n, v in mgr.views.items()}


def build(out: Path, zero_config: str | None, n_embd: int = 32, save_steps: int = K,
          steps: int = N, extra: list | None = None, **training):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, n_positions=16, vocab_size=61))
    ids = torch.randint(0, 61, (64, 16), generator=torch.Generator().manual_seed(1))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="steps", save_steps=save_steps, report_to=[], use_cpu=True, deepspeed=zero_config,
        disable_tqdm=True, max_grad_norm=1.0, seed=0, data_seed=0, **training,
    )
    recipe = dimred_dist.load_recipe({"method": "rigl", "sparsity": 0.8, "args": {"update_interval": 2}})
    dimred = DimRedCallback(recipe)
    probe = Probe(dimred)
    callbacks = [dimred, probe] + (extra or [])
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks,
                      optimizer_cls_and_kwargs=compact_optimizer(args))
    return trainer, dimred, probe


def opt_state(trainer) -> dict[str, torch.Tensor]:
    inner = trainer.optimizer
    while not isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return {f"{g}.{i}.{k}": v.clone() for g, group in enumerate(inner.param_groups)
            for i, p in enumerate(group["params"]) for k, v in inner.state[p].items()}


def losses_after(trainer, step: int) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > step]


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


class KillInStep(TrainerCallback):
    """SIGKILL this process after the backward of the step that follows ``global_step == step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_when(module, name: str, folder: str, arg: int) -> None:
    """Replace ``module.name`` by a function that SIGKILLs this process when its argument ``arg`` is ``.../folder``."""
    orig = getattr(module, name)

    def wrapped(*args, **kwargs):
        if Path(args[arg]).name == folder:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*args, **kwargs)

    setattr(module, name, wrapped)


def final_state(trainer, dimred) -> dict:
    mgr = dimred.manager
    metrics = mgr.metrics()
    return {"snapshot": snapshot(mgr), "opt": opt_state(trainer), "losses": losses_after(trainer, 0),
            "counters": {k: v for k, v in metrics.items() if k in COUNTERS}, "steps": [trainer.state.global_step,
                                                                                        mgr.step],
            "resumed_from": None if dimred._resume.checkpoint is None else Path(dimred._resume.checkpoint).name}


COUNTERS = ("dimred/topology_updates", "dimred/churn", "dimred/last_update_step", "dimred/itop_rate",
            "dimred/drop_fraction")


def crash(a) -> dict | None:
    """One attempt of the elastic chain (see the module docstring); the last returns the comparison."""
    import dimred_dist.distributed.checkpoint as ckpt
    import dimred_dist.integrations.hf as hf

    out, attempt, z = Path(a.out), a.attempt, a.zero_config
    kw = {"save_steps": 2}

    def resume_and_keep(label: str, **training) -> None:
        t, d, _ = build(out / label, z, **kw, **training)
        t.train(resume_from_checkpoint=True)
        torch.save(final_state(t, d), out / f"{label}_rank{rank()}.pt")

    if attempt == 0:
        if rank() == 1:
            kill_when(hf, "save_dimred_state", "checkpoint-4", 1)
        build(out / "L", z, **kw, save_total_limit=1)[0].train()
    elif attempt == 1:
        resume_and_keep("L", save_total_limit=1)
        build(out / "U", z, **kw, extra=[KillInStep(4)] if rank() == 0 else [])[0].train()
    elif attempt == 2:
        resume_and_keep("U")
        if rank() == 0:
            kill_when(ckpt, "hash_tree", "checkpoint-6", 0)
        build(out / "W", z, **kw)[0].train()
    else:
        resume_and_keep("W")
        t, d, _ = build(out / "R", z, **kw)
        t.train()
        ref = final_state(t, d)
        result = {"attempt": attempt, "ref_counters": ref["counters"], "ref_losses": ref["losses"]}
        for label in ("L", "U", "W"):
            got = torch.load(out / f"{label}_rank{rank()}.pt", weights_only=False)
            result[label] = {
                "resumed_from": got["resumed_from"], "steps": got["steps"], "losses": got["losses"],
                "counters": got["counters"],
                "masks_equal": all(torch.equal(ref["snapshot"][n][i], got["snapshot"][n][i])
                                   for n in ref["snapshot"] for i in (2, 3)),
                "weights_equal": all(torch.equal(ref["snapshot"][n][4], got["snapshot"][n][4])
                                     for n in ref["snapshot"]),
                "opt_state_equal": equal(ref["opt"], got["opt"]), "opt_state_keys": len(got["opt"]),
                "folders": sorted(p.name for p in (out / label).iterdir() if p.is_dir()),
            }
        return result
    return None


def masks_match(begin: dict, saved: dict) -> bool:
    return all(torch.equal(keep, saved[n][0][s:e]) and torch.equal(train, saved[n][1][s:e])
               for n, (s, e, keep, train, _) in begin.items())


def resume(a) -> dict:
    trainer, dimred, probe = build(Path(a.out), a.zero_config, steps=a.steps)
    trainer.train(resume_from_checkpoint=a.resume)
    start = json.loads(Path(a.resume, "trainer_state.json").read_text())["global_step"]
    saved = read_full_masks(a.resume)
    weights = full_state_dict(a.resume)
    mgr = dimred.manager
    max_pruned = max(float(v.weight()[~mgr.state[n].keep].abs().sum()) for n, v in mgr.views.items())
    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "zero_stage": mgr.adapter.topology.zero_stage,
        "begin_masks_equal_saved": masks_match(probe.begin, saved),
        "begin_weights_equal_saved": all(torch.equal(w, weights[n].float().reshape(-1)[s:e])
                                         for n, (s, e, _, _, w) in probe.begin.items()),
        "local_entries": sum(e - s for s, e, *_ in probe.begin.values()),
        "begin_optimizer_steps": probe.optimizer_steps,
        "steps": [trainer.state.global_step, mgr.step], "sum_abs_pruned": max_pruned,
        "losses": losses_after(trainer, start), "start": start, "lr_last": trainer.lr_scheduler.get_last_lr()[0],
        "density": mgr.metrics()["dimred/density"],
    }


class Planted:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(out: Path, src: Path) -> dict:
    """The weights of a checkpoint whose optimizer file was replaced by a pickle that runs code, read the way
    a resume at another world size reads them (zero_to_fp32), without the checksum check in front."""
    from dimred_dist.distributed.weights import full_state_dict

    copy = out / "planted"
    shutil.copytree(src, copy)
    marker = out / "the_pickle_ran"
    [f] = sorted(copy.glob("global_step*/zero_pp_rank_0_*optim_states.pt"))
    torch.save({"optimizer_state_dict": Planted(str(marker))}, f)  # a torch zip file whose pickle runs code
    try:
        full_state_dict(copy)
        error = None
    except Exception as e:  # noqa: BLE001 - the test inspects the error
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "ran": marker.exists()}


def errors(out: Path, src: Path) -> dict:
    result = {"planted_pickle": planted_pickle(out, src)}
    bad = out / "corrupt"
    shutil.copytree(src, bad)
    f = bad / "dimred" / "rank0.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-1] ^= 0xFF
    f.write_bytes(bytes(blob))
    stale = out / "run_later_checkpoint" / src.name  # a fresh run whose output_dir holds a later checkpoint
    shutil.copytree(src, stale)
    for label, ckpt, n_embd in (("checksum", bad, 32), ("other_model", src, 48), ("later_checkpoint", stale, 32)):
        before = {p: p.read_bytes() for p in Path(ckpt).rglob("*") if p.is_file()}
        trainer, dimred, _ = build(out / f"run_{label}", None, n_embd=n_embd)
        try:
            trainer.train(resume_from_checkpoint=None if label == "later_checkpoint" else str(ckpt))
            result[label] = {"error": None}
        except Exception as e:  # noqa: BLE001 - the test inspects the error
            result[label] = {"error": type(e).__name__, "message": str(e)}
        after = {p: p.read_bytes() for p in Path(ckpt).rglob("*") if p.is_file()}
        result[label]["checkpoint_untouched"] = before == after
        result[label]["saved_checkpoints"] = sorted(p.name for p in (out / f"run_{label}").glob("checkpoint-*")
                                                    if p != stale)
        result[label]["manager_built"] = dimred.manager is not None  # no step can have run without it
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["resume", "crash"])
    p.add_argument("--out", required=True)
    p.add_argument("--zero-config", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--steps", type=int, default=N)
    p.add_argument("--attempt", type=int, default=0)
    p.add_argument("--errors", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    a = p.parse_args()
    if os.environ.get("DIMRED_HANG_DUMP_S"):  # debugging aid: stacks of a hung rank, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["DIMRED_HANG_DUMP_S"]), exit=True)
    result = {"resume": resume, "crash": crash}[a.mode](a)
    if a.errors:
        result["errors"] = errors(Path(a.out) / "errors", Path(a.resume))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, f"result_rank{rank()}.json").write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
