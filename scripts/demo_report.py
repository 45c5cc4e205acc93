"""Print the demo's comparison: validation accuracy and optimizer state of a dense and a sparse run.

    python scripts/demo_report.py runs/demo/dense runs/demo/rigl80

Reads each run's ``dimred_summary.json`` (written by dimred-train) and prints one table.
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


def row(name: str, s: dict) -> list[str]:
    m = s["metrics"]
    state = m.get("dimred/optimizer/state_bytes", 0.0)
    dense = m.get("dimred/optimizer/dense_bytes", 0.0)
    return [
        name,
        f"{s['recipe']['method']} {1 - s['recipe']['sparsity']:.0%} dense",
        f"{m['dimred/fraction/train']:.3f}",
        f"{s['eval_accuracy']:.3f}" if s.get("eval_accuracy") is not None else "-",
        f"{s['eval_loss']:.3f}" if s.get("eval_loss") is not None else "-",
        f"{state / 2**20:.1f}",
        f"{dense / 2**20:.1f}",
        f"{s['train_seconds']:.0f}",
        f"{s['max_abs_pruned']}",
    ]


def main(runs: list[str]) -> None:
    header = ["run", "recipe", "train frac", "val acc", "val loss", "opt MiB", "dense MiB", "train s", "max|w| pruned"]
    rows = [header] + [row(Path(r).name, load(Path(r))) for r in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    summaries = [load(Path(r)) for r in runs]
    dense_state = summaries[0]["metrics"]["dimred/optimizer/state_bytes"]
    sparse_state = summaries[-1]["metrics"]["dimred/optimizer/state_bytes"]
    print(
        f"optimizer state (both ranks): {sparse_state / 2**20:.1f} MiB instead of {dense_state / 2**20:.1f} MiB "
        f"({(dense_state - sparse_state) / 2**20:.1f} MiB saved, {sparse_state / dense_state:.2f}x); "
        f"managed entries trained: {summaries[-1]['metrics']['dimred/fraction/train']:.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
