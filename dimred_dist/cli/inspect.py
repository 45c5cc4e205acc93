"""``dimred-inspect``: the TRAIN / FREEZE / PRUNE topology stored in a checkpoint, per layer.

    dimred-inspect output/checkpoint-500                 # table + output/checkpoint-500/dimred_density.png
    dimred-inspect output/checkpoint-500 --png d.png     # the chart elsewhere
    dimred-inspect output/checkpoint-500 --no-png

Reads the world-size-independent form written by :func:`dimred_dist.distributed.checkpoint.save_dimred_state`
(no torch.distributed, any saved world size or ZeRO stage), verifies every file's SHA-256, and
counts each saved piece without assembling full masks. Exit status 1 with a one-line error for a
missing directory, a folder without a dimred checkpoint, or a corrupt file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from dimred_dist.core.typecheck import brief
from dimred_dist.distributed.checkpoint import CheckpointError, Manifest, read_manifest, state_counts

DEFAULT_PNG = "dimred_density.png"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dimred-inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder holding dimred/ (or the dimred folder itself)")
    p.add_argument("--png", default=None,
                   help=f"where to write the density chart (default: <checkpoint>/{DEFAULT_PNG})")
    p.add_argument("--no-png", action="store_true", help="print the table only")
    return p.parse_args(argv)


def table(manifest: Manifest, counts: dict[str, tuple[int, int, int]]) -> str:
    """The per-layer table with a total row, as text."""
    head = ("layer", "shape", "numel", "density", "TRAIN", "FREEZE", "PRUNE")
    rows = []
    total = [0, 0, 0]
    for name, (t, f, p) in counts.items():
        n = t + f + p
        rows.append((name, "x".join(map(str, manifest.shapes[name])) or "scalar", str(n), f"{(t + f) / n:.4f}",
                     str(t), str(f), str(p)))
        total = [total[0] + t, total[1] + f, total[2] + p]
    n = sum(total)
    rows.append(("total", "", str(n), f"{(total[0] + total[1]) / n:.4f}", *map(str, total)))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for i, r in enumerate([head, *rows]):
        if i == len(rows):  # before the total row
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def write_png(manifest: Manifest, counts: dict[str, tuple[int, int, int]], path: Path) -> Path:
    """The per-layer density chart of the training plots, drawn from the saved counts."""
    from dimred_dist.integrations.plots import density_figure

    metrics: dict[str, float] = {}
    for name, (t, f, p) in counts.items():
        n = t + f + p
        metrics[f"dimred/density/{name}"] = (t + f) / n
        metrics[f"dimred/train_fraction/{name}"] = t / n
    n = sum(sum(c) for c in counts.values())
    metrics["dimred/density"] = sum(t + f for t, f, _ in counts.values()) / n
    fig = density_figure(metrics, title=f"checkpoint step {manifest.step}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = read_manifest(args.checkpoint)
        counts = state_counts(manifest)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"dimred-inspect: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere in the reader: one line, no traceback
        print(f"dimred-inspect: error: {args.checkpoint} cannot be read as a dimred checkpoint ({type(e).__name__}: "
              f"{brief(str(e))})", file=sys.stderr)
        return 1
    r = manifest.recipe
    print(f"dimred checkpoint {manifest.directory}: step {manifest.step}, saved by {manifest.world_size} rank(s) at "
          f"ZeRO stage {manifest.zero_stage}; method {r.get('method')}, sparsity {r.get('sparsity')}, "
          f"distribution {r.get('distribution')}")
    print(table(manifest, counts))
    if not args.no_png:
        path = Path(args.png) if args.png else manifest.directory.parent / DEFAULT_PNG
        print(f"density chart: {write_png(manifest, counts, path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
