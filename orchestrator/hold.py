"""When the policy may move the shares: hysteresis in time, on top of the gain band in `policy`.

Pure Python (no torch, grpc, redis or numpy). The policy predicts every tick from a model that a
noisy machine (other tenants, a fit still learning) makes wrong by tens of percent, tick to tick;
and on a GPU every share change is a handover that starts a process. So a move needs, besides a
predicted gain:

  need      queued work that needs it: real requests waiting for prefill, or a real decode batch,
            whose headroom at the current shares is below `comfort_headroom` (a probe request
            standing for the next arrival never moves the shares: an idle stack keeps them)
  persist   that need seen on `persist_ticks` ticks in a row at the same shares (one noisy
            prediction is not a risk), unless it holds beyond the model's error: the headroom would
            still be below comfort if the prediction were off by the model's measured p90 error
            (a model that predicts exactly, as the simulator's, acts on the tick it sees the need)
  dwell     at least `dwell_ms` since the last move, the longer of `min_dwell_ms` and
            `dwell_per_switch` times the measured cost of a change (a change should last much
            longer than it takes)

docs/performance-model.md ("Hysteresis") has the rules and the figures behind the defaults.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HoldConfig:
    """The time hysteresis (PolicyConfig carries one)."""

    persist_ticks: int = 3            # ticks in a row a need must be seen before a move
    min_dwell_ms: float = 2000.0      # no move sooner than this after the last one
    dwell_per_switch: float = 4.0     # ... nor sooner than this many switch costs
    comfort_headroom: float = 2.0     # real work with at least this headroom needs no move
    model_error: float | None = None  # relative prediction error the persistence allows for; None: the
                                      # model's measured p90 (its honest error), `unmeasured_error` before that
    unmeasured_error: float = 0.5     # the error assumed while the model has measured none

    def __post_init__(self) -> None:
        if self.persist_ticks < 1:
            raise ValueError("persist_ticks must be at least 1")
        if self.min_dwell_ms < 0 or self.dwell_per_switch < 0:
            raise ValueError("min_dwell_ms and dwell_per_switch must be >= 0")
        if self.comfort_headroom < 1:
            raise ValueError("comfort_headroom must be at least 1 (below it an SLO is predicted to fail)")
        if (self.model_error is not None and self.model_error < 0) or self.unmeasured_error < 0:
            raise ValueError("model_error and unmeasured_error must be >= 0")

    def dwell_ms(self, switch_cost_ms: float) -> float:
        return max(self.min_dwell_ms, self.dwell_per_switch * switch_cost_ms)


@dataclass(frozen=True, slots=True)
class Need:
    """What real work asks of the current shares this tick: each phase's headroom there, or None when
    that phase has no real work (or enough headroom)."""

    ttft: float | None = None      # TTFT headroom of the queued requests (None: none queued, or comfortable)
    tpot: float | None = None      # TPOT headroom of the running decode batch (None: no batch, or comfortable)
    certain: bool = False          # it holds beyond the model's error: no need to wait for it to persist

    def __bool__(self) -> bool:
        return self.ttft is not None or self.tpot is not None

    def text(self) -> str:
        parts = [f"{name} headroom x{h:.2f}" for name, h in (("TTFT", self.ttft), ("TPOT", self.tpot))
                 if h is not None]
        return " and ".join(parts) if parts else "nothing"

    def helped_by(self, ttft_headroom: float, tpot_headroom: float) -> bool:
        """Whether shares with these headrooms raise at least one needy phase's headroom."""
        return (self.ttft is not None and ttft_headroom > self.ttft) or \
               (self.tpot is not None and tpot_headroom > self.tpot)


def need_of(config: HoldConfig, has_queue: bool, ttft_headroom: float, ttft_misses: int,
            has_batch: bool, tpot_headroom: float, model_error: float) -> Need:
    """The need at the current shares: a phase with real work whose headroom is below comfort (or, for
    TTFT, with requests predicted to miss); certain when a prediction `model_error` too optimistic would
    still leave that headroom below comfort."""
    ttft = ttft_headroom if has_queue and (ttft_headroom < config.comfort_headroom or ttft_misses) else None
    tpot = tpot_headroom if has_batch and tpot_headroom < config.comfort_headroom else None
    bar = config.comfort_headroom / (1 + model_error)
    certain = any(h is not None and h < bar for h in (ttft, tpot))
    return Need(ttft, tpot, certain)


class Hold:
    """The time hysteresis' state: how long the need has persisted, and when the shares last moved."""

    def __init__(self, config: HoldConfig) -> None:
        self.config = config
        self.streak = 0                           # ticks in a row with a need, at the same units
        self.units: tuple[int, int] | None = None # the shares those ticks saw
        self.last_move_s: float | None = None     # state.now of the last move

    def observe(self, units: tuple[int, int], need: Need) -> None:
        """One tick at these units with this need (call once per tick, before asking)."""
        if units != self.units:
            self.streak, self.units = 0, units    # other shares (a move, an operator): the need starts over
        self.streak = self.streak + 1 if need else 0

    def persisted(self, need: Need) -> bool:
        return self.streak >= (1 if need.certain else self.config.persist_ticks)

    def model_error(self, measured_p90: float | None) -> float:
        """The error the persistence allows for: the configured one, else the model's measured p90."""
        if self.config.model_error is not None:
            return self.config.model_error
        return self.config.unmeasured_error if measured_p90 is None else measured_p90

    def dwell_left_s(self, now_s: float, switch_cost_ms: float) -> float:
        if self.last_move_s is None:
            return 0.0
        return max(0.0, self.last_move_s + self.config.dwell_ms(switch_cost_ms) / 1000.0 - now_s)

    def moved(self, now_s: float, units: tuple[int, int]) -> None:
        self.last_move_s, self.units, self.streak = now_s, units, 0
