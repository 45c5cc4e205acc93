"""Fidelity run: dynamic sparse training and FreezeNet on a small GPT-2 trained from scratch as a causal
language model on Debian's fortunes, against dense, at 80% and 90% sparsity.

    python scripts/compare_dst.py --json runs/compare_dst.json     # ~15 min on 2 cores
    python scripts/compare_dst.py --quick                           # one seed, 40 steps (smoke test)

Every cell trains the same GPT-2 (2 layers, width 128, 4 heads, 64 positions, bytes as tokens: 257
entries with an end-of-fortune token) from its config at random init, for the same token budget
(``--steps`` x 16 sequences x 64 tokens, random windows of the training text), with AdamW (lr 1e-3,
20 warm-up steps, cosine decay, no weight decay) in one process. The managed entries are the weights
of the transformer blocks' linear layers (attention and MLP); the embeddings, norms and biases stay
dense. Training text: the art, computers, food, law, literature, people, politics and wisdom files;
held out: science (validation perplexity over its first 64 windows of 64 tokens).

Methods (each its shipped rule, at the recipe defaults except the update interval ``--interval``):
static ERK random, SET (constant drop 0.3), RigL (cosine drop 0.3, no step on update steps), SNFS
(ceil(p * active) removed with p = 0.5 cosine, regrowth redistributed by mean |momentum|), MEST
(mutation 2% -> 1% -> 0 of each layer), GraNet (dense to sparse along the cubic schedule to 75% of
training, global magnitude pruning with same-step gradient regrowth), Top-KAST (forward set the top
|w| at the sparsity, backward set 10 points denser, both recomputed every ``--interval`` steps, penalty
1e-4), FreezeNet (SNIP saliency on one
batch chooses the TRAIN entries, the rest FREEZE at init). The ITOP rate is the fraction of managed
entries that were ever active (not pruned; for Top-KAST, ever in the backward set); for FreezeNet
every entry stays in the forward pass (1.0).
Records (JSON): ``method``, ``sparsity``, ``seed``, ``val_ppl``, ``itop``, ``train_fraction``, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dimred_dist as dd  # noqa: E402
from dimred_dist.optim import CompactAdamW  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
TRAIN = ["art", "computers", "food", "law", "literature", "people", "politics", "wisdom"]
VALID = ["science"]
METHODS = ["dense", "static", "set", "rigl", "snfs", "mest", "granet", "topkast", "freezenet"]
SEQ, BATCH, EOS = 64, 16, 256
TARGETS = {"include": [r"\.h\.\d+\."], "exclude": [r"\.ln_"]}


def corpus(names: list[str]) -> torch.Tensor:
    """The fortunes of the named topic files as bytes, each followed by the end-of-fortune token."""
    out: list[int] = []
    for name in names:
        for fortune in (FORTUNES / name).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = fortune.strip("%\n ")
            if text:
                out += list(text.encode("utf-8")) + [EOS]
    return torch.tensor(out, dtype=torch.int64)


def gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=SEQ, vocab_size=257, bos_token_id=EOS,
                     eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def recipe(method: str, sparsity: float, seed: int, interval: int) -> dd.Recipe | None:
    base = {"sparsity": sparsity, "seed": seed, "targets": TARGETS}
    specs = {
        "dense": None,
        "static": {"method": "random", "distribution": "erk"},
        "set": {"method": "set", "distribution": "erk",
                "schedule": {"kind": "periodic", "interval": interval, "drop_fraction": 0.3, "decay": "constant"}},
        "rigl": {"method": "rigl", "distribution": "erk",
                 "schedule": {"kind": "periodic", "interval": interval, "drop_fraction": 0.3, "decay": "cosine"}},
        "snfs": {"method": "snfs", "distribution": "uniform",
                 "schedule": {"kind": "periodic", "interval": interval, "drop_fraction": 0.5, "decay": "cosine",
                              "end_fraction": 1.0, "skip_step": False}},
        "mest": {"method": "mest", "distribution": "uniform",
                 "schedule": {"kind": "periodic", "interval": interval, "end_fraction": 1.0, "skip_step": False}},
        "granet": {"method": "granet", "distribution": "global",
                   "schedule": {"kind": "cubic", "interval": interval, "end_fraction": 0.75}},
        "topkast": {"method": "topkast", "distribution": "uniform", "args": {"interval": interval}},
        "freezenet": {"method": "freezenet", "distribution": "global", "args": {"batches": 1}},
    }
    spec = specs[method]
    return None if spec is None else dd.load_recipe({**base, **spec})


def windows(stream: torch.Tensor, n: int, gen: torch.Generator | None) -> torch.Tensor:
    """``n`` windows of SEQ tokens: at random offsets (``gen``), or the first ``n`` consecutive ones."""
    if gen is None:
        return stream[: n * SEQ].view(n, SEQ)
    starts = torch.randint(0, len(stream) - SEQ, (n,), generator=gen)
    return torch.stack([stream[s : s + SEQ] for s in starts.tolist()])


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def run(method: str, sparsity: float, seed: int, data, *, steps: int, interval: int) -> dict:
    train, valid = data
    model = gpt2(seed)
    r = recipe(method, sparsity, seed, interval)
    opt = CompactAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warm = 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    gen = torch.Generator().manual_seed(1000 + seed)
    mgr = None
    t0 = time.perf_counter()
    if r is not None:
        probe = dd.ProbeData([{"input_ids": (b := windows(train, BATCH, torch.Generator().manual_seed(seed))),
                               "labels": b}])
        mgr = dd.DimRedManager(r, model, total_steps=steps).prepare(probe=probe)
        mgr.attach(opt, pre_step=False, lr_scheduler=sched)
    model.train()
    for _ in range(steps):
        lm_loss(model, windows(train, BATCH, gen)).backward()
        if mgr is not None:  # masks (and Top-KAST's penalty) before the norm is clipped
            mgr.before_optimizer_step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ids = windows(valid, 64, None)
        val = float(sum(lm_loss(model, ids[i : i + 16]) for i in range(0, 64, 16)) / 4)
    m = mgr.metrics() if mgr is not None else {}
    # static topologies: the ever-active fraction is the density
    itop = m.get("dimred/itop_rate", m.get("dimred/density", 1.0))
    return {"method": method, "sparsity": sparsity, "seed": seed, "val_ppl": math.exp(val), "itop": itop,
            "train_fraction": m.get("dimred/fraction/train", 1.0), "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (16 x 64 tokens each)")
    p.add_argument("--interval", type=int, default=25, help="steps between topology updates (Delta T)")
    p.add_argument("--sparsities", default="0.8,0.9")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="1 seed, 40 steps, interval 10 (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.interval = 1, 40, 10
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {METHODS}")
    if not (FORTUNES / TRAIN[0]).is_file():
        p.error(f"the fortunes corpus is missing under {FORTUNES} (apt-get install fortunes)")
    torch.set_num_threads(2)
    sparsities = [float(s) for s in a.sparsities.split(",")]
    data = corpus(TRAIN), corpus(VALID)
    records, t0 = [], time.perf_counter()
    for method in methods:
        for sparsity in [0.0] if method == "dense" else sparsities:
            for seed in range(a.seeds):
                rec = run(method, sparsity, seed, data, steps=a.steps, interval=a.interval)
                records.append(rec)
                print(f"{method:>10} {sparsity:.2f} seed {seed}: ppl {rec['val_ppl']:.3f} itop {rec['itop']:.3f} "
                      f"({rec['seconds']:.0f} s, {time.perf_counter() - t0:.0f} s in all)", file=sys.stderr)
    print(table(records, methods, sparsities))
    print(f"{len(records)} runs in {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 0


def table(records: list[dict], methods: list[str], sparsities: list[float]) -> str:
    """Markdown table: mean validation perplexity (+- std over seeds) and ITOP rate per method and sparsity."""
    head = "| method | " + " | ".join(f"ppl {s:.0%} | ITOP {s:.0%}" for s in sparsities) + " |"
    lines = [head, "|---" * (2 * len(sparsities) + 1) + "|"]
    for m in methods:
        cells = []
        for s in sparsities:
            rs = [r for r in records if r["method"] == m and (r["sparsity"] == s or m == "dense")]
            if not rs:
                cells += ["-", "-"]
                continue
            ppl = [r["val_ppl"] for r in rs]
            sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            cells += [f"{statistics.mean(ppl):.2f} +- {sd:.2f}", f"{statistics.mean(r['itop'] for r in rs):.3f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
