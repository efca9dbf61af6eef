"""Content keys of full KV blocks, for prefix caching: a block is reused only where its key matches.

Pure Python. A block's KV depends on every token before it, not only its own, so each key is chained:

    key[0] = H(salt, tokens[0:B])
    key[i] = H(key[i-1], tokens[i*B:(i+1)*B])

Two requests share block i exactly when they share all tokens up to the end of block i (and the
salt). The salt carries anything else that changes a block's contents for the same tokens: the
stack's model, dtype and KV layout are the same for every request of a pool, so it is empty by
default; a tenant that must not share cache with others passes its own (vLLM's `cache_salt`).

Keys are SHA-256 (Python's `hash` differs between processes, and prefill, decode and the gateway must
agree), truncated to 128 bits: a collision between two different prefixes is then far less likely
than a hardware fault. Only full blocks get a key: the last, partial one is never shared.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

KEY_BYTES = 16


def block_keys(token_ids: Sequence[int], block_size: int, salt: str = "",
               parent: str = "", start_block: int = 0) -> list[str]:
    """The keys of the full blocks of `token_ids` (hex strings, len(token_ids) // block_size of them).

    `parent` and `start_block` continue a chain: the keys of blocks start_block.. when `parent` is
    the key of block start_block - 1 (decode extends a request's keys as it fills blocks).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    keys: list[str] = []
    previous = parent.encode() if parent else b"salt:" + salt.encode()
    for first in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        block = token_ids[first:first + block_size]
        digest = hashlib.sha256(previous + struct.pack(f"<{block_size}q", *block)).hexdigest()[:2 * KEY_BYTES]
        keys.append(digest)
        previous = digest.encode()
    return keys


def reusable_keys(prompt_ids: Sequence[int], block_size: int, salt: str = "") -> list[str]:
    """The keys a new request may look up: its prompt's full blocks, except that at least one prompt
    token is always computed (its logits give the first output token), so a prompt that fills its
    last block exactly does not look that block up."""
    keys = block_keys(prompt_ids, block_size, salt)
    if keys and len(prompt_ids) == len(keys) * block_size:
        keys.pop()
    return keys


def num_reusable_blocks(num_tokens: int, block_size: int) -> int:
    """How many keys `reusable_keys` gives for a prompt of `num_tokens` (without hashing it)."""
    full = num_tokens // block_size
    return full - 1 if full and num_tokens == full * block_size else full


def shared_full_blocks(a: Sequence[int], b: Sequence[int], block_size: int, limit: int) -> int:
    """Leading full blocks (at most `limit`) whose tokens are the same in `a` and `b`: the blocks
    whose keys are equal (same salt), found without hashing."""
    shared = 0
    while shared < limit:
        lo, hi = shared * block_size, (shared + 1) * block_size
        if hi > len(a) or hi > len(b) or a[lo:hi] != b[lo:hi]:
            break
        shared += 1
    return shared
