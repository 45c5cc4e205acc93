"""Checkpoints of the TRAIN / FREEZE / PRUNE state that survive a change of world size or ZeRO stage.

Layout of ``<checkpoint>/dimred/`` (no pickle anywhere: safetensors and JSON only):

* ``rank<r>.safetensors``, one per rank: for every managed parameter with entries on that rank,
  ``<name>.keep`` and ``<name>.train``, bit-packed (uint8, entry ``i`` of the rank's range
  ``[start, end)`` is bit ``i % 8`` of byte ``i // 8``), plus the ranges as JSON metadata;
* ``manifest.json``, written last by rank 0: format, world size, ZeRO stage, step, recipe, method
  state and the metric counters (topology history, seconds), every parameter's shape (model order),
  per file its SHA-256, size and global ranges, and (``record_checkpoint``) the SHA-256 and size of
  every other file of the checkpoint folder (:mod:`dimred_dist.distributed.integrity`);
* ``<name>.ever`` next to the masks (dynamic methods): the entries active at least once so far, so
  the ITOP rate goes on where it was;
* the method's tensor state (:meth:`~dimred_dist.methods.base.Method.tensor_state`, e.g. an IMP
  weight snapshot) as ``method.<key>.<name>`` tensors of the rank's range of the parameter, with their
  ranges per file and their shapes and dtypes in the manifest (``tensors``), so they reshard too.

The per-rank files together with their global ranges cover every parameter exactly once, so a
loader at any world size or stage reads, for each of its own ranges, only the byte slices of the
files that overlap it (``safe_open(...).get_slice``): no rank materializes masks it does not own.
Replicated parameters (DDP) are written by rank 0 only.

Crash safety: everything is written into ``dimred.tmp/`` and renamed to ``dimred/`` once every rank's
file and the manifest are on disk, so a ``dimred/`` folder is always whole; a save cut short leaves
no manifest and the checkpoint counts as incomplete.

The compact optimizer's moments are stored too, as tensor state ``optimizer.<moment>`` of every
trainable parameter over each rank's range (of a managed parameter only its TRAIN entries', in
index order: 8 bytes per TRAIN entry for AdamW) with the optimizer's step count in the manifest. At
the same world size and stage DeepSpeed's own checkpoint (or the Trainer's ``optimizer.pt``)
restores the optimizer exactly, and
:func:`same_partitioning` tells whether that is the case; on another layout the loader reshards the
moments to this run's ranges and hands them to the compact optimizer (at ``attach``), so training
goes on with the same optimizer state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from dimred_dist.core.bits import pack_bits, unpack_bits
from dimred_dist.core.logging import get_logger
from dimred_dist.core.typecheck import brief
from dimred_dist.distributed.integrity import hash_tree

logger = get_logger(__name__)

__all__ = [
    "DIMRED_DIR", "MANIFEST", "CheckpointError", "Manifest", "SavedFile", "load_dimred_state", "read_full_masks",
    "read_manifest", "same_partitioning", "save_dimred_state", "state_counts",
]

DIMRED_DIR = "dimred"
#: Tensor-state keys of the compact optimizer's moments (the rest are the method's).
OPTIMIZER_PREFIX = "optimizer."
MANIFEST = "manifest.json"
FORMAT = "dimred_dist.checkpoint"
VERSION = 3
#: Versions this reader reads (version 1 has no tensor state; 1 and 2 no counters and no checksums of the
#: Trainer's files).
READABLE = (1, 2, 3)
_HASH_CHUNK = 1 << 22
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "bool": torch.bool, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


class CheckpointError(ValueError):
    """A dimred checkpoint is missing, corrupt, or does not belong to this model."""


@dataclass(frozen=True)
class SavedFile:
    """One rank's file: its name inside ``dimred/``, SHA-256, size and global range per parameter."""

    rank: int
    file: str
    sha256: str
    bytes: int
    ranges: dict[str, tuple[int, int]]
    tensor_ranges: dict[str, dict[str, tuple[int, int]]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` records about a saved dimred state."""

    directory: Path
    world_size: int
    zero_stage: int
    step: int
    recipe: dict[str, Any]
    method_state: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    files: list[SavedFile]
    #: Method tensor state: ``{key: {"dtype": str, "params": {name: shape}}}``.
    tensors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: Whether the rank files hold ``<name>.ever`` bits (the ITOP history).
    ever: bool = False
    #: ``{relative path: {"sha256", "bytes"}}`` of the checkpoint folder's other files; None: not recorded.
    checkpoint_files: dict[str, dict[str, Any]] | None = None
    #: The compact optimizer's step count when its moments were saved (tensor state ``optimizer.*``).
    optimizer_step: float | None = None

    def pieces(self, name: str) -> list[tuple[SavedFile, int, int]]:
        """(file, start, end) of every saved piece of parameter ``name``, by start."""
        out = [(f, *f.ranges[name]) for f in self.files if name in f.ranges]
        return sorted(out, key=lambda t: t[1])

    def path(self, f: SavedFile) -> Path:
        return self.directory / f.file


# ---- saving ----------------------------------------------------------------------------------
def save_dimred_state(manager, directory: str | os.PathLike, *, record_checkpoint: bool = False) -> Path:
    """Write the manager's state into ``<directory>/dimred/`` (every rank calls it).

    Each rank writes its own ``rank<r>.safetensors``; rank 0 then writes ``manifest.json`` with the
    files' checksums and ranges (gathered in one small all-reduce of integers, no tensors of
    weights or masks cross the network), and renames the finished ``dimred.tmp/`` to ``dimred/``.

    Args:
        record_checkpoint: Also record the SHA-256 of every other file under ``directory`` (the
            Trainer's and DeepSpeed's, all written before this call on every rank), which a resume
            verifies before loading them (:func:`dimred_dist.distributed.integrity.checkpoint_problem`).

    Raises:
        FileExistsError: If ``<directory>/dimred`` already holds dimred files (on every rank).
        TypeError: If the method's state is not plain JSON data.
    """
    state, views, topo = manager.state, manager.views, manager.adapter.topology
    coll = manager.adapter.check_collectives
    out = Path(directory) / DIMRED_DIR
    method_state = manager.state_dict_plain()
    try:
        json.dumps(method_state)
    except TypeError as e:
        raise TypeError(f"{type(manager.method).__name__}.state_dict() must be plain JSON data: {e}") from None
    exists = out.is_dir() and any(p.name == MANIFEST or p.suffix == ".safetensors" for p in out.iterdir())
    if int(coll.all_reduce_max(torch.tensor([int(exists)]))[0]):  # every rank raises, none waits
        raise FileExistsError(f"{out} already holds a dimred checkpoint; refusing to overwrite it")
    final, out = out, out.with_name(DIMRED_DIR + ".tmp")
    if topo.rank == 0 and out.exists():  # left by a save that was cut short: never a whole state
        shutil.rmtree(out)
    coll.barrier()
    out.mkdir(parents=True, exist_ok=True)

    names = list(views)
    mine = [n for n in names if views[n].local_numel and (not views[n].replicated or topo.rank == 0)]
    tensors: dict[str, torch.Tensor] = {}
    for n in mine:
        tensors[f"{n}.keep"] = state[n].keep_bits.cpu()
        tensors[f"{n}.train"] = state[n].train_bits.cpu()
        if manager.ever is not None:
            tensors[f"{n}.ever"] = manager.ever.bits[n].cpu()
    ranges = {n: [views[n].start, views[n].end] for n in mine}
    extra, optimizer_step = _method_tensors(manager, coll)
    extra_cols = [(k, n) for k in sorted(extra) for n in sorted(extra[k])]
    t_ranges: dict[str, dict[str, list[int]]] = {}
    for key, name in extra_cols:
        v = manager.ctx.view_of(name)
        if v.local_numel and (not v.replicated or topo.rank == 0):
            tensors[f"method.{key}.{name}"] = extra[key][name].detach().cpu().contiguous()
            t_ranges.setdefault(key, {})[name] = [v.start, v.end]
    meta = {"format": FORMAT, "version": str(VERSION), "rank": str(topo.rank), "ranges": json.dumps(ranges),
            "tensor_ranges": json.dumps(t_ranges)}
    blob = safetensors_bytes(tensors, metadata=meta)
    fname = f"rank{topo.rank}.safetensors"
    (out / fname).write_bytes(blob)

    # Row r: 32 digest bytes, file size, then (start, end) per parameter and per tensor-state column of rank r.
    cols = len(names) + len(extra_cols)
    row = torch.zeros(topo.world_size, 33 + 2 * cols, dtype=torch.int64)
    row[topo.rank, :32] = torch.tensor(list(hashlib.sha256(blob).digest()), dtype=torch.int64)
    row[topo.rank, 32] = len(blob)
    for i, n in enumerate(names):
        if n in ranges:
            row[topo.rank, 33 + 2 * i : 35 + 2 * i] = torch.tensor(ranges[n])
    for j, (key, name) in enumerate(extra_cols, start=len(names)):
        if name in t_ranges.get(key, {}):
            row[topo.rank, 33 + 2 * j : 35 + 2 * j] = torch.tensor(t_ranges[key][name])
    table = coll.all_reduce_sum(row)
    if topo.rank == 0:
        files = []
        for r in range(topo.world_size):
            rr = table[r].tolist()
            pairs = {n: (rr[33 + 2 * i], rr[34 + 2 * i]) for i, n in enumerate(names)}
            spans = {n: [a, b] for n, (a, b) in pairs.items() if b > a}
            t_spans: dict[str, dict[str, list[int]]] = {}
            for j, (key, name) in enumerate(extra_cols, start=len(names)):
                a, b = rr[33 + 2 * j], rr[34 + 2 * j]
                if b > a:
                    t_spans.setdefault(key, {})[name] = [a, b]
            files.append({"rank": r, "file": f"rank{r}.safetensors", "sha256": bytes(rr[:32]).hex(), "bytes": rr[32],
                          "ranges": spans, "tensor_ranges": t_spans})
        tensor_meta = {
            key: {"dtype": str(next(iter(extra[key].values())).dtype).removeprefix("torch."),
                  "params": {n: list(manager.ctx.view_of(n).shape) for n in sorted(extra[key])},
                  **({"compact": sorted(n for n in extra[key] if n in views)} if key.startswith(OPTIMIZER_PREFIX)
                     else {})}
            for key in sorted(extra)
        }
        manifest = {
            "format": FORMAT, "version": VERSION, "world_size": topo.world_size, "zero_stage": topo.zero_stage,
            "step": manager.step, "recipe": manager.recipe.to_dict(), "method_state": method_state,
            "params": {n: list(views[n].shape) for n in names}, "files": files, "tensors": tensor_meta,
            "ever": manager.ever is not None, "optimizer_step": optimizer_step,
        }
        if record_checkpoint:
            manifest["checkpoint_files"] = hash_tree(directory, DIMRED_DIR)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(out, final)
    coll.barrier()
    logger.info("dimred: saved the state of step %d (%d ranks) to %s", manager.step, topo.world_size, final)
    return final


def _method_tensors(manager, coll) -> tuple[dict[str, dict[str, torch.Tensor]], float | None]:
    """The method's tensor state and the compact optimizer's moments (``optimizer.<moment>``, where every rank
    has stepped), with the optimizer's step count (None without moments); every rank must hold the same
    keys and parameter names (checked)."""
    extra = dict(manager.method.tensor_state())
    moments = manager.optimizer_moments()
    optimizer_step = None
    if int(-coll.all_reduce_max(torch.tensor([-int(moments is not None)]))[0]):
        optimizer_step = moments[0]
        extra.update({f"{OPTIMIZER_PREFIX}{k}": per for k, per in moments[1].items()})
    for key, per in extra.items():
        for name, t in per.items():
            v = manager.ctx.view_of(name)
            if t.dim() != 1 or t.numel() != v.local_numel:
                raise ValueError(f"tensor state {key}/{name}: {tuple(t.shape)} does not cover its local range "
                                 f"of {v.local_numel} entries")
    sig = json.dumps(sorted((k, sorted(per)) for k, per in extra.items()))
    h = torch.tensor([int.from_bytes(hashlib.sha256(sig.encode()).digest()[:7], "big")], dtype=torch.int64)
    if int(coll.all_reduce_max(h)) != int(-coll.all_reduce_max(-h)):
        raise RuntimeError("ranks hold different method tensor state keys; every rank must return the same ones")
    for key in [k for k in extra if k.startswith(OPTIMIZER_PREFIX)]:
        # Managed parameters: the moments of their TRAIN entries only, in index order (8 bytes per TRAIN
        # entry for AdamW); the loader finds a range's offset from the train bits saved next to them.
        extra[key] = {n: (t[manager.state[n].train.to(t.device)] if n in manager.views else t)
                      for n, t in extra[key].items()}
    return extra, optimizer_step


# ---- reading ---------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate ``<directory>/dimred/manifest.json`` (``directory`` may also be the ``dimred`` folder).

    Raises:
        FileNotFoundError: If the directory or the manifest does not exist.
        CheckpointError: If the manifest is not a dimred checkpoint or its ranges do not tile the parameters.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {root}")
    if root.name != DIMRED_DIR and (root / DIMRED_DIR).is_dir():
        root = root / DIMRED_DIR
    path = root / MANIFEST
    if root.name != DIMRED_DIR and not path.is_file():
        path = root / DIMRED_DIR / MANIFEST  # where it would be
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a dimred checkpoint: {path} is missing (it is written by save_dimred_state / "
            "DimRedCallback.on_save)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dimred checkpoint manifest (format {raw.get('format')!r})")
    if raw.get("version") not in READABLE:
        raise CheckpointError(f"{path}: unsupported checkpoint version {raw.get('version')!r} (readable: {READABLE})")
    try:
        files = [SavedFile(int(f["rank"]), str(f["file"]), str(f["sha256"]), int(f["bytes"]),
                           {n: (int(a), int(b)) for n, (a, b) in f["ranges"].items()},
                           {k: {n: (int(a), int(b)) for n, (a, b) in per.items()}
                            for k, per in f.get("tensor_ranges", {}).items()}) for f in raw["files"]]
        m = Manifest(root, int(raw["world_size"]), int(raw["zero_stage"]), int(raw["step"]), dict(raw["recipe"]),
                     dict(raw.get("method_state", {})),
                     {n: tuple(int(d) for d in s) for n, s in raw["params"].items()}, files,
                     dict(raw.get("tensors", {})), bool(raw.get("ever", False)), raw.get("checkpoint_files"),
                     None if raw.get("optimizer_step") is None else float(raw["optimizer_step"]))
        if m.checkpoint_files is not None:
            for rel, meta in m.checkpoint_files.items():
                if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(meta.get("sha256"), str):
                    raise ValueError(f"recorded file {rel!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {brief(str(e))})") from None
    for f in files:
        if Path(f.file).name != f.file:
            raise CheckpointError(f"{path}: file name {f.file!r} must not contain a directory")
    for name, shape in m.shapes.items():
        numel, pos = _numel(shape), 0
        for _, a, b in m.pieces(name):
            if a != pos or b <= a:
                raise CheckpointError(
                    f"{path}: the saved ranges of {name!r} do not tile 0..{numel} (gap or overlap at {pos})"
                )
            pos = b
        if pos != numel:
            raise CheckpointError(f"{path}: the saved ranges of {name!r} cover 0..{pos} of {numel} entries")
    for key, meta in m.tensors.items():
        if meta.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor state {key!r} has an unsupported dtype {meta.get('dtype')!r}")
        for name, shape in meta["params"].items():
            pieces = sorted((f.tensor_ranges[key][name] for f in files if name in f.tensor_ranges.get(key, {})))
            pos = 0
            for a, b in pieces:
                if a != pos or b <= a:
                    raise CheckpointError(f"{path}: the saved ranges of tensor state {key}/{name} do not tile it")
                pos = b
            if pos != _numel(shape):
                raise CheckpointError(f"{path}: tensor state {key}/{name} covers 0..{pos} of {_numel(shape)} entries")
    return m


def verify_file(manifest: Manifest, f: SavedFile) -> Path:
    """The path of ``f`` after checking its size and SHA-256 against the manifest (streamed, no tensors)."""
    path = manifest.path(f)
    if not path.is_file():
        raise CheckpointError(f"dimred checkpoint file missing: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    if h.hexdigest() != f.sha256:
        raise CheckpointError(
            f"checksum mismatch for {path}: SHA-256 {h.hexdigest()} != {f.sha256} recorded in the manifest; "
            "the file is corrupt or was replaced"
        )
    return path


def _read_bits(handle, key: str, lo: int, hi: int) -> torch.Tensor:
    """Entries ``lo .. hi-1`` of the bit-packed tensor ``key``, reading only the bytes that hold them."""
    b0 = lo // 8
    packed = handle.get_slice(key)[b0 : (hi + 7) // 8]
    return unpack_bits(packed, hi - 8 * b0)[lo - 8 * b0 :]


def read_ranges(manifest: Manifest, wanted: dict[str, tuple[int, int]],
                keys: tuple[str, ...] = ("keep", "train")) -> dict[str, tuple[torch.Tensor, ...]]:
    """The bit masks ``keys`` (default (keep, train)) over ``[start, end)`` for every ``name: (start, end)``
    in ``wanted``.

    Opens only the files that overlap a wanted range, verifies each one's checksum first, and reads
    only the overlapping bytes.
    """
    out = {n: tuple(torch.zeros(b - a, dtype=torch.bool) for _ in keys) for n, (a, b) in wanted.items()}
    for f in manifest.files:
        todo = []
        for name, (start, end) in wanted.items():
            if name in f.ranges:
                fa, fb = f.ranges[name]
                a, b = max(start, fa), min(end, fb)
                if a < b:
                    todo.append((name, a, b, fa, start))
        if not todo:
            continue
        with safe_open(verify_file(manifest, f), framework="pt") as handle:
            for name, a, b, fa, start in todo:
                for key, dst in zip(keys, out[name]):
                    dst[a - start : b - start] = _read_bits(handle, f"{name}.{key}", a - fa, b - fa)
    return out


def read_tensor_ranges(manifest: Manifest, key: str, wanted: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Entries ``[start, end)`` of tensor state ``key`` of every ``name: (start, end)`` in ``wanted``
    (checksums verified first, only the overlapping bytes read).

    A parameter the manifest lists as ``compact`` for ``key`` (the optimizer's moments of a managed
    parameter) holds values for its TRAIN entries only: a piece's offset is the count of TRAIN bits
    before the range, read from the train mask of the same file, and the other entries read as 0.
    """
    meta = manifest.tensors[key]
    dtype, compact = _DTYPES[meta["dtype"]], set(meta.get("compact", ()))
    out = {n: torch.zeros(b - a, dtype=dtype) for n, (a, b) in wanted.items()}
    for f in manifest.files:
        per = f.tensor_ranges.get(key, {})
        todo = [(n, max(a, per[n][0]), min(b, per[n][1]), per[n][0], a) for n, (a, b) in wanted.items() if n in per]
        todo = [t for t in todo if t[1] < t[2]]
        if not todo:
            continue
        with safe_open(verify_file(manifest, f), framework="pt") as handle:
            for name, a, b, fa, start in todo:
                src, dst = handle.get_slice(f"method.{key}.{name}"), out[name][a - start : b - start]
                if name not in compact:
                    dst.copy_(src[a - fa : b - fa])
                    continue
                train = _read_bits(handle, f"{name}.train", 0, b - fa)
                c0, sel = int(train[: a - fa].sum()), train[a - fa :]
                values = src[c0 : c0 + int(sel.sum())]
                if values.numel() != int(sel.sum()):
                    raise CheckpointError(f"{f.file}: tensor state {key}/{name} does not match its train mask")
                dst[sel] = values
    return out


def read_full_masks(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full flat (keep, train) masks of every parameter (a single-process reader: inspection, tests)."""
    m = read_manifest(directory)
    return read_ranges(m, {n: (0, _numel(s)) for n, s in m.shapes.items()})


def state_counts(manifest: Manifest) -> dict[str, tuple[int, int, int]]:
    """Per parameter: global (TRAIN, FREEZE, PRUNE) counts, one saved piece in memory at a time."""
    counts = {n: [0, 0, 0] for n in manifest.shapes}
    for f in manifest.files:
        if not f.ranges:
            continue
        with safe_open(verify_file(manifest, f), framework="pt") as handle:
            for name, (a, b) in f.ranges.items():
                keep = unpack_bits(handle.get_tensor(f"{name}.keep"), b - a)
                train = unpack_bits(handle.get_tensor(f"{name}.train"), b - a) & keep
                n_keep, n_train = int(keep.sum()), int(train.sum())
                c = counts[name]
                c[0], c[1], c[2] = c[0] + n_train, c[1] + n_keep - n_train, c[2] + (b - a) - n_keep
    return {n: (c[0], c[1], c[2]) for n, c in counts.items()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---- loading into a manager ------------------------------------------------------------------
def same_partitioning(manifest: Manifest, world_size: int, zero_stage: int) -> bool:
    """Whether optimizer state saved under the manifest's layout fits this one entry for entry.

    Replicated runs (stage 0) hold whole parameters at any world size; ZeRO-1 and -2 partition alike.
    """
    family = {0: 0, 1: 1, 2: 1, 3: 3}
    if family[manifest.zero_stage] != family[zero_stage]:
        return False
    return zero_stage == 0 or manifest.world_size == world_size


def check_model(manifest: Manifest, shapes: dict[str, tuple[int, ...]], *, managed: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first parameter whose name or shape differs.

    Args:
        shapes: Parameter name -> global shape, in model order.
        managed: True: ``shapes`` are this run's managed parameters and must equal the saved ones.
            False: ``shapes`` are all the model's parameters; every saved one must be among them.
    """
    saved = list(manifest.shapes.items())
    here = [(n, tuple(s)) for n, s in shapes.items()]
    msg = None
    if not managed:
        lookup = dict(here)
        for name, shape in saved:
            if name not in lookup:
                msg = f"the checkpoint has parameter {name!r} {shape} that this model does not have"
            elif lookup[name] != shape:
                msg = f"parameter {name!r} has shape {shape} in the checkpoint but {lookup[name]} here"
            if msg:
                break
    for i in range(max(len(saved), len(here)) if managed else 0):
        s = saved[i] if i < len(saved) else None
        h = here[i] if i < len(here) else None
        if s == h:
            continue
        if s is None:
            msg = f"parameter {h[0]!r} {h[1]} is managed here but not in the checkpoint"
        elif h is None:
            msg = f"the checkpoint has parameter {s[0]!r} {s[1]} that is not managed here"
        elif s[0] != h[0]:
            msg = f"parameter #{i} is {s[0]!r} in the checkpoint but {h[0]!r} here"
        else:
            msg = f"parameter {s[0]!r} has shape {s[1]} in the checkpoint but {h[1]} here"
        break
    if msg:
        raise CheckpointError(f"{manifest.directory} is from another model: {msg}")


def load_dimred_state(manager, directory: str | os.PathLike) -> Manifest:
    """Restore masks, step and method state from a checkpoint saved at any world size or ZeRO stage.

    Every rank calls it on a prepared manager (``prepare(resuming=True)`` when resuming, so the
    weights are not masked with a fresh topology first). Each rank reads only the slices of the saved
    files that overlap its own ranges, after verifying their checksums. Errors on any rank make every
    rank raise before anything is changed. Then :meth:`DimRedManager.load_state_dict` applies the
    masks to the weights and hands them to an attached compact optimizer.

    Returns:
        The manifest (world size, stage and step of the save).

    Raises:
        FileNotFoundError / CheckpointError: Missing or corrupt checkpoint, another model or method.
    """
    coll = manager.adapter.check_collectives
    views = manager.views
    error: Exception | None = None
    try:
        manifest = read_manifest(directory)
        check_model(manifest, {n: v.shape for n, v in views.items()})
        if manifest.recipe.get("method") != manager.recipe.method:
            raise CheckpointError(
                f"{manifest.directory} was saved by method {manifest.recipe.get('method')!r}, this run uses "
                f"{manager.recipe.method!r}"
            )
        keys = ("keep", "train", "ever") if manifest.ever and manager.ever is not None else ("keep", "train")
        masks = read_ranges(manifest, {n: (v.start, v.end) for n, v in views.items() if v.local_numel}, keys)
        tensors = {}
        for key, meta in manifest.tensors.items():
            mine = {n: manager.ctx.view_of(n) for n in meta["params"]}
            for n, v in mine.items():
                if tuple(meta["params"][n]) != tuple(v.shape):
                    raise CheckpointError(f"tensor state {key}/{n} has shape {meta['params'][n]}, here {v.shape}")
            tensors[key] = read_tensor_ranges(manifest, key, {n: (v.start, v.end) for n, v in mine.items()})
    except Exception as e:  # noqa: BLE001 - re-raised below on this rank, reported on the others
        error = e
    if int(coll.all_reduce_max(torch.tensor([int(error is not None)]))[0]):
        if error is not None:
            raise error
        raise CheckpointError(f"another rank failed to load the dimred checkpoint {directory}; see its error")
    if manifest.recipe != json.loads(json.dumps(manager.recipe.to_dict())):
        logger.warning("dimred: the recipe saved in %s differs from the manager's recipe; the manager's applies "
                       "(DimRedCallback keeps the saved one in force)", directory)
    sd, ever = {}, {}
    for name, v in views.items():
        keep, train, *seen = masks.get(name, tuple(torch.zeros(0, dtype=torch.bool) for _ in keys))
        device = manager.state[name].device
        if seen:
            ever[name] = pack_bits(seen[0])
        sd.update({f"{name}.keep": keep.to(device), f"{name}.train": train.to(device),
                   f"{name}.range": torch.tensor([v.start, v.end]),
                   f"{name}.shape": torch.tensor(v.shape, dtype=torch.int64)})
    devices = {n: manager.ctx.view_of(n).weight().device for per in tensors.values() for n in per}
    tensors = {k: {n: t.to(devices[n]) for n, t in per.items()} for k, per in tensors.items()}
    moments = {k.removeprefix(OPTIMIZER_PREFIX): tensors.pop(k)
               for k in list(tensors) if k.startswith(OPTIMIZER_PREFIX)}
    manager.load_state_dict({"step": manifest.step, "masks": sd, **manager.split_plain(manifest.method_state),
                             "tensors": tensors, **({"ever": ever} if ever else {})})
    topo = manager.adapter.topology
    if moments and not same_partitioning(manifest, topo.world_size, topo.zero_stage):
        # Same layout: DeepSpeed's / the Trainer's own optimizer checkpoint restores the state exactly.
        manager.restore_moments(float(manifest.optimizer_step or manifest.step), moments)
    logger.info(
        "dimred: restored the topology of step %d saved by %d ranks at ZeRO stage %d (now %d ranks, stage %d)",
        manifest.step, manifest.world_size, manifest.zero_stage, topo.world_size, topo.zero_stage,
    )
    return manifest
