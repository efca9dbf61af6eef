"""What a stack serves, published in Redis by whoever holds the weights (arena, or the colocated worker).

The gateway reads it to find the tokenizer and the limits it validates requests against. Pure
Python: the Redis calls are two plain hash operations on a client passed in.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """The served model and the limits of its KV pool."""

    name: str                        # model name shown to clients (checkpoint directory name)
    model_dir: str                   # HF-format directory with the tokenizer files
    architecture: str                # e.g. LlamaForCausalLM
    vocab_size: int                  # embedding rows: token ids must be below this
    max_model_len: int               # prompt + completion tokens per request
    block_size: int                  # tokens per KV block
    num_kv_blocks: int               # blocks in the shared pool
    eos_token_ids: tuple[int, ...]   # end a request unless ignore_eos
    dtype: str                       # weights and KV dtype
    mode: str                        # "split" or "colocated"


def write_model_info(client: Any, key: str, info: ModelInfo) -> None:
    client.hset(key, mapping={"json": json.dumps(asdict(info))})


def read_model_info(client: Any, key: str) -> ModelInfo | None:
    raw = client.hget(key, "json")
    return None if raw is None else parse_model_info(raw)


def parse_model_info(raw: str | bytes) -> ModelInfo:
    data = json.loads(raw)
    known = {f.name for f in fields(ModelInfo)}
    data = {k: v for k, v in data.items() if k in known}
    data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
    return ModelInfo(**data)
