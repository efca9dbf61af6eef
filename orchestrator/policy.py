"""Which compute shares and prefill token budget the workers get, from the queue state and the SLOs.

Pure Python (no torch, grpc, redis or numpy): every prediction comes from `PerfModel`. The algorithm,
step by step, is in docs/performance-model.md; in short, every tick:

  1. decode: the predicted iteration time at each decode share gives its TPOT headroom
     (target * (1 - margin) / predicted); it grows with the share
  2. prefill: the waiting queue is replayed earliest-deadline-first through predicted prefill
     iterations at the remaining share and each token budget; the TTFT headroom is the smallest
     (deadline with margin) / (predicted first token) over the requests that can still make it
  3. both hold: the split with the largest smaller headroom (the most load both phases can absorb);
     they cannot both hold: the operator's preferred SLO is protected and the other reported at risk
  4. hysteresis: the shares move only when the move fixes a predicted miss, or when its headroom gain
     beats the band plus the switch cost spread over the horizon; and only when queued work needs it,
     that need has persisted for a few ticks, and the last move is at least a dwell ago
     (orchestrator/hold.py): an idle or nearly idle stack keeps its shares

Modes: `auto` (the algorithm), `static` (configured shares), `manual` (pinned by the operator); the
last two still predict and report what is at risk.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from orchestrator.coresidency import IDLE, CoResidency, for_device, iteration_demand, shared_fraction, stretch
from orchestrator.hold import Hold, HoldConfig, Need, need_of
from orchestrator.perf_model import PerfModel

EXHAUSTIVE_SPLITS = 16     # up to this many splits, every one is evaluated each tick


class PolicyMode(enum.Enum):
    AUTO = "auto"          # the SLO-aware algorithm
    STATIC = "static"      # PolicyConfig.static_shares, always
    MANUAL = "manual"      # shares pinned by the operator (Policy.pin)


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets, and which one to protect when both cannot hold."""

    ttft_ms: float               # time to first token, arrival to first token
    tpot_ms: float               # time per output token (one decode iteration)
    percentile: float = 0.9      # the percentile the targets are quoted at (reported predictions use it)
    prefer: str = "ttft"         # "ttft" | "tpot": protected when both cannot hold
    margin: float = 0.1          # predictions must stay under (1 - margin) * target

    def __post_init__(self) -> None:
        if self.ttft_ms <= 0 or self.tpot_ms <= 0:
            raise ValueError("ttft_ms and tpot_ms must be positive")
        if not 0 < self.percentile <= 1:
            raise ValueError("percentile must be in (0, 1]")
        if self.prefer not in ("ttft", "tpot"):
            raise ValueError("prefer must be 'ttft' or 'tpot'")
        if not 0 <= self.margin < 1:
            raise ValueError("margin must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    """A request that has not had its first token yet."""

    arrival_time: float          # wall clock seconds (time.time()) when the gateway accepted it
    prompt_tokens: int           # tokens to prefill in all
    computed_tokens: int = 0     # already prefilled (a long prompt part-way through its chunks)
    cached_tokens: int = 0       # not admitted yet: its leading tokens in the prefix cache, not computed again


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the orchestrator reads from Redis each tick."""

    now: float                              # wall clock seconds
    waiting: Sequence[WaitingRequest]       # the prefill queue, in any order
    decode_batch_size: int                  # running decode requests
    decode_context_tokens: int              # their context lengths, summed
    kv_free_blocks: int
    kv_total_blocks: int
    block_size: int = 16                    # tokens per KV block


@dataclass(frozen=True, slots=True)
class Shares:
    """What SetComputeShare carries to the two workers."""

    prefill: float               # fraction of the device (cores or SMs)
    decode: float
    token_budget: int            # prefill tokens per iteration at most


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one tick, with the predictions behind it."""

    shares: Shares
    reason: str                             # why, for a person (status, logs)
    mode: PolicyMode
    changed: bool                           # shares differ from the current ones
    at_risk: str | None                     # "ttft" | "tpot" | "both": predicted not to hold with the margin
    predicted_tpot_ms: float                # decode iteration at the chosen share
    predicted_ttft_ms: float | None         # the SLO percentile of the queued requests' predicted TTFT
    predicted_ttft_misses: int              # queued requests predicted past the TTFT target
    predicted_tpot_miss: bool               # decode iteration predicted past the TPOT target
    ttft_headroom: float                    # how many times slower prefill could run and still hold
    tpot_headroom: float                    # the same for decode


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """How the policy searches and when it moves."""

    mode: PolicyMode = PolicyMode.AUTO
    static_shares: Shares | None = None     # the shares of mode static
    token_budgets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    switch_cost_ms: float = 0.0             # what a share change costs, measured on the backend (the controller
                                            # adopts the workers' figure): CPU the in-place core change, CUDA
                                            # the handover (standby start-up and pause); charged in the band
                                            # and the dwell
    switch_pause_ms: float | None = None    # of that, the time the phase stops serving (a move's replay starts
                                            # this late); None: all of it (an in-place change)
    hysteresis: float = 0.1                 # relative headroom gain a move must beat when no SLO is at stake
    horizon_ms: float = 2000.0              # a move's switch cost is spread over this much time (or the dwell)
    hold: HoldConfig = HoldConfig()         # hysteresis in time: need, persistence, dwell (orchestrator/hold.py)
    overlap: float = 0.0                    # GPU: the prefill cap may exceed 1 - decode by this share
    coresidency: CoResidency | None = None  # how the two phases slow each other; None: the device's default
                                            # (GPU: the prior, CPU: time-shared; coresidency.for_device)
    probe_prompt_tokens: int = 1024         # an empty queue is judged by one such request arriving now
    max_sim_iterations: int = 256           # longer prefill replays are extrapolated

    def __post_init__(self) -> None:
        if not self.token_budgets or min(self.token_budgets) < 1:
            raise ValueError("token_budgets must be positive")
        if self.mode is PolicyMode.STATIC and self.static_shares is None:
            raise ValueError("mode static needs static_shares")
        if self.switch_cost_ms < 0 or self.hysteresis < 0 or self.horizon_ms <= 0:
            raise ValueError("switch_cost_ms and hysteresis must be >= 0, horizon_ms > 0")
        if self.switch_pause_ms is not None and not 0 <= self.switch_pause_ms <= self.switch_cost_ms:
            raise ValueError("switch_pause_ms must be in [0, switch_cost_ms]")
        if not 0 <= self.overlap <= 1:
            raise ValueError("overlap must be in [0, 1]")
        if self.probe_prompt_tokens < 1 or self.max_sim_iterations < 1:
            raise ValueError("probe_prompt_tokens and max_sim_iterations must be at least 1")

    @property
    def pause_ms(self) -> float:
        return self.switch_cost_ms if self.switch_pause_ms is None else self.switch_pause_ms


@dataclass(frozen=True, slots=True)
class _Request:
    """A queued request as the replay sees it; times in ms relative to now."""

    arrival_ms: float            # <= 0
    remaining: int               # prompt tokens still to prefill
    computed: int                # prompt tokens already prefilled
    blocks: int                  # KV blocks it needs on admission (0: already admitted)
    deadline_ms: float           # arrival + TTFT target
    margin_deadline_ms: float    # arrival + TTFT target * (1 - margin)
    viable: bool                 # could still make its deadline with the whole device
    probe: bool = False          # stands for the next arrival; not a real request


@dataclass(slots=True)
class _Prefill:
    """One prefill share and budget replayed over the queue."""

    units: int
    budget: int
    headroom: float                         # min over viable requests of margin deadline / first token
    ttfts: list[float] = field(default_factory=list)   # predicted TTFT of each real request (inf: KV-blocked)
    misses: int = 0                         # real requests predicted past the raw target (lost ones too)
    kv_blocked: int = 0                     # real requests that wait for decode to free KV blocks


@dataclass(slots=True)
class _Candidate:
    prefill_units: int
    decode_units: int
    prefill: _Prefill
    tpot_ms: float
    tpot_headroom: float
    delay_ms: float

    @property
    def holds_ttft(self) -> bool:
        return self.prefill.headroom >= 1.0

    @property
    def holds_tpot(self) -> bool:
        return self.tpot_headroom >= 1.0


class Policy:
    """Chooses shares and a token budget each tick."""

    def __init__(self, model: PerfModel, config: PolicyConfig | None = None):
        self.model = model
        self.config = config or PolicyConfig()
        self.mode = self.config.mode
        self.coresidency = self.config.coresidency or for_device(model.device.kind)
        self.pinned: Shares | None = None
        self.hold = Hold(self.config.hold)
        self._splits = self._make_splits()

    # ------------------------------------------------------------------ operator controls
    def pin(self, shares: Shares) -> None:
        """Mode manual with these shares, until the mode changes."""
        self.pinned = shares
        self.mode = PolicyMode.MANUAL

    def set_mode(self, mode: PolicyMode) -> None:
        if mode is PolicyMode.MANUAL and self.pinned is None:
            raise ValueError("mode manual needs pinned shares: use pin()")
        if mode is PolicyMode.STATIC and self.config.static_shares is None:
            raise ValueError("mode static needs PolicyConfig.static_shares")
        self.mode = mode

    def splits(self) -> list[tuple[float, float]]:
        """The (prefill, decode) share pairs auto chooses from, decode share ascending."""
        n = self.model.device.num_units
        return [(p / n, d / n) for p, d in self._splits]

    def _make_splits(self) -> list[tuple[int, int]]:
        """(prefill units, decode units): disjoint splits summing to the device, each phase >= one step,
        plus, with `overlap`, the same decode share under a prefill cap that also reaches into
        decode's units (an MPS limit is a cap; on the CPU two workers may share cores). `_evaluate`
        charges the contention (orchestrator/coresidency.py; disabled: overlapping units time-shared)."""
        device = self.model.device
        n, step = device.num_units, device.unit_granularity
        if n < 2 * step:
            return [(n, n)]                 # one unit: both phases share it
        extra = int(self.config.overlap * n / step + 1e-9) * step
        splits = []
        for d in range(step, n, step):
            splits.append((n - d, d))
            if extra and n - d + extra > n - d:
                splits.append((min(n, n - d + extra), d))
        return sorted(set(splits), key=lambda pd: (pd[1], -pd[0]))

    # ------------------------------------------------------------------ the tick
    def decide(self, state: QueueState, current: Shares, slo: SLO) -> Decision:
        queue = self._prepare(state, slo)
        if self.mode is PolicyMode.AUTO:
            return self._auto(state, queue, current, slo)
        shares = self.config.static_shares if self.mode is PolicyMode.STATIC else self.pinned
        if shares is None:
            raise ValueError(f"mode {self.mode.value} has no shares")
        chosen = self._evaluate(state, queue, slo, self.model.units_for(shares.prefill),
                                self.model.units_for(shares.decode), shares.token_budget, 0.0)
        what = "configured" if self.mode is PolicyMode.STATIC else "pinned by the operator"
        return self._decision(chosen, shares, current, slo, state, f"{self.mode.value}: shares {what}")

    def _auto(self, state: QueueState, queue: list[_Request], current: Shares, slo: SLO) -> Decision:
        cur_units = (self.model.units_for(current.prefill), self.model.units_for(current.decode))
        now = self._evaluate(state, queue, slo, *cur_units, current.token_budget, 0.0)
        need = self._need(state, now)
        self.hold.observe(cur_units, need)
        if not need:        # nothing real waits, or everything has room: no search, no move
            return self._decision(now, current, current, slo, state, "auto: kept: no queued work needs a move")
        if not self.hold.persisted(need):
            why = (f"auto: kept: {need.text()} at these shares, seen {self.hold.streak} of "
                   f"{self.config.hold.persist_ticks} ticks")
            return self._decision(now, current, current, slo, state, why)
        dwell_ms = self.config.hold.dwell_ms(self.config.switch_cost_ms)
        dwell_left = self.hold.dwell_left_s(state.now, self.config.switch_cost_ms)
        if dwell_left > 0:          # the split stays; only the budget may move
            stay = self._evaluate(state, queue, slo, *cur_units, None, 0.0)
            conflict = self._score(stay, slo)[0] < 2
            why = f"the last move was {dwell_ms / 1000 - dwell_left:.1f} s ago (dwell {dwell_ms / 1000:.1f} s)"
        else:
            best = self._search(state, queue, slo, cur_units)
            conflict = self._score(best, slo)[0] < 2        # no split holds both SLOs
            if (best.prefill_units, best.decode_units) == cur_units:
                stay, why = best, "the current split is the best"
            else:
                band = self.config.hysteresis + self.config.switch_cost_ms / max(self.config.horizon_ms, dwell_ms)
                move, why = self._better(best, now, slo, band)
                if move and not need.helped_by(best.prefill.headroom, best.tpot_headroom):
                    move, why = False, f"the move would not help {need.text()}"
                if move:
                    n = self.model.device.num_units
                    shares = Shares(best.prefill_units / n, best.decode_units / n, best.prefill.budget)
                    self.hold.moved(state.now, (best.prefill_units, best.decode_units))
                    return self._decision(best, shares, current, slo, state, f"auto: {why}", conflict)
                stay = self._evaluate(state, queue, slo, *cur_units, None, 0.0)    # best budget, current split
        if stay.prefill.budget != current.token_budget and need.ttft is not None:   # free: no switch, no dwell
            move, budget_why = self._better(stay, now, slo, self.config.hysteresis)
            if move and stay.prefill.headroom > need.ttft:
                shares = Shares(current.prefill, current.decode, stay.prefill.budget)
                return self._decision(stay, shares, current, slo, state, f"auto: token budget: {budget_why}",
                                      conflict)
            why += f"; token budget {stay.prefill.budget}: {budget_why}"
        return self._decision(now, current, current, slo, state, f"auto: kept: {why}", conflict)

    def _need(self, state: QueueState, now: _Candidate) -> Need:
        """What real work (not the probe) asks of the current shares (orchestrator/hold.py)."""
        has_queue = any(r.prompt_tokens > r.computed_tokens for r in state.waiting)
        errors = [s.p90 for phase, s in self.model.error_stats().items() if phase in ("prefill", "decode")]
        error = self.hold.model_error(max(errors) if errors else None)
        return need_of(self.config.hold, has_queue, now.prefill.headroom, now.prefill.misses,
                       state.decode_batch_size > 0, now.tpot_headroom, error)

    def _better(self, new: _Candidate, old: _Candidate, slo: SLO, band: float) -> tuple[bool, str]:
        """Whether to move from old to new, and why (or why not): a rank or a count decides at once;
        a headroom has to beat the band."""
        rank_new, discrete_new, scalar_new, _ = self._score(new, slo)
        rank_old, discrete_old, scalar_old, _ = self._score(old, slo)
        if rank_new != rank_old:
            if rank_new > rank_old:
                return True, "the move makes " + _holds_text(new)
            return False, "every move holds fewer SLOs (switch cost included)"
        if discrete_new != discrete_old:
            if discrete_new > discrete_old:
                if new.prefill.misses < old.prefill.misses:
                    return True, f"the move cuts predicted TTFT misses {old.prefill.misses} -> {new.prefill.misses}"
                return True, "the move makes " + _holds_text(new)
            return False, "every move predicts more misses"
        gain = _gain(scalar_new, scalar_old)
        if gain > band:
            return True, f"predicted headroom gain {gain:.0%} beats the band {band:.0%}"
        return False, f"predicted gain {max(gain, 0.0):.0%} is inside the band {band:.0%}"

    def _score(self, c: _Candidate, slo: SLO) -> tuple[int, tuple, float, float]:
        """(rank, counts, headroom, tie-break), larger better, compared in that order.

        rank 2: both SLOs hold; the smaller headroom counts (the load both phases can still absorb).
        rank 1: only the preferred holds; the other's misses, then its headroom.
        rank 0: the preferred fails; its misses (TTFT), whether the other holds, then its headroom.
        """
        if c.holds_ttft and c.holds_tpot:
            return (2, (), min(c.prefill.headroom, c.tpot_headroom), 0.0)
        ttft_misses = -c.prefill.misses
        if slo.prefer == "ttft":
            if c.holds_ttft:
                return (1, (), c.tpot_headroom, c.prefill.headroom)
            return (0, (ttft_misses, c.holds_tpot), c.prefill.headroom, c.tpot_headroom)
        if c.holds_tpot:
            return (1, (ttft_misses,), c.prefill.headroom, c.tpot_headroom)
        return (0, (c.holds_ttft,), c.tpot_headroom, c.prefill.headroom)

    # ------------------------------------------------------------------ search
    def _search(self, state: QueueState, queue: list[_Request], slo: SLO,
                cur_units: tuple[int, int]) -> _Candidate:
        """The best split and its best budget.

        The splits form families (disjoint; prefill's cap reaching `overlap` into decode's). Along a
        family (decode share ascending) TPOT headroom rises and TTFT headroom falls, so its best split of
        every rank lies at a breakpoint: the two ends, the first split where TPOT holds, the last where
        TTFT holds, or (where both hold) the split where the two headrooms cross. Both sides are found by
        bisection, so a tick replays the queue for O(log splits) splits per family.
        """
        splits = self._splits
        cache: dict[int, _Candidate] = {}

        def at(i: int) -> _Candidate:
            if i not in cache:
                delay = 0.0 if splits[i] == cur_units else self.config.pause_ms
                cache[i] = self._evaluate(state, queue, slo, *splits[i], None, delay)
            return cache[i]

        n = self.model.device.num_units
        families: dict[bool, list[int]] = {}
        for i, (p, d) in enumerate(splits):
            families.setdefault(p + d > n, []).append(i)
        points: set[int] = set()
        for family in families.values():
            if len(family) <= EXHAUSTIVE_SPLITS:
                points.update(family)                      # few splits (a CPU): try them all
                continue
            last = len(family) - 1
            tpot = [self._tpot_at(state, slo, *splits[i]) for i in family]       # cheap: every split
            first_tpot = next((k for k, h in enumerate(tpot) if h >= 1.0), None)
            last_ttft = _last_true(lambda k: at(family[k]).holds_ttft, last)
            found = {0, last}
            found.update(k for k in (first_tpot, last_ttft) if k is not None)
            if first_tpot is not None and last_ttft is not None and first_tpot <= last_ttft:
                lo, hi = first_tpot, last_ttft                                 # both hold here
                cross = _first_true(lambda k: tpot[k] >= at(family[k]).prefill.headroom, lo, hi)
                found.update(k for k in (cross - 1, cross) if lo <= k <= hi)
            points.update(family[k] for k in found)
        return max((at(i) for i in sorted(points)), key=lambda c: self._score(c, slo))

    # ------------------------------------------------------------------ predictions
    def _tpot_at(self, state: QueueState, slo: SLO, prefill_units: int, decode_units: int) -> float:
        """TPOT headroom at a split without replaying the queue (for the search): co-resident, against
        prefill at its largest budget (its heaviest demand); time-shared, decode's half of the shared units."""
        if self.coresidency.enabled:
            slowdown = self._stretches(state, prefill_units, decode_units, max(self.config.token_budgets))[1]
            return self._tpot(state, slo, decode_units, slowdown)[1]
        shared = max(0, prefill_units + decode_units - self.model.device.num_units)
        return self._tpot(state, slo, decode_units - shared / 2)[1]

    def _tpot(self, state: QueueState, slo: SLO, decode_units: float,
              slowdown: float = 1.0) -> tuple[float, float]:
        """(predicted decode iteration ms, TPOT headroom); `slowdown`: from co-running prefill.
        No decode batch: one probe request."""
        batch, context = state.decode_batch_size, state.decode_context_tokens
        if batch <= 0:
            batch, context = 1, self.config.probe_prompt_tokens
        t = self.model.predict_units_ms("decode", decode_units, 0, 0, batch, context, batch) * slowdown
        return t, slo.tpot_ms * (1 - slo.margin) / t

    def _evaluate(self, state: QueueState, queue: list[_Request], slo: SLO, prefill_units: int,
                  decode_units: int, budget: int | None, delay_ms: float) -> _Candidate:
        """One split; `budget` None picks the budget with the most TTFT headroom (ties: the smaller)."""
        n = self.model.device.num_units
        shared = max(0, prefill_units + decode_units - n)
        if self.coresidency.enabled:
            return self._evaluate_units(state, queue, slo, prefill_units, decode_units, budget, delay_ms, True)
        # Time-shared: units both phases may use go half to each while the other works. Prefill counts as
        # working always (the next arrival), decode while it has a batch.
        decode_eff = decode_units - shared / 2
        prefill_eff = prefill_units - (shared / 2 if state.decode_batch_size > 0 else 0)
        candidate = self._evaluate_units(state, queue, slo, prefill_eff, decode_eff, budget, delay_ms, False)
        return replace(candidate, prefill_units=prefill_units, decode_units=decode_units)

    def _evaluate_units(self, state: QueueState, queue: list[_Request], slo: SLO, prefill_units: float,
                        decode_units: float, budget: int | None, delay_ms: float, coresident: bool) -> _Candidate:
        budgets = sorted(self.config.token_budgets) if budget is None else [budget]
        best: tuple[_Prefill, float] | None = None
        for b in budgets:
            p_stretch, d_stretch = self._stretches(state, prefill_units, decode_units, b) if coresident else (1, 1)
            p = self._replay(state, queue, prefill_units, b, delay_ms, p_stretch)
            if best is None or p.headroom > best[0].headroom * (1 + 1e-9) or (
                    p.headroom == best[0].headroom and p.misses < best[0].misses):
                best = (p, d_stretch)
        assert best is not None
        prefill, d_stretch = best
        tpot_ms, tpot_headroom = self._tpot(state, slo, decode_units, d_stretch)
        return _Candidate(prefill_units, decode_units, prefill, tpot_ms, tpot_headroom, delay_ms)

    def _stretches(self, state: QueueState, prefill_units: float, decode_units: float,
                   budget: int) -> tuple[float, float]:
        """(prefill, decode) iteration time while both run over time alone: prefill as a fresh prompt of
        `budget` tokens (it counts as working always: the next arrival), decode its batch (or the probe)."""
        model, co, n = self.model, self.coresidency, self.model.device.num_units
        _, prefill = iteration_demand(model, "prefill", prefill_units, budget, budget * budget, 0, 0, 1)
        batch, context = state.decode_batch_size, state.decode_context_tokens
        decode = IDLE
        if batch > 0:
            _, decode = iteration_demand(model, "decode", decode_units, 0, 0, batch, context, batch)
        else:
            _, probe = iteration_demand(model, "decode", decode_units, 0, 0, 1, self.config.probe_prompt_tokens, 1)
            return 1.0, stretch(probe, prefill, shared_fraction(decode_units, prefill_units, n), co)
        return (stretch(prefill, decode, shared_fraction(prefill_units, decode_units, n), co),
                stretch(decode, prefill, shared_fraction(decode_units, prefill_units, n), co))

    def _prepare(self, state: QueueState, slo: SLO) -> list[_Request]:
        """The queue in earliest-deadline order (one TTFT target for all: arrival order), with deadlines
        and whether each can still make it; a probe request when none can."""
        full = self.model.device.num_units
        target, margin_target = slo.ttft_ms, slo.ttft_ms * (1 - slo.margin)
        out = []
        for r in sorted(state.waiting, key=lambda r: r.arrival_time):
            arrival, done = (r.arrival_time - state.now) * 1000.0, max(r.computed_tokens, r.cached_tokens)
            if (remaining := max(0, r.prompt_tokens - done)) == 0:
                continue
            # Every prompt block, cached ones too: those no request holds are in the free count and leave it.
            blocks = 0 if r.computed_tokens else -(-(r.prompt_tokens + 1) // state.block_size)
            alone = self.model.predict_units_ms("prefill", full, remaining, remaining * (done + remaining), 0, 0, 1)
            out.append(_Request(arrival, remaining, done, blocks, arrival + target,
                                arrival + margin_target, arrival + target >= alone))
        if not any(r.viable for r in out):
            probe = self.config.probe_prompt_tokens
            out.append(_Request(0.0, probe, 0, 0, target, margin_target, True, probe=True))
        return out

    def _replay(self, state: QueueState, queue: list[_Request], units: float, budget: int,
                delay_ms: float, slowdown: float = 1.0) -> _Prefill:
        """Earliest deadline first through predicted prefill iterations, as the prefill scheduler runs
        them: each iteration takes `budget` tokens from the head of the queue, chunking long prompts; a
        request is admitted (all its prompt blocks) when its first chunk is scheduled, and when the KV
        pool cannot hold it, it and everything behind it wait for decode (FCFS)."""
        predict = self.model.predict_units_ms
        n = len(queue)
        first_token = [math.inf] * n                 # ms from now
        remaining = [r.remaining for r in queue]
        computed = [r.computed for r in queue]
        kv_free = state.kv_free_blocks
        admitted = [r.blocks == 0 for r in queue]
        last_deadline = max(r.deadline_ms for r in queue)
        t, head, iterations, tokens_done, blocked_at = delay_ms, 0, 0, 0, n
        while head < blocked_at:
            tokens = work = requests = 0
            finished = []
            j = head
            while j < blocked_at and tokens < budget:
                if not admitted[j]:
                    if queue[j].blocks > kv_free:
                        blocked_at = j
                        break
                    kv_free -= queue[j].blocks
                    admitted[j] = True
                q = min(remaining[j], budget - tokens)
                work += q * (computed[j] + q)
                tokens += q
                requests += 1
                remaining[j] -= q
                computed[j] += q
                if remaining[j] == 0:
                    finished.append(j)
                j += 1
            if tokens == 0:
                break
            t += predict("prefill", units, tokens, work, 0, 0, requests) * slowdown
            tokens_done += tokens
            for k in finished:
                first_token[k] = t
            while head < n and remaining[head] == 0:
                head += 1
            iterations += 1
            if head < blocked_at and (t > last_deadline or iterations >= self.config.max_sim_iterations):
                per_token = (t - delay_ms) / tokens_done       # the rest at the pace so far
                for k in range(head, blocked_at):
                    t += remaining[k] * per_token
                    first_token[k] = t
                break
        result = _Prefill(units, budget, math.inf)
        for k, r in enumerate(queue):
            ttft = first_token[k] - r.arrival_ms
            if r.viable and first_token[k] < math.inf:
                ratio = r.margin_deadline_ms / first_token[k] if r.margin_deadline_ms > 0 else 0.0
                result.headroom = min(result.headroom, ratio)
            elif r.viable and k >= blocked_at and r.probe:
                result.headroom = 0.0                  # even the probe cannot get blocks
            if r.probe:
                continue
            result.ttfts.append(ttft)
            if k >= blocked_at:
                result.kv_blocked += 1
            elif first_token[k] > r.deadline_ms:
                result.misses += 1
        if result.headroom == math.inf:                # every viable request is KV-blocked
            result.headroom = 0.0 if any(r.viable and not r.probe for r in queue) else math.inf
        return result

    # ------------------------------------------------------------------ reporting
    def _decision(self, c: _Candidate, shares: Shares, current: Shares, slo: SLO, state: QueueState,
                  why: str, conflict: bool = False) -> Decision:
        unit = "cores" if self.model.device.kind == "cpu" else "SMs"
        ttft_p = _percentile(sorted(c.prefill.ttfts), slo.percentile) if c.prefill.ttfts else None
        at_risk = _at_risk(c, state)
        parts = [why]
        parts.append(f"decode {shares.decode:.0%} ({c.decode_units} {unit}): TPOT {c.tpot_ms:.1f} ms predicted, "
                     f"target {slo.tpot_ms:g} ms, headroom x{c.tpot_headroom:.2f}")
        queued = len(c.prefill.ttfts)
        ttft_text = (f"TTFT p{slo.percentile * 100:g} {ttft_p:.0f} ms predicted" if ttft_p is not None
                     and ttft_p < math.inf else "TTFT unbounded" if queued else "queue empty")
        parts.append(f"prefill {shares.prefill:.0%} ({c.prefill_units} {unit}), budget {shares.token_budget}: "
                     f"{queued} queued, {ttft_text}, target {slo.ttft_ms:g} ms, headroom x{c.prefill.headroom:.2f}")
        if c.prefill.misses:
            parts.append(f"{c.prefill.misses} queued requests predicted past the TTFT target")
        if c.prefill.kv_blocked:
            parts.append(f"{c.prefill.kv_blocked} requests wait for KV blocks "
                         f"({state.kv_free_blocks}/{state.kv_total_blocks} free)")
        if at_risk is not None:
            risk = "TTFT and TPOT" if at_risk == "both" else at_risk.upper()
            if conflict:
                parts.append(f"no split holds both SLOs: protecting {slo.prefer.upper()} (preferred); {risk} at risk")
            else:
                parts.append(f"{risk} at risk")
        return Decision(
            shares=shares, reason="; ".join(parts), mode=self.mode, changed=shares != current, at_risk=at_risk,
            predicted_tpot_ms=c.tpot_ms, predicted_ttft_ms=ttft_p, predicted_ttft_misses=c.prefill.misses,
            predicted_tpot_miss=state.decode_batch_size > 0 and c.tpot_ms > slo.tpot_ms, ttft_headroom=c.prefill.headroom,
            tpot_headroom=c.tpot_headroom)


def _at_risk(c: _Candidate, state: QueueState) -> str | None:
    """The SLOs real work is predicted to miss: queued requests for TTFT, the running batch for TPOT. The
    probe standing for the next arrival (or the next decode) steers the choice but puts nothing at risk."""
    ttft = bool(c.prefill.ttfts) and (not c.holds_ttft or c.prefill.kv_blocked > 0)
    tpot = state.decode_batch_size > 0 and not c.holds_tpot
    if ttft and tpot:
        return "both"
    return "ttft" if ttft else "tpot" if tpot else None


def _holds_text(c: _Candidate) -> str:
    held = [name for name, ok in (("TTFT", c.holds_ttft), ("TPOT", c.holds_tpot)) if ok]
    return " and ".join(held) + " hold" if held else "nothing hold"


def _gain(new: float, old: float) -> float:
    if old <= 0:
        return math.inf if new > old else 0.0
    if math.isinf(old):
        return 0.0
    return new / old - 1.0


def _last_true(pred, last: int) -> int | None:
    """Largest i in [0, last] with pred(i), for pred true on a prefix; None when pred(0) is false."""
    return _last_true_from(pred, 0, last) if pred(0) else None


def _last_true_from(pred, lo: int, hi: int) -> int:
    """Largest i in [lo, hi] with pred(i), for pred true on a prefix of the range and pred(lo) true."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _first_true(pred, lo: int, hi: int) -> int:
    """Smallest i in [lo, hi] with pred(i), for pred true on a suffix; hi + 1 when never."""
    while lo <= hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid - 1
        else:
            lo = mid + 1
    return lo


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list (inf entries allowed)."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
