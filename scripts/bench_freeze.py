#!/usr/bin/env python
"""What freezing layers mid-run saves under DeepSpeed ZeRO: forward, backward and optimizer-step time,
and the optimizer state, before and after FreezeOut freezes the input side of a GPT-2.

Launch with 2 processes (``bash scripts/bench_freeze.sh`` does this)::

    torchrun --nproc_per_node 2 --master_port 29563 scripts/bench_freeze.py [--stage 2] [--json PATH] [--quick]

Three configurations of the same GPT-2 (6 blocks of width 256, 4096-token vocabulary, untied head,
random init, the same seed and batches), each with the client optimizer ``CompactAdamW``, fp32, run one
after another on a fresh engine:

* **dense**: every parameter trains (run first and again last; the ratios are to the mean of both);
* **freezeout**: the ``freezeout`` method manages the token and position embeddings and blocks 0-3
  (biases and norms included) as one group that moves to FREEZE half-way through the run (``t0``
  0.5, linear scale); the first half of the timed steps is before, the second half after;
* **requires_grad**: the same parameters with ``requires_grad=False`` before the engine is built
  (what a recipe's ``freeze`` list does): the lower bound, where autograd stops at block 4.

Each step is timed in three parts between barriers (forward, ``engine.backward``, ``engine.step``),
the larger of the ranks' times; a phase reports the medians over its ``--steps`` timed steps (after
``--warmup`` untimed ones) and the compact optimizer's state after its last step, summed over the
ranks and on the rank holding the most. Records (``--json``): ``config``, ``phase``, ``forward_s``,
``backward_s``, ``step_s``, ``total_s``, ``opt_state_bytes``, ``opt_state_bytes_max``,
``trainable_at_build``, ``freeze_step``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
FROZEN = r"^transformer\.(wte|wpe|h\.[0-3])\."


def model(quick: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=6, n_embd=64 if quick else 256, n_head=4, vocab_size=4096, n_positions=128,
                     tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def ds_config(stage: int, batch: int) -> dict:
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}}


def timed(fn) -> tuple[float, object]:
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt[0]), out


def state_bytes(engine) -> tuple[int, int]:
    """The compact optimizer's state: summed over the ranks, and on the rank holding the most."""
    t = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    t[dist.get_rank()] = engine.optimizer.optimizer.state_bytes()
    dist.all_reduce(t)
    return int(t.sum()), int(t.max())


def run(config: str, args, label: str = "all") -> list[dict]:
    import deepspeed

    import dimred_dist as dd
    from dimred_dist.integrations.deepspeed import attach_to_engine
    from dimred_dist.optim import CompactAdamW

    net = model(args.quick)
    if config == "requires_grad":
        import re

        for n, p in net.named_parameters():
            if re.search(FROZEN, n):
                p.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=net, optimizer=CompactAdamW(trainable, lr=1e-4),
                                      config=ds_config(args.stage, args.batch))
    total = args.warmup + 2 * args.steps
    mgr = None
    if config == "freezeout":
        recipe = dd.load_recipe({"method": "freezeout", "sparsity": 0.0,
                                 "targets": {"include": [FROZEN], "biases": True, "norms": True},
                                 "args": {"groups": [FROZEN], "t0": 0.5, "scale": "linear"}})
        mgr = attach_to_engine(recipe, engine, total_steps=2 * (args.warmup + args.steps))
    n_train = sum(p.numel() for p in trainable)
    rank = dist.get_rank()
    rows, phase_rows, held = [], {}, {}
    for t in range(total):
        g = torch.Generator().manual_seed(1000 * rank + t)
        ids = torch.randint(0, 4096, (args.batch, args.seq_len), generator=g)
        t_f, loss = timed(lambda ids=ids: engine(input_ids=ids, labels=ids).loss)
        t_b, _ = timed(lambda loss=loss: engine.backward(loss))
        t_s, _ = timed(engine.step)
        if t < args.warmup:
            continue
        phase = "before" if config == "freezeout" and t < args.warmup + args.steps else (
            "after" if config == "freezeout" else label)
        phase_rows.setdefault(phase, []).append((t_f, t_b, t_s))
        held[phase] = state_bytes(engine)  # after this phase's latest step
    frozen_at = None if mgr is None else mgr.method.freeze_steps[0]
    for phase, times in phase_rows.items():
        f, b, s = (statistics.median(x[i] for x in times) for i in range(3))
        rows.append({"config": config, "phase": phase, "forward_s": f, "backward_s": b, "step_s": s,
                     "total_s": f + b + s, "opt_state_bytes": held[phase][0], "opt_state_bytes_max": held[phase][1],
                     "trainable_at_build": n_train,
                     "freeze_step": frozen_at})
    engine.destroy()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per phase (default 8)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="width 64, 2 timed steps per phase (smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq_len = 2, 1, 2, 32
    warnings.filterwarnings("ignore")
    import deepspeed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    logging.getLogger("dimred_dist").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rows = []
    rows += run("dense", args, "first")
    rows += run("freezeout", args)
    rows += run("requires_grad", args)
    rows += run("dense", args, "last")
    if dist.get_rank() == 0:
        ds = [r for r in rows if r["config"] == "dense"]
        dense = {k: statistics.mean(r[k] for r in ds) for k in ("forward_s", "backward_s", "step_s", "total_s")}
        print(f"bench_freeze: ZeRO-{args.stage}, 2 ranks, GPT-2 6 x {64 if args.quick else 256}, "
              f"{args.batch} x {args.seq_len} tokens per rank; medians of {args.steps} steps, ratios to the mean "
              "of the two dense runs")
        print("| config | phase | forward | backward | optimizer step | step | optimizer state: all ranks | "
              "largest rank |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {r['phase']} | {r['forward_s'] / dense['forward_s']:.2f} | "
                  f"{r['backward_s'] / dense['backward_s']:.2f} | {r['step_s'] / dense['step_s']:.2f} | "
                  f"{r['total_s'] / dense['total_s']:.2f} ({r['total_s'] * 1000:.0f} ms) | "
                  f"{r['opt_state_bytes'] / 2**20:.2f} MiB | {r['opt_state_bytes_max'] / 2**20:.2f} MiB |")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
