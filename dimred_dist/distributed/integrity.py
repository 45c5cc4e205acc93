"""Whole-checkpoint integrity: the SHA-256 of every file a resume will load, and which checkpoint is complete.

A Trainer checkpoint folder holds the files the Trainer and DeepSpeed wrote (weights, optimizer
partitions, scheduler, RNG states, ``trainer_state.json``) and ``dimred/``. The dimred manifest,
written last, records the size and SHA-256 of every other regular file of the folder
(``checkpoint_files``; :func:`hash_tree`). A checkpoint is **complete** when the manifest is there
and every recorded file, dimred's own included, matches; no unrecorded file may sit next to them
(:func:`checkpoint_problem`). A resume verifies this before the Trainer or DeepSpeed open any
file, so a file changed or planted after the save (a pickle in ``global_step*/*.pt`` included) is
refused instead of loaded.

What stays trusted: the files exactly as the run itself wrote them (DeepSpeed and the Trainer read
their ``.pt`` files with ``torch.load(weights_only=False)``), and the manifest itself; whoever can
rewrite the manifest and the files together can make any checkpoint pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from dimred_dist.core.logging import get_logger

logger = get_logger(__name__)

__all__ = ["CHECKPOINT_RE", "checkpoint_problem", "checkpoints", "hash_file", "hash_tree", "incomplete_later",
           "newest_complete", "resumable", "set_aside", "trainer_step"]

_CHUNK = 1 << 22
#: Folder names of Trainer checkpoints (``transformers.trainer_utils.PREFIX_CHECKPOINT_DIR``).
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: Where an incomplete checkpoint is moved so the Trainer's rotation and resume never see it.
INCOMPLETE_PREFIX = "incomplete-"


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path, skip: str) -> list[Path]:
    """Regular files under ``folder`` except the subfolder ``skip``, sorted; links are files too."""
    out = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d != skip and not d.startswith(skip + ".")]
        out += [Path(root) / n for n in names]
    return sorted(out)


def hash_tree(folder: str | os.PathLike, skip: str) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``folder`` outside ``skip/``."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"sha256": hash_file(p), "bytes": p.stat().st_size}
            for p in _files(folder, skip)}


#: Folders found complete in this process, with the (path, size, mtime) of every file at that moment: a
#: second check of an unchanged folder (job validation, then the Trainer's resume) does not hash again.
_VERIFIED: dict[str, tuple] = {}


def _signature(folder: Path) -> tuple:
    return tuple((p.as_posix(), st.st_size, st.st_mtime_ns)
                 for p in sorted(folder.rglob("*")) if p.is_file() for st in [p.stat()])


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete dimred checkpoint, or None if it is (streams every file once).

    Complete: ``dimred/manifest.json`` is readable, every dimred file and every file the manifest
    records under ``checkpoint_files`` has its recorded size and SHA-256, and no other file is
    present outside ``dimred/``. A manifest of format version 2 or older records no other files;
    only its dimred files are checked (logged).
    """
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _VERIFIED and folder.is_dir() and _VERIFIED[key] == _signature(folder):
        return None
    why = _problem(folder)
    if why is None:
        _VERIFIED[key] = _signature(folder)
    return why


def _problem(folder: Path) -> str | None:
    from dimred_dist.distributed.checkpoint import DIMRED_DIR, CheckpointError, read_manifest, verify_file

    try:
        manifest = read_manifest(folder)
        for f in manifest.files:
            verify_file(manifest, f)
    except (FileNotFoundError, CheckpointError) as e:
        return str(e)
    recorded = manifest.checkpoint_files
    if recorded is None:
        logger.warning("dimred: %s records no checksums of the Trainer's files (an older format); only dimred/ "
                       "was verified", folder)
        return None
    present = {p.relative_to(folder).as_posix() for p in _files(folder, DIMRED_DIR)}
    extra = sorted(present - set(recorded))
    if extra:
        return f"{folder / extra[0]} is not among the files the checkpoint recorded at save time"
    for rel, meta in recorded.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing (recorded at save time)"
        if path.stat().st_size != meta["bytes"] or hash_file(path) != meta["sha256"]:
            return f"checksum mismatch for {path}: it changed after the save"
    return None


def resumable(folder: str | os.PathLike):
    """The manifest of ``folder`` if a run can resume from it: complete (:func:`checkpoint_problem`) and its
    dimred step equal to the Trainer's ``global_step``; else :class:`CheckpointError` naming why."""
    from dimred_dist.distributed.checkpoint import CheckpointError, read_manifest

    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"cannot resume from {folder}: {problem}")
    manifest = read_manifest(folder)
    step = trainer_step(folder)
    if step is not None and step != manifest.step:
        raise CheckpointError(
            f"cannot resume from {folder}: it holds a dimred state of step {manifest.step} but its "
            f"trainer_state.json is at step {step} (a manifest copied from another checkpoint?)"
        )
    return manifest


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``checkpoint-N`` folder of ``output_dir``, by step."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda t: t[0])


def newest_complete(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete ``checkpoint-N`` of ``output_dir`` and the newer ones skipped, with why."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(checkpoints(output_dir)):
        why = checkpoint_problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def incomplete_later(output_dir: str | os.PathLike, step: int) -> list[Path]:
    """``checkpoint-N`` folders with ``N > step`` that have no dimred manifest (a save cut short)."""
    return [p for n, p in checkpoints(output_dir) if n > step and not has_manifest(p)]


def has_manifest(folder: Path) -> bool:
    from dimred_dist.distributed.checkpoint import DIMRED_DIR, MANIFEST

    return (folder / DIMRED_DIR / MANIFEST).is_file()


def set_aside(path: Path) -> Path:
    """Rename an incomplete checkpoint to ``incomplete-checkpoint-N[-k]`` next to it (nothing is deleted)."""
    target = path.with_name(INCOMPLETE_PREFIX + path.name)
    k = 0
    while target.exists():
        k += 1
        target = path.with_name(f"{INCOMPLETE_PREFIX}{path.name}-{k}")
    os.replace(path, target)
    return target


def trainer_step(folder: str | os.PathLike) -> int | None:
    """``global_step`` of ``folder/trainer_state.json``, or None where the Trainer wrote none."""
    path = Path(folder) / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (ValueError, KeyError, TypeError):
        return None
