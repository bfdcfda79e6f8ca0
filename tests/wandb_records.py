"""Read a W&B run's record log (``run-<id>.wandb``, what ``wandb sync`` uploads) without the network: LevelDB's
log format (32 KiB blocks of chunks: crc32, length, type) after a 7-byte header, each record a protobuf
``wandb_internal_pb2.Record``. wandb >= 0.20 no longer ships a Python reader, so the tests carry this one."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B record log"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # block trailer: zero padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def _put(d: dict, item) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = json.loads(item.value_json)


def read_run(path: Path) -> dict:
    """{"config": {key: value}, "summary": {key: value}, "history": [{key: value}, ...]} of a record log
    (values JSON-decoded; a nested key of a summary / config update becomes nested dicts)."""
    out = {"config": {}, "summary": {}, "history": []}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            for item in rec.config.update:
                _put(out["config"], item)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out["summary"], item)
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out
