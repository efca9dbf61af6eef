"""When the stack's supervisor restarts a process that died, and in which order: pure logic, no I/O.

A process's life under supervision:
  running    started (by `up`, or restarted here); `started` records when
  dead       seen dead: `died` schedules its restart after a backoff that doubles with each death in
             a row (1, 2, 4 ... up to `max_s` seconds) and starts again from `base_s` once it had
             stayed up `stable_s` (the shape of Docker's `restart: always` and of Kubernetes'
             CrashLoopBackOff)
  due        its time has come; `next_to_restart` hands out the due processes of the lowest stage
             first (redis before the arena, the arena before the workers, the workers before the
             gateway), so a process is restarted only after what it needs is back
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    base_s: float = 1.0          # delay before the first restart
    max_s: float = 30.0          # the delay never grows past this
    stable_s: float = 60.0       # up this long: its next death counts as the first again

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < self.base_s or self.stable_s <= 0:
            raise ValueError("need 0 <= base_s <= max_s and stable_s > 0")

    def delay(self, deaths_in_a_row: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, deaths_in_a_row - 1))


@dataclass(slots=True)
class _History:
    stage: int
    started_at: float
    restarts: int = 0
    deaths_in_a_row: int = 0
    due_at: float | None = None          # set while dead: when to restart it


@dataclass(slots=True)
class RestartTracker:
    """Every supervised process's deaths and restarts, by name."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    _history: dict[str, _History] = field(default_factory=dict)

    def started(self, name: str, stage: int, now: float) -> None:
        """`name` is running from `now` (a first start or a restart)."""
        history = self._history.get(name)
        if history is None:
            self._history[name] = _History(stage, now)
            return
        history.started_at, history.due_at = now, None

    def died(self, name: str, now: float) -> float:
        """`name` was seen dead at `now`: its restart is scheduled; -> the delay. Idempotent while it
        stays dead (the first sighting counts)."""
        history = self._history[name]
        if history.due_at is not None:
            return history.due_at - now
        if now - history.started_at >= self.policy.stable_s:
            history.deaths_in_a_row = 0
        history.deaths_in_a_row += 1
        delay = self.policy.delay(history.deaths_in_a_row)
        history.due_at = now + delay
        return delay

    def restarted(self, name: str, now: float) -> None:
        self._history[name].restarts += 1
        self.started(name, self._history[name].stage, now)

    def next_to_restart(self, now: float) -> list[str]:
        """The dead processes to restart now: those due, of the lowest stage that has anything dead
        (a due worker waits while the arena below it is still dead, even in its own backoff)."""
        dead = [(h.stage, n) for n, h in self._history.items() if h.due_at is not None]
        if not dead:
            return []
        lowest = min(stage for stage, _ in dead)
        return sorted(n for stage, n in dead if stage == lowest and self._history[n].due_at <= now)

    def is_dead(self, name: str) -> bool:
        history = self._history.get(name)
        return history is not None and history.due_at is not None

    def restarts(self, name: str) -> int:
        history = self._history.get(name)
        return history.restarts if history else 0
