"""The arena's memory on the CPU across its restarts: made by a stack's first arena, re-opened by
every arena restarted after it, so the workers that map it never notice.

A stack's set of segments (named `<prefix><owner pid>-<kind>`, services.common.shm):
  weights   every weight, packed (services.common.weights_pack)
  kv        the KV pool, in the engine's layout; what the requests in flight have computed
  record    JSON: the ArenaExport the workers were given, and the `identity` it was made from
            (model files, dtype, pool layout). Written last, so a record says the two others are whole
A set's life:
  made        by an arena that found nothing to re-open: weights packed, KV zeroed, then its record
  re-opened   by a restarted arena (the last one was SIGKILLed, crashed, OOM-killed): the set of a dead
              owner whose record names what this arena would make and whose segments have the sizes
              it records, the weights checked against the model's shapes; renamed to the new owner's
              pid (the same memory: every worker keeps its mapping, the KV its blocks)
  stale       a dead owner's set that does not match (another model, dtype or pool size; no record:
              its arena died while making it): left to `reclaim_segments`, and a new set is made
  unlinked    by its arena on SIGTERM, or by `duoserve down` (every segment under the prefix)
On CUDA nothing of this applies: an IPC allocation dies with the arena (services.arena.cuda_export).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from services.arena.client import check_weights
from services.arena.export import ArenaExport
from services.common.shm import (Segment, attach_segment, create_segment, list_segments, owned_name, pid_alive,
                                 rename_segment, segment_owner)
from services.common.weights_pack import unpack
from services.engine.kv_cache import KVCacheSpec
from services.engine.model_config import ModelConfig

log = logging.getLogger("duoserve.arena")

KINDS = ("weights", "kv", "record")
RECORD_VERSION = 1


@dataclass
class Reopened:
    """A dead arena's set, now this process's: the document to hand out and the mapped segments."""

    document: ArenaExport
    weights: Segment
    kv: Segment


def identity(model_dir: Path, dtype: str, spec: KVCacheSpec) -> dict[str, Any]:
    """What a set is made from: an arena re-opens a set only when this is equal to its own. The
    model's files by name, size and modification time, so a re-converted or replaced checkpoint
    gets new weights."""
    files = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in model_dir.iterdir() if p.is_file())
    return {"model_dir": str(model_dir), "files": files, "dtype": dtype, "kv_shape": list(spec.shape),
            "kv_bytes": spec.num_bytes}


def write_record(prefix: str, document: ArenaExport, made_from: dict[str, Any]) -> Segment:
    """The set's record, once its weights and KV segments are whole."""
    data = json.dumps({"version": RECORD_VERSION, "identity": made_from,
                       "export": json.loads(document.to_json())}, separators=(",", ":")).encode()
    segment = create_segment(owned_name(prefix, "record"), len(data))
    segment.tensor().copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return segment


def reopen(prefix: str, made_from: dict[str, Any], model_config: ModelConfig, dtype: torch.dtype) -> Reopened | None:
    """A dead owner's set that matches `made_from`, renamed to this process; None when there is none."""
    present = set(list_segments(prefix))
    owners = sorted({pid for name in present if (pid := segment_owner(name, prefix)) is not None
                     and pid != os.getpid() and not pid_alive(pid)})
    for owner in owners:
        names = {kind: owned_name(prefix, kind, owner) for kind in KINDS}
        missing = [kind for kind, name in names.items() if name not in present]
        if missing:
            log.warning("not re-opening the segments of dead arena %d: no %s segment", owner, " or ".join(missing))
            continue
        try:
            found = _check(names, made_from, model_config, dtype)
        except (OSError, ValueError) as e:
            log.warning("not re-opening the segments of dead arena %d: %s", owner, e)
            continue
        return _adopt(prefix, names, found)
    return None


def _check(names: dict[str, str], made_from: dict[str, Any], model_config: ModelConfig,
           dtype: torch.dtype) -> Reopened:
    """The set mapped, if its record and sizes say it is what this arena would make."""
    with attach_segment(names["record"], writable=False) as record_segment:
        record = json.loads(record_segment.tensor().numpy().tobytes())
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"record version {record.get('version')!r}, this arena writes {RECORD_VERSION}")
    if record.get("identity") != made_from:
        raise ValueError(f"made from {_differences(record.get('identity') or {}, made_from)}")
    document = ArenaExport.from_json(json.dumps(record["export"]).encode())
    if document.device != "cpu":
        raise ValueError(f"its record describes {document.device} memory")
    weights = attach_segment(names["weights"], writable=False)
    kv = attach_segment(names["kv"], writable=False)
    try:
        if kv.size != made_from["kv_bytes"]:
            raise ValueError(f"KV segment of {kv.size} bytes, the pool needs {made_from['kv_bytes']}")
        check_weights(unpack(weights.tensor(), document.weights_manifest), model_config, dtype)
    except BaseException:
        weights.close()
        kv.close()
        raise
    return Reopened(document, weights, kv)


def _adopt(prefix: str, names: dict[str, str], found: Reopened) -> Reopened:
    """Rename the set to this process (the record last: a set is whole only under one owner)."""
    mine = {kind: owned_name(prefix, kind) for kind in KINDS}
    for kind in KINDS:
        rename_segment(names[kind], mine[kind])
    found.weights.name, found.kv.name = mine["weights"], mine["kv"]
    found.document = replace(found.document, arena_pid=os.getpid(), weights_segment=mine["weights"],
                             kv_segment=mine["kv"])
    return found


def _differences(recorded: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
    return "; ".join(f"{k} {recorded.get(k)!r}, now {expected.get(k)!r}" for k in keys)[:400] or "?"
