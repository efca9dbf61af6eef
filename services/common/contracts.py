"""What the processes of a stack say to each other through Redis: one dataclass per boundary.

Pure Python (no redis import). Every message travels as one stream entry whose field `m` holds
its JSON; `to_json`/`from_json` are the only (de)serializers, so a field added here is added
everywhere, and `services.common.stream_entries` is the only module that builds or parses an entry.
Processes exchange token ids and block ids, never tensors.

  gateway  --QueuedRequest-->  prefill queue   (decode also re-queues preempted requests here)
  prefill  --Handoff------->   decode admit stream
  prefill, decode --TokenDeliveries--> the gateway's reply stream (`QueuedRequest.reply_to`): one
                   entry per gateway per iteration (a lone TokenDelivery is read as well)
  gateway  --CancelNotice-->   cancel stream (read by every worker, each from its own cursor)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace  # noqa: F401 (asdict: kept for callers)
from typing import Any, TypeVar

from services.engine.sampling_params import SamplingParams

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Redis key names of one stack. Several stacks can share a Redis with different prefixes."""

    prefix: str = "duo"

    @property
    def prefill_queue(self) -> str:       # stream of QueuedRequest, consumer group "prefill"
        return f"{self.prefix}:prefill:queue"

    @property
    def decode_admit(self) -> str:        # stream of Handoff, consumer group "decode"
        return f"{self.prefix}:decode:admit"

    @property
    def cancel(self) -> str:              # stream of CancelNotice, capped; read without a group
        return f"{self.prefix}:cancel"

    def reply(self, gateway_id: str) -> str:   # stream of TokenDelivery for one gateway (kept across its restarts)
        return f"{self.prefix}:reply:{gateway_id}"

    def gateway_requests(self, gateway_id: str) -> str:   # hash: engine id -> RequestRecord of a gateway's requests
        return f"{self.prefix}:gateway:{gateway_id}:requests"

    def gateway_lease(self, gateway_id: str) -> str:   # string with a TTL: "host pid start_time holder" of the live
        return f"{self.prefix}:gateway:{gateway_id}:lease"   # process that follows this gateway's requests

    @property
    def gateways(self) -> str:            # hash: gateway id -> when its lease was last renewed (Redis ms)
        return f"{self.prefix}:gateways"

    @property
    def kv_free(self) -> str:             # list of free block ids
        return f"{self.prefix}:kv:free"

    def kv_owned(self, request_id: str) -> str:   # list of a request's block ids, in token order
        return f"{self.prefix}:kv:owned:{request_id}"

    @property
    def kv_meta(self) -> str:             # hash: num_blocks, block_size
        return f"{self.prefix}:kv:meta"

    # Prefix caching (services.common.redis_blocks): the keyed blocks, their references, eviction order.
    @property
    def kv_cache_index(self) -> str:      # hash: block key (prefix_hash) -> the block id that holds it
        return f"{self.prefix}:kv:cache:index"

    @property
    def kv_cache_keys(self) -> str:       # hash: block id -> its key (the index's reverse)
        return f"{self.prefix}:kv:cache:keys"

    @property
    def kv_cache_refs(self) -> str:       # hash: keyed block id -> how many requests' tables hold it
        return f"{self.prefix}:kv:cache:refs"

    @property
    def kv_cache_lru(self) -> str:        # sorted set: keyed blocks no request holds, by release order
        return f"{self.prefix}:kv:cache:lru"

    @property
    def kv_cache_clock(self) -> str:      # counter: the release order's next score
        return f"{self.prefix}:kv:cache:clock"

    @property
    def model_info(self) -> str:          # hash written by the arena: model name, sizes, limits
        return f"{self.prefix}:model"

    def worker_stats(self, worker: str) -> str:   # hash: a worker's latest stats (field "m": WorkerReport)
        return f"{self.prefix}:worker:{worker}"

    @property
    def timings(self) -> str:             # capped stream of IterationSample, read by the orchestrator
        return f"{self.prefix}:timings"

    @property
    def latencies(self) -> str:           # capped stream of RequestLatency, written by gateways
        return f"{self.prefix}:latencies"

    @property
    def decisions(self) -> str:           # list of the orchestrator's decisions (JSON), newest first
        return f"{self.prefix}:orchestrator:decisions"

    @property
    def orchestrator_state(self) -> str:  # hash: SLO, policy mode, pinned shares (survives restarts)
        return f"{self.prefix}:orchestrator:state"

    def request_claim(self, request_id: str) -> str:   # string with a TTL: a client's request id while it runs
        return f"{self.prefix}:request:{request_id}"

    def decode_progress(self, request_id: str) -> str:   # list: tokens decode (or colocated) delivered since its input entry
        return f"{self.prefix}:decode:progress:{request_id}"

    def worker_alive(self, worker_id: str) -> str:   # string with a TTL: "host pid start_time" of a live worker
        return f"{self.prefix}:alive:{worker_id}"

    # A retune by succession's keys are owned by services/common/succession.py.

    @property
    def epoch(self) -> str:               # string: a token set once per data set; a Redis that came back
        return f"{self.prefix}:epoch"     # empty has another (services/common/redis_retry.DataEpoch)


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request waiting for prefill."""

    request_id: str                        # unique within the stack, assigned by the gateway
    prompt_token_ids: tuple[int, ...]      # the tokenized prompt
    sampling: SamplingParams               # validated by the gateway
    reply_to: str                          # stream key where TokenDelivery for it goes
    arrival_time: float                    # wall clock (time.time()) when the gateway accepted it
    output_token_ids: tuple[int, ...] = () # already generated and delivered (set when decode preempted it)


@dataclass(frozen=True, slots=True)
class Handoff:
    """What prefill gives decode for one request. No tensors: the KV is already in the shared pool."""

    request_id: str
    block_ids: tuple[int, ...]             # the request's KV blocks in token order (owned in Redis by it)
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]      # generated so far; the last one (sampled by prefill) has no KV yet
    num_computed_tokens: int               # tokens whose K/V are in the blocks
    sampling: SamplingParams
    reply_to: str
    arrival_time: float                    # as in QueuedRequest
    handoff_time: float                    # wall clock when prefill published this (hand-off latency)
    kv_memory: str = ""                    # the arena memory the blocks are in (ArenaExport.memory_id): decode
                                           # resumes in place only over the same memory; "" unknown (older writer)
    kv_ready_event: str = ""               # cuda: hex IPC handle of the event prefill recorded after writing
                                           # the blocks; decode's stream waits on it (services/worker/fence.py);
                                           # "" when the writer fenced on the host (cpu, or no cuda-python)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position, from
    the log_softmax of the raw model logits (before penalties, temperature, top-k/p: vLLM V1's default)."""

    token_id: int                          # the generated token
    logprob: float                         # its log-probability
    top: tuple[tuple[int, float], ...] = ()   # (token id, logprob) of the k most likely, best first


@dataclass(frozen=True, slots=True)
class TokenDelivery:
    """New tokens of one request, or its end, sent to the gateway that owns the client stream."""

    request_id: str
    token_ids: tuple[int, ...]             # tokens generated since the previous delivery
    finish_reason: str | None = None       # "stop" | "length" | "cancelled" | "error" on the last one
    error: str = ""                        # with finish_reason "error": what went wrong, for the client
    queue_time_ms: float | None = None     # on prefill's first delivery: arrival to prefill start
    cached_tokens: int | None = None       # on prefill's first delivery: prompt tokens found in the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()   # parallel to token_ids when the request asked (sampling.logprobs)
    position: int | None = None            # index of token_ids[0] among the request's output tokens: a
                                           # request recomputed after a worker died may deliver a token
                                           # again, and the gateway keeps only what it had not sent

    def after(self, num_delivered: int) -> TokenDelivery:
        """This delivery without the tokens (and logprobs) before output index `num_delivered`."""
        skip = 0 if self.position is None else max(0, num_delivered - self.position)
        if not skip:
            return self
        return replace(self, token_ids=self.token_ids[skip:], logprobs=self.logprobs[skip:],
                       position=self.position + skip)


@dataclass(frozen=True, slots=True)
class TokenDeliveries:
    """One iteration's deliveries to one gateway, in one stream entry (one XADD per gateway per
    iteration instead of one per request: the token path's Redis and parsing work stays flat in the
    batch size)."""

    deliveries: tuple[TokenDelivery, ...]


def deliveries_from_json(text: str | bytes) -> tuple[TokenDelivery, ...]:
    """The deliveries of a reply-stream entry: a TokenDeliveries, or a lone TokenDelivery."""
    data = json.loads(text)
    if "deliveries" in data:
        return tuple(from_json(TokenDelivery, item) for item in data["deliveries"])
    return (from_json(TokenDelivery, data),)


@dataclass(frozen=True, slots=True)
class CancelNotice:
    """Stop a request wherever it is; its blocks are freed by whoever holds it."""

    request_id: str
    reason: str = "cancelled"              # "cancelled" (client gone) | "stop" (stop string seen by the gateway)


@dataclass(frozen=True, slots=True)
class IterationSample:
    """One engine iteration as the performance model sees it."""

    phase: str                 # "prefill" | "decode" | "colocated"
    share: float               # fraction of the device the worker had (cores or SMs)
    num_units: int             # cores (CPU) or SMs (GPU) that share amounts to
    num_prefill_tokens: int    # prompt tokens fed
    num_decode_tokens: int     # decode rows (one token each)
    num_requests: int          # requests in the batch
    context_tokens: int        # sum of the decode rows' context lengths (KV read per step)
    attention_work: int        # sum over prefill chunks of query_len * context_len
    elapsed_ms: float          # measured wall time of the iteration
    time: float                # wall clock at its end


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A worker's latest state, overwritten every iteration (and on share changes)."""

    phase: str
    worker_id: str
    grpc_target: str           # where its Worker service listens (SetComputeShare)
    share: float               # the share it is at, or moving to (share_pending): the latest it accepted
    cpu_ids: tuple[int, ...]
    token_budget: int
    num_running: int
    num_waiting: int
    iterations: int
    kv_blocks_free: int
    kv_blocks_total: int
    updated_at: float          # wall clock
    context_tokens: int = 0    # decode: tokens of KV its running batch reads per iteration
    pid: int = 0               # its process (a retune by succession replaces it)
    share_switch_ms: float = 0.0   # last share change: a retune by succession, SetComputeShare call to this
                                   # worker's first iteration; in place (CPU cores), the time moving the threads took
    share_switch_stall_ms: float = 0.0   # of that, the pause: the old worker's last iteration to the new one's
                                         # first (in place: all of it)
    units_kind: str = ""       # what units_used counts: "sm" (cuda, the SM probe) or "core" (cpu); "" unknown
    units_used: int = 0        # SMs / cores the share in force actually gives it; 0 unknown
    units_total: int = 0       # SMs of the device / cores of the stack; 0 unknown
    host_ms: float = 0.0       # median host time per iteration (outside the forward pass), recent iterations
    share_pending: bool = False    # `share` is requested, not in effect yet (at the next boundary, or a succession)
    share_changed_at: float = 0.0  # its clock when its share state last changed: a SetComputeShare reply's
                                   # changed_at_unix_ms at most this is reflected here (0: a worker from before)
    draining: bool = False     # it was told to drain (Drain): it takes no new work; a gateway routes none to its pair
    prefix_caching: bool = False   # its scheduler reuses cached blocks (off: --no-prefix-caching, or an older worker)
    cache_salt: str = ""       # the salt of its block keys (prefix_hash; the KV memory's identity): the orchestrator
                               # keys waiting prompts with it to see how much of them is cached
    prefix_query_tokens: int = 0   # prompt tokens its admissions looked up in the prefix cache, since it started
    prefix_hit_tokens: int = 0     # of those, found cached (vLLM's prefix_cache_queries / _hits)


@dataclass(frozen=True, slots=True)
class RequestedShare:
    """A compute share a worker was asked for and has not applied yet (SetComputeShare's request)."""

    share: float                           # fraction of the stack's cores (or of the GPU)
    cpu_ids: tuple[int, ...]               # its cores (CPU backend; empty on CUDA)
    token_budget: int                      # prefill tokens per iteration (0: unchanged)
    requested_at: float                    # wall clock of the SetComputeShare call


@dataclass(frozen=True, slots=True)
class SuccessionState:
    """What a retiring worker hands its successor at the switch of a retune by succession
    (`Worker.export_state` -> `Worker.import_state`). No tensors: the KV stays in the shared pool,
    owned in Redis by each request, and its input entries stay pending with the retiring worker's
    consumer, where the successor claims them; nothing is copied or re-owned."""

    from_worker_id: str                    # the retiring worker (its consumer holds the pending entries)
    share: float                           # the share the successor was started at
    cpu_ids: tuple[int, ...]               # its cores (CPU backend; empty on CUDA)
    token_budget: int                      # prefill tokens per iteration to apply (0: unchanged)
    requested_at: float                    # wall clock of the SetComputeShare call (switch latency starts)
    released_at: float                     # wall clock when the retiring worker stopped (the pause starts)
    # What it held, for the log: the successor claims every entry pending with the old worker's consumer
    running: tuple[Handoff, ...] = ()      # decode: every request it held, mid-generation
    pending_entry_ids: tuple[str, ...] = ()   # prefill: its queue entries (recomputed by the successor)
    queued: RequestedShare | None = None   # a share requested during the succession: the successor applies it


@dataclass(frozen=True, slots=True)
class RequestLatency:
    """One finished request as its client saw it, for SLO attainment."""

    ttft_ms: float             # arrival at the gateway to first token
    tpot_ms: float             # mean time per output token after the first (0 with one token)
    num_prompt_tokens: int
    num_completion_tokens: int
    time: float                # wall clock when it finished


# Fields left out of the JSON when they hold an empty tuple (their default): most deliveries carry no
# logprobs, and a token's alternatives are empty with logprobs=0. from_json restores the default.
_OMIT_WHEN_EMPTY = frozenset({"logprobs", "top"})


def to_json(message: Any) -> str:
    return json.dumps(_plain(message), separators=(",", ":"))


def _plain(value: Any) -> Any:
    """asdict's JSON-ready result without its deep copies (~4x faster on a batch of deliveries):
    dataclasses become dicts, tuples lists, recursively; everything else is already plain."""
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name)) for name in value.__dataclass_fields__
                if name not in _OMIT_WHEN_EMPTY or getattr(value, name) != ()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value] if value and not isinstance(value[0], (int, float, str)) \
            else list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_json(cls: type[T], text: str | bytes | dict) -> T:
    data = json.loads(text) if isinstance(text, (str, bytes)) else text   # a dict: a nested message
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue           # a field added later: the dataclass default applies
        value = data[f.name]
        if f.name == "sampling":
            sp = dict(value)
            sp["stop"] = tuple(sp.get("stop", ()))
            sp["stop_token_ids"] = tuple(sp.get("stop_token_ids", ()))
            value = SamplingParams(**sp)
        elif f.name == "running":          # SuccessionState's hand-offs
            value = tuple(from_json(Handoff, item) for item in value)
        elif f.name == "queued" and value is not None:     # SuccessionState's queued share
            value = from_json(RequestedShare, value)
        elif f.name == "logprobs" and isinstance(value, list):   # TokenDelivery's
            value = tuple(TokenLogprob(item["token_id"], item["logprob"],
                                       tuple(tuple(pair) for pair in item.get("top", ())))
                          for item in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)
