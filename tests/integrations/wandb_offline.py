"""Read back what an offline W&B run wrote: the history rows of its ``run-<id>.wandb`` file.

wandb 0.31 writes no ``wandb-summary.json`` for offline runs and ships no Python reader of the
``.wandb`` log any more (``wandb.sdk.internal.datastore`` is gone), so the tests parse it here: a
7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a
7-byte header (crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) as in
LevelDB's log format; every record's payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B" or data[4:6] != b"\xe1\xbe":
        raise ValueError(f"{path} is not a W&B transaction log (header {data[:7]!r})")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + n]
        pos += _HEADER + n
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _row(items) -> dict[str, Any]:
    """History items -> dict; an image's fields (nested keys) become a sub-dict."""
    row: dict[str, Any] = {}
    for it in items:
        path = [it.key] if it.key else list(it.nested_key)
        node = row
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = json.loads(it.value_json)
    return row


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's history rows in logging order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for payload in _payloads(log):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append(_row(rec.history.item))
    return rows
