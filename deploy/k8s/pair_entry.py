"""A pair container's entry point on Kubernetes: which pair this pod is, then the process itself.

    python /etc/duoserve/entry/pair_entry.py ROLE CMD [ARG...]

ROLE is arena, prefill, decode or orchestrator. CMD is exec'd (same pid, same signals) with, appended:
  --key-prefix BASE:pI   I is the pod's StatefulSet ordinal, the number after the last '-' of POD_NAME
                         (duoserve-pair-3 -> 3), BASE is DUOSERVE_KEY_BASE: pair I's Redis key space, the
                         one the gateway's --pair-prefixes names
  --cpus LIST            only where DUOSERVE_PAIR_CORES=K is set (the cpu variant): pair I's K cores are
                         the I-th run of K among the cores this container may use (wrapping round when the
                         node has fewer); prefill starts on the first half, decode on the rest, and the
                         orchestrator shares all K between them, as `duoserve up` splits a stack's cores
  --stack-cpus LIST      with --cpus, on prefill and decode: the pair's K cores, which their shares are
                         fractions of (as `duoserve up --pairs` passes; else every core the container sees)
Appended, so they win over the same flags earlier in CMD (argparse keeps the last), and the reaper finds
them there when it starts a worker's successor. Standard library only: it runs before anything else.
The pods' copy is the ConfigMap `duoserve-pair-entry` that deploy/k8s/objects.py makes of this file.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Mapping, Sequence

ROLES = ("arena", "prefill", "decode", "orchestrator")
CORE_ROLES = ("prefill", "decode", "orchestrator")      # the processes that take --cpus


def pair_index(pod_name: str) -> int:
    """A StatefulSet pod's ordinal: `<statefulset name>-<ordinal>`."""
    match = re.fullmatch(r".+-(\d+)", pod_name)
    if match is None:
        raise ValueError(f"POD_NAME {pod_name!r} is not a StatefulSet pod's name (<name>-<ordinal>)")
    return int(match.group(1))


def pair_cores(index: int, per_pair: int, available: Sequence[int]) -> tuple[int, ...]:
    """Pair `index`'s cores: the index-th run of `per_pair` of the sorted available cores, wrapping."""
    cores = sorted(available)
    if per_pair < 1 or not cores:
        raise ValueError(f"need at least one core per pair and one available, got {per_pair} of {cores}")
    picked = [cores[(index * per_pair + j) % len(cores)] for j in range(per_pair)]
    return tuple(dict.fromkeys(picked))          # fewer cores than asked: each once


def role_cores(role: str, cores: tuple[int, ...]) -> tuple[int, ...]:
    """What `role` starts on (StackConfig.worker_cpus' split: 2 cores -> prefill 0, decode 1)."""
    half = max(1, len(cores) // 2)
    return {"prefill": cores[:half], "decode": cores[half:] or cores[-1:]}.get(role, cores)


def argv_for(role: str, cmd: Sequence[str], env: Mapping[str, str], available: Sequence[int]) -> list[str]:
    """CMD with this pod's pair flags appended (see the module's docstring)."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not cmd:
        raise ValueError("no command to run")
    index = pair_index(env.get("POD_NAME", ""))
    argv = [*cmd, "--key-prefix", f"{env.get('DUOSERVE_KEY_BASE', 'duo')}:p{index}"]
    per_pair = env.get("DUOSERVE_PAIR_CORES", "")
    if per_pair and role in CORE_ROLES:
        pair = pair_cores(index, int(per_pair), available)
        argv += ["--cpus", ",".join(map(str, role_cores(role, pair)))]
        if role in ("prefill", "decode"):
            argv += ["--stack-cpus", ",".join(map(str, pair))]
    return argv


def main(args: Sequence[str]) -> None:
    if len(args) < 2:
        sys.exit("usage: pair_entry.py ROLE CMD [ARG...]")
    argv = argv_for(args[0], args[1:], os.environ, sorted(os.sched_getaffinity(0)))
    print(f"pair_entry: {' '.join(argv)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
