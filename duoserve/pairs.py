"""Pairs: what one arena + prefill + decode + orchestrator is called, where its state lives, which
cores it gets. Pure (no processes, no sockets): `stack_plan` and the supervisor use it.

A stack of N pairs (`duoserve up --pairs N`) runs one Redis and one gateway (or more) in front of N
pairs. Pair i's processes are named `<role>-p<i>` (one pair: `<role>`, as before), its Redis keys
live under `<stack prefix>:p<i>` (queues, KV blocks, shares, reports: everything per pair; the
gateways' own keys stay under the stack prefix), its shared memory is named after
`<stack id>_p<i>` and its arena listens on its own socket. On the CPU the stack's cores are divided
between the pairs (then halved between prefill and decode as for one pair); on GPUs a pair is one
device.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

PAIR_ROLES = ("arena", "prefill", "decode", "orchestrator")   # a pair's processes
_PAIRED = re.compile(r"(?P<role>[a-z]+)-p(?P<pair>\d+)")


def name_in_pair(role: str, pair: int, num_pairs: int) -> str:
    """The process name of `role` in pair `pair`: "prefill" in a one-pair stack, "prefill-p1" in more."""
    return role if num_pairs == 1 else f"{role}-p{pair}"


def role_of(name: str) -> str:
    """"prefill-p1" -> "prefill"; a name outside any pair is its own role."""
    match = _PAIRED.fullmatch(name)
    return match["role"] if match else name


def pair_of(name: str) -> int:
    """"prefill-p1" -> 1; a process of a one-pair stack (or none: redis, gateway) -> 0."""
    match = _PAIRED.fullmatch(name)
    return int(match["pair"]) if match else 0


def sibling(name: str, role: str) -> str:
    """The process of `role` in `name`'s pair: sibling("arena-p1", "decode") == "decode-p1"."""
    match = _PAIRED.fullmatch(name)
    return f"{role}-p{match['pair']}" if match else role


def pair_key_prefix(stack_prefix: str, pair: int, num_pairs: int) -> str:
    """Pair `pair`'s Redis key space: the stack's own in a one-pair stack (its keys as they always were)."""
    return stack_prefix if num_pairs == 1 else f"{stack_prefix}:p{pair}"


def pair_key_prefixes(stack_prefix: str, num_pairs: int) -> tuple[str, ...]:
    return tuple(pair_key_prefix(stack_prefix, i, num_pairs) for i in range(num_pairs))


def pair_stack_id(stack_id: str, pair: int, num_pairs: int) -> str:
    """What names pair `pair`'s shared-memory segments (duoserve-<id>-...; letters, digits and '_')."""
    return stack_id if num_pairs == 1 else f"{stack_id}_p{pair}"


def pair_socket(arena_socket: Path, pair: int, num_pairs: int) -> Path:
    """Pair `pair`'s arena socket, beside the stack's."""
    return arena_socket if num_pairs == 1 else arena_socket.with_name(f"arena-p{pair}.sock")


def divide_cores(cores: Sequence[int], num_pairs: int) -> list[tuple[int, ...]]:
    """The stack's cores in `num_pairs` contiguous slices, as even as they go (the first get one more);
    ValueError when there are fewer cores than pairs (a pair needs one at least)."""
    if num_pairs < 1:
        raise ValueError(f"--pairs must be at least 1, got {num_pairs}")
    cores = tuple(cores)
    if len(cores) < num_pairs:
        raise ValueError(f"--pairs {num_pairs} needs at least {num_pairs} cores; this stack has {len(cores)} "
                         f"({list(cores)}): give fewer pairs or more --cpus")
    size, extra = divmod(len(cores), num_pairs)
    slices, start = [], 0
    for i in range(num_pairs):
        end = start + size + (1 if i < extra else 0)
        slices.append(cores[start:end])
        start = end
    return slices
