"""Byte-level language-modelling data from Debian's ``fortunes`` corpus.

The corpus is a folder of plain-text topic files (``art``, ``computers``, ``science``, ...) whose
entries are separated by lines holding a single ``%``; ``*.dat`` files are indexes, ``*.u8`` are
links to the plain files, and the ``off/`` subfolder (offensive fortunes, a separate package) is
left out. No tokenizer can be downloaded here, so tokens are the raw bytes (0..255) plus one
end-of-entry token (256).

The train / validation split is by entry (no entry straddles the two), shuffled with a fixed seed
over the sorted file list, so it is the same on every rank, run and machine that has the same
package version. Each split is the concatenation of its entries, each followed by the end-of-entry
token, cut into blocks of ``block_size`` tokens (the incomplete last block is dropped).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

FORTUNES_DIR = Path("/usr/share/games/fortunes")
EOS = 256
VOCAB_SIZE = 257
_SKIP_SUFFIXES = (".dat", ".u8")


@dataclass(frozen=True)
class FortunesData:
    """Token blocks of both splits.

    Attributes:
        train: int64 tensor of shape (n_train_blocks, block_size).
        val: int64 tensor of shape (n_val_blocks, block_size).
        n_files: Topic files read.
        n_entries: Entries (fortunes) in both splits together.
    """

    train: torch.Tensor
    val: torch.Tensor
    n_files: int
    n_entries: int


def topic_files(root: Path = FORTUNES_DIR) -> list[Path]:
    """The plain-text topic files directly under ``root``, sorted by name."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"fortunes corpus not found at {root}; install Debian's fortunes package "
            "(apt-get install fortunes, which scripts/setup_env.sh does)"
        )
    files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.is_symlink() and p.suffix not in _SKIP_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no topic files in {root}")
    return files


def read_entries(path: Path) -> list[bytes]:
    """The non-empty entries of one topic file, as bytes, without their separator lines."""
    entries, current = [], []
    for line in path.read_bytes().splitlines():
        if line.strip() == b"%":
            entries.append(b"\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append(b"\n".join(current).strip())
    return [e for e in entries if e]


def to_blocks(entries: list[bytes], block_size: int) -> torch.Tensor:
    """Concatenate ``entries`` (each followed by :data:`EOS`) and cut into full blocks."""
    tokens: list[int] = []
    for e in entries:
        tokens.extend(e)
        tokens.append(EOS)
    n = len(tokens) // block_size
    return torch.tensor(tokens[: n * block_size], dtype=torch.int64).view(n, block_size)


def load_fortunes(
    block_size: int = 128, *, val_fraction: float = 0.05, seed: int = 1234, root: Path = FORTUNES_DIR
) -> FortunesData:
    """Read, split and block the corpus.

    Args:
        block_size: Tokens per block (the model's sequence length).
        val_fraction: Fraction of entries held out for validation.
        seed: Seed of the entry shuffle that decides the split.
        root: Folder of the topic files.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a causal LM predicts the next token), got {block_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = topic_files(root)
    entries = [e for f in files for e in read_entries(f)]
    random.Random(seed).shuffle(entries)
    n_val = max(1, int(len(entries) * val_fraction))
    return FortunesData(
        train=to_blocks(entries[n_val:], block_size),
        val=to_blocks(entries[:n_val], block_size),
        n_files=len(files),
        n_entries=len(entries),
    )


def decode(tokens: list[int]) -> str:
    """Bytes back to text; the end-of-entry token becomes a ``%`` line, as in the source files."""
    out = bytes(t if t != EOS else 0 for t in tokens).decode("utf-8", errors="replace")
    return out.replace("\x00", "\n%\n")
