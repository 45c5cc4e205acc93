"""Fidelity run: pruning at initialization and IMP on a LeNet-300-100 MLP over scikit-learn's digits.

    python scripts/compare_pai.py --json runs/compare_pai.json        # ~10 min on 2 cores
    python scripts/compare_pai.py --quick                              # one seed, two sparsities, short

Every cell trains the same MLP (64 -> 300 -> 100 -> 10, ReLU; the 8x8 digits flattened and
standardized; 1,437 training and 360 test images, split with a fixed seed) for the same number of
steps with SGD (momentum 0.9, cosine learning rate), after choosing its topology with one method at
one sparsity of the three weight matrices (biases stay dense). The PaI methods score the entries on
probe batches of the training set (SNIP, GraSP, iterative SNIP, FORCE: one batch of 100 images;
SynFlow: none) with one global budget, as in their papers; `random` draws uniformly per layer. IMP
trains `rounds + 1` segments of that length (LR schedule over one segment, rewound each round with
the weights to their initial values, Frankle & Carbin's original rewinding), so its final ticket gets
the same training as the others. It prints the mean +- std of the test accuracy over the seeds per
method and sparsity, and writes the records (``method``, ``sparsity``, ``seed``, ``accuracy``) as JSON.
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dimred_dist as dd  # noqa: E402

METHODS = ["dense", "random", "magnitude", "snip", "grasp", "synflow", "iter_snip", "force", "imp"]
#: IMP rounds per sparsity (the per-round fraction follows: 1 - density ** (1 / rounds)).
IMP_ROUNDS = {0.8: 4, 0.9: 5, 0.95: 7, 0.98: 9}


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = 360
    mean, std = x[n_test:].mean(0), x[n_test:].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def lenet_300_100(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def recipe(method: str, sparsity: float, seed: int, steps: int) -> dd.Recipe | None:
    if method == "dense":
        return None
    spec: dict = {"method": method, "sparsity": sparsity, "seed": seed,
                  "distribution": "uniform" if method == "random" else "global"}
    if method in ("iter_snip", "force"):
        spec["args"] = {"batches": 1, "rounds": 10}
    if method == "synflow":
        spec["args"] = {"rounds": 100}
    if method == "imp":
        spec["schedule"] = {"kind": "imp", "rounds": IMP_ROUNDS[sparsity], "round_steps": steps, "rewind_step": 0}
    return dd.load_recipe(spec)


def run(method: str, sparsity: float, seed: int, data, *, steps: int, batch: int = 64) -> float:
    (xtr, ytr), (xte, yte) = data
    model = lenet_300_100(seed)
    r = recipe(method, sparsity, seed, steps)
    total = steps * (IMP_ROUNDS[sparsity] + 1) if method == "imp" else steps
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    if r is not None:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(xtr), generator=g)[:100]
        mgr = dd.DimRedManager(r, model, total_steps=total).prepare(probe=dd.ProbeData([(xtr[idx], ytr[idx])]))
        mgr.attach(opt, lr_scheduler=sched)
    g = torch.Generator().manual_seed(1000 + seed)
    perm, pos = torch.randperm(len(xtr), generator=g), 0
    model.train()
    for _ in range(total):
        if pos + batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        i = perm[pos : pos + batch]
        pos += batch
        F.cross_entropy(model(xtr[i]), ytr[i]).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (IMP: per round)")
    p.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--quick", action="store_true", help="1 seed, sparsities 0.8 and 0.98, 100 steps (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.sparsities = 1, 100, "0.8,0.98"
    torch.set_num_threads(2)
    sparsities = [float(s) for s in a.sparsities.split(",")]
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or any(s not in IMP_ROUNDS for s in sparsities):
        p.error(f"methods from {METHODS}, sparsities from {sorted(IMP_ROUNDS)}")
    data = digits()
    records, t0 = [], time.perf_counter()
    for method in methods:
        for sparsity in [0.0] if method == "dense" else sparsities:
            for seed in range(a.seeds):
                acc = run(method, sparsity, seed, data, steps=a.steps)
                records.append({"method": method, "sparsity": sparsity, "seed": seed, "accuracy": acc})
                print(f"{method:>10} {sparsity:.2f} seed {seed}: {acc:.4f}  ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr)
    print(table(records, methods, sparsities))
    print(f"{len(records)} runs in {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(records, indent=1))
    return 0


def table(records: list[dict], methods: list[str], sparsities: list[float]) -> str:
    """Markdown table of mean +- std test accuracy (%) per method and sparsity."""
    head = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [head, "|---" * (len(sparsities) + 1) + "|"]
    for m in methods:
        cells = []
        for s in sparsities:
            accs = [r["accuracy"] for r in records if r["method"] == m and (r["sparsity"] == s or m == "dense")]
            if not accs:
                cells.append("-")
                continue
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(accs):.1f} +- {100 * sd:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
