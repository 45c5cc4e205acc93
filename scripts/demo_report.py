"""Print the demo's comparison: validation accuracy and optimizer state of a dense run and sparse runs.

    python scripts/demo_report.py runs/demo/dense runs/demo/sparse_ft5 runs/demo/gmp80

Reads each run's ``dimred_summary.json`` (written by dimred-train) and prints one table; the first
run is the dense reference of the lines after it. Optimizer state is given for the rank that holds
the most (the memory one GPU needs) and summed over the ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(run: Path) -> dict:
    path = run / "dimred_summary.json"
    if not path.is_file():
        raise SystemExit(f"demo_report: {path} is missing; did the run finish?")
    return json.loads(path.read_text())


MIB = 2**20


def trained_fraction(s: dict) -> float:
    """Trainable entries after training (TRAIN entries of managed tensors plus unmanaged trainable
    tensors) over all the model's entries."""
    return s["trainable_entries"] / s["model_entries"]


def row(name: str, s: dict) -> list[str]:
    m = s["metrics"]
    kind = "frozen" if m.get("dimred/fraction/freeze", 0.0) > 0 else "pruned"
    return [
        name,
        f"{s['recipe']['method']} {s['recipe']['sparsity']:.0%} {kind}" if s["recipe"]["sparsity"] else "dense",
        f"{trained_fraction(s):.3f}",
        f"{s['eval_accuracy']:.3f}" if s.get("eval_accuracy") is not None else "-",
        f"{s['eval_loss']:.3f}" if s.get("eval_loss") is not None else "-",
        f"{m.get('dimred/optimizer/rank_state_bytes', 0.0) / MIB:.1f}",
        f"{m.get('dimred/optimizer/state_bytes', 0.0) / MIB:.1f}",
        f"{s['train_seconds']:.0f}",
        f"{s['max_abs_pruned']}",
    ]


def main(runs: list[str]) -> None:
    header = ["run", "recipe", "trained", "val acc", "val loss", "opt MiB max rank", "opt MiB sum", "train s",
              "max|w| pruned"]
    summaries = [load(Path(r)) for r in runs]
    rows = [header] + [row(Path(r).name, s) for r, s in zip(runs, summaries, strict=True)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    dense = summaries[0]
    d_rank = dense["metrics"]["dimred/optimizer/rank_state_bytes"]
    for r, s in zip(runs[1:], summaries[1:], strict=True):
        rank = s["metrics"]["dimred/optimizer/rank_state_bytes"]
        gap = (s["eval_accuracy"] - dense["eval_accuracy"]) * 100
        print(f"{Path(r).name}: trains {trained_fraction(s):.1%} of the model's entries; val acc {gap:+.1f} points "
              f"against dense; optimizer state of the largest rank {rank / MIB:.1f} MiB instead of "
              f"{d_rank / MIB:.1f} MiB ({(d_rank - rank) / MIB:.1f} MiB saved, {rank / d_rank:.2f}x)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
