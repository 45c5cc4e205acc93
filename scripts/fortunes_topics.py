"""Topic classification data from Debian's ``fortunes`` corpus, written as JSON-lines files.

Each entry of a topic file (``computers``, ``science``, ...) becomes one example whose label is the
file's name. The split is by entry, stratified per topic and shuffled with a fixed seed, so it is
the same on every machine with the same package version. Writes ``train.jsonl`` and
``validation.jsonl`` (fields ``text`` and ``label``) for ``datasets.load_dataset("json", ...)``.

    python scripts/fortunes_topics.py OUT_DIR [--topics computers science ...]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from fortunes_data import FORTUNES_DIR, read_entries

DEFAULT_TOPICS = ("art", "computers", "politics", "science", "wisdom", "work")


def write_topic_dataset(
    out_dir: Path, topics: tuple[str, ...] = DEFAULT_TOPICS, *, val_fraction: float = 0.15, seed: int = 1234,
    root: Path = FORTUNES_DIR,
) -> dict[str, int]:
    """Write the two splits; returns the number of examples per split."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for topic in topics:
        path = root / topic
        if not path.is_file():
            raise FileNotFoundError(f"topic file {path} not found; install Debian's fortunes package")
        entries = [e.decode("utf-8", errors="replace") for e in read_entries(path)]
        rng.shuffle(entries)
        n_val = max(1, round(val_fraction * len(entries)))
        splits["validation"] += [{"text": t, "label": topic} for t in entries[:n_val]]
        splits["train"] += [{"text": t, "label": topic} for t in entries[n_val:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {k: len(v) for k, v in splits.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--topics", nargs="+", default=list(DEFAULT_TOPICS))
    a = p.parse_args()
    counts = write_topic_dataset(a.out_dir, tuple(a.topics))
    print(f"fortunes topics {a.topics}: {counts['train']} train / {counts['validation']} validation -> {a.out_dir}")
