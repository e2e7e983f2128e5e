"""Reading an offline wandb run file (``run-<id>.wandb``) back, without the wandb service:
to check what a job logged, and for reports. The file is a 7-byte header (":W&B", magic, version)
followed by LevelDB-style log blocks of 32 KiB holding protobuf ``Record`` messages."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[object]:
    """Every ``wandb_internal_pb2.Record`` in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown record chunk type {kind} at byte {pos}")
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def logged(path: str | Path) -> dict[str, set[str]]:
    """Keys found per record kind: 'config', 'history' (metrics), 'summary', 'stats' (system)."""
    out: dict[str, set[str]] = {"config": set(), "history": set(), "summary": set(), "stats": set(), "artifact": set()}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            out["config"].update(u.key or "/".join(u.nested_key) for u in rec.config.update)
        elif kind == "run":  # the config given to wandb.init travels in the run record
            out["config"].update(u.key or "/".join(u.nested_key) for u in rec.run.config.update)
        elif kind == "history":
            out["history"].update(i.key or "/".join(i.nested_key) for i in rec.history.item)
        elif kind == "summary":
            out["summary"].update(u.key or "/".join(u.nested_key) for u in rec.summary.update)
        elif kind == "stats":
            out["stats"].update(i.key for i in rec.stats.item)
        elif kind == "artifact":
            out["artifact"].add(rec.artifact.name)
    return out
