"""SLO policy on synthetic queue states, with the H100 prior model of Llama-3-8B (no fit, no device)."""
from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest

from orchestrator.hold import HoldConfig
from orchestrator.perf_model import LLAMA3_8B, DeviceSpec, ModelShape, PerfModel, h100
from orchestrator.policy import (SLO, Policy, PolicyConfig, PolicyMode, QueueState, Shares, WaitingRequest)

NOW = 1_000.0
SLO_DEFAULT = SLO(ttft_ms=1000, tpot_ms=30)
HALF = Shares(0.5, 0.5, 1024)


# The search and the gain band alone, as every tick runs them once a need has persisted: every
# headroom counts as a need, one tick is enough, no dwell. The time hysteresis is tested below.
EAGER = HoldConfig(persist_ticks=1, min_dwell_ms=0.0, dwell_per_switch=0.0, comfort_headroom=math.inf)


def make_policy(device: DeviceSpec | None = None, shape: ModelShape = LLAMA3_8B, **config) -> Policy:
    config.setdefault("hold", EAGER)
    return Policy(PerfModel(device or h100(), shape), PolicyConfig(**config))


def make_queue_state(num_waiting: int = 0, waited_s: float = 0.0, prompt_tokens: int = 1000, batch: int = 0,
                     context: int = 1000, kv_free: int = 100_000, kv_total: int = 200_000) -> QueueState:
    """`num_waiting` prompts of `prompt_tokens`, arrived evenly over the last `waited_s` seconds (the
    oldest `waited_s` ago); a decode batch of `batch` requests of `context` tokens each."""
    waiting = [WaitingRequest(NOW - waited_s * (1 - i / max(num_waiting, 1)), prompt_tokens)
               for i in range(num_waiting)]
    return QueueState(NOW, waiting, batch, batch * context, kv_free, kv_total)


# ---------------------------------------------------------------------- the cases
def test_a_growing_decode_batch_raises_the_decode_share():
    policy = make_policy(hysteresis=0.0)
    shares = [policy.decide(make_queue_state(10, 0.1, batch=b), HALF, SLO_DEFAULT).shares.decode
              for b in (8, 32, 64, 128, 192)]
    assert shares == sorted(shares) and shares[-1] > shares[0] + 0.3, shares
    # Tick by tick with the default band, each tick starting from the last decision.
    policy, current = make_policy(), HALF
    for batch in (8, 64, 128, 192):
        decision = policy.decide(make_queue_state(10, 0.1, batch=batch), current, SLO_DEFAULT)
        assert decision.at_risk is None
        current = decision.shares
    assert current.decode > 0.7


def test_a_queue_near_its_ttft_deadlines_raises_the_prefill_share_and_the_token_budget():
    policy = make_policy()
    relaxed = policy.decide(make_queue_state(2, 0.01, 200, batch=32), HALF, SLO_DEFAULT)
    assert relaxed.at_risk is None
    # 30 prompts of 1000 tokens, the oldest 500 ms into its 1000 ms TTFT: at half the device most miss.
    pressed = policy.decide(make_queue_state(30, 0.5, 1000, batch=32), relaxed.shares, SLO_DEFAULT)
    assert pressed.changed
    assert pressed.shares.prefill > relaxed.shares.prefill + 0.2
    assert pressed.shares.token_budget > relaxed.shares.token_budget
    assert pressed.at_risk is None and pressed.predicted_ttft_misses == 0
    assert pressed.predicted_ttft_ms < SLO_DEFAULT.ttft_ms and pressed.predicted_tpot_ms < SLO_DEFAULT.tpot_ms


def test_no_change_inside_the_hysteresis_band():
    policy = make_policy()
    state = make_queue_state(10, 0.1, batch=64)
    settled = policy.decide(state, Shares(0.2, 0.8, 1024), SLO_DEFAULT).shares
    # A little more load, or the current split one TPC off the best: not worth a move.
    for nudged_state in (make_queue_state(11, 0.1, batch=66), make_queue_state(10, 0.12, batch=60)):
        decision = policy.decide(nudged_state, settled, SLO_DEFAULT)
        assert not decision.changed and "inside the band" in decision.reason, decision.reason
    step = 2 / 132
    neighbour = Shares(settled.prefill - step, settled.decode + step, settled.token_budget)
    decision = policy.decide(state, neighbour, SLO_DEFAULT)
    assert not decision.changed and decision.shares == neighbour
    # Outside the band it does move.
    assert policy.decide(make_queue_state(10, 0.1, batch=8), settled, SLO_DEFAULT).changed


def test_with_conflicting_targets_it_protects_the_preferred_slo_and_says_so():
    # 20 prompts half-way to their deadline and 192 decode requests under a 30 ms TPOT: either SLO
    # can hold alone, not both.
    state = make_queue_state(20, 0.5, 1000, batch=192)
    ttft_first = make_policy().decide(state, HALF, SLO(1000, 30, prefer="ttft"))
    assert ttft_first.at_risk == "tpot" and ttft_first.predicted_ttft_misses == 0
    assert ttft_first.ttft_headroom >= 1.0 > ttft_first.tpot_headroom
    assert "protecting TTFT (preferred); TPOT at risk" in ttft_first.reason
    tpot_first = make_policy().decide(state, HALF, SLO(1000, 30, prefer="tpot"))
    assert tpot_first.at_risk == "ttft" and tpot_first.predicted_ttft_misses > 0
    assert tpot_first.predicted_tpot_ms <= 30 * 0.9
    assert "protecting TPOT (preferred); TTFT at risk" in tpot_first.reason
    assert tpot_first.shares.decode > ttft_first.shares.decode


def test_with_an_impossible_target_it_protects_the_preferred_as_far_as_it_goes():
    policy = make_policy(hysteresis=0.0)
    state = make_queue_state(10, 0.1, batch=32)
    # 2 ms per token is below the fixed cost of an iteration: TPOT cannot hold anywhere. Preferred, it
    # gets every SM that TTFT can spare; TTFT still holds and the status says which SLO is lost.
    decision = policy.decide(state, HALF, SLO(1000, 2, prefer="tpot"))
    assert decision.at_risk == "tpot" and decision.ttft_headroom >= 1.0
    assert "protecting TPOT (preferred); TPOT at risk" in decision.reason
    # One TPC more for decode would break TTFT: from there it moves back.
    more = Shares(decision.shares.prefill - 2 / 132, decision.shares.decode + 2 / 132, decision.shares.token_budget)
    back = policy.decide(state, more, SLO(1000, 2, prefer="tpot"))
    assert back.changed and back.shares == decision.shares and "makes TTFT hold" in back.reason
    # A 5 ms TTFT cannot hold either: every queued request is reported, TPOT is kept.
    decision = policy.decide(state, HALF, SLO(5, 30, prefer="ttft"))
    assert decision.at_risk == "ttft" and decision.predicted_ttft_misses == 10
    assert decision.tpot_headroom >= 1.0
    assert "protecting TTFT (preferred); TTFT at risk" in decision.reason


# ---------------------------------------------------------------------- the rest of the algorithm
def test_a_share_change_must_repay_its_switch_cost():
    state = make_queue_state(10, 0.1, batch=8)
    assert make_policy().decide(state, HALF, SLO_DEFAULT).changed               # free: worth 30% headroom
    costly = make_policy(switch_cost_ms=800.0).decide(state, HALF, SLO_DEFAULT)
    assert (costly.shares.prefill, costly.shares.decode) == (0.5, 0.5)          # the budget may still move


def test_requests_the_kv_pool_cannot_hold_are_reported():
    state = make_queue_state(10, 0.1, 1000, batch=32, kv_free=4 * 63)          # room for 4 prompts of 63 blocks
    decision = make_policy().decide(state, HALF, SLO_DEFAULT)
    assert decision.at_risk == "ttft"
    assert "6 requests wait for KV blocks (252/200000 free)" in decision.reason


def test_an_idle_stack_keeps_its_shares():
    decision = make_policy().decide(make_queue_state(), HALF, SLO_DEFAULT)
    assert not decision.changed and decision.at_risk is None
    assert decision.predicted_ttft_ms is None and "queue empty" in decision.reason


def test_static_and_manual_modes_hold_their_shares_and_still_report():
    fixed = Shares(0.7, 0.3, 2048)
    policy = make_policy(mode=PolicyMode.STATIC, static_shares=fixed)
    decision = policy.decide(make_queue_state(10, 0.1, batch=256), HALF, SLO_DEFAULT)
    assert decision.shares == fixed and decision.changed and decision.mode is PolicyMode.STATIC
    assert decision.at_risk == "tpot" and decision.reason.startswith("static")
    pinned = Shares(0.4, 0.6, 512)
    policy.pin(pinned)
    decision = policy.decide(make_queue_state(), pinned, SLO_DEFAULT)
    assert decision.shares == pinned and not decision.changed and decision.mode is PolicyMode.MANUAL
    policy.set_mode(PolicyMode.AUTO)
    assert policy.decide(make_queue_state(10, 0.1, batch=8), pinned, SLO_DEFAULT).mode is PolicyMode.AUTO
    with pytest.raises(ValueError):
        make_policy().set_mode(PolicyMode.MANUAL)                               # nothing pinned
    with pytest.raises(ValueError):
        PolicyConfig(mode=PolicyMode.STATIC)                                    # no shares


def test_share_candidates_per_backend():
    cpu = make_policy(DeviceSpec.cpu(8)).splits()
    assert len(cpu) == 7 and all(p + d == pytest.approx(1.0) and min(p, d) >= 1 / 8 for p, d in cpu)
    assert make_policy(DeviceSpec.cpu(2)).splits() == [(0.5, 0.5)]
    gpu = make_policy().splits()
    assert len(gpu) == 65 and gpu[0] == (130 / 132, 2 / 132)                    # whole TPCs
    overlapped = make_policy(overlap=0.2).splits()                              # MPS caps may overlap
    assert overlapped[0] == (1.0, 2 / 132) and (130 / 132, 2 / 132) in overlapped        # overlapping and not
    assert (28 / 132, 130 / 132) in overlapped and overlapped[-1] == (2 / 132, 130 / 132)
    two_cores = make_policy(DeviceSpec.cpu(2), overlap=0.5).splits()
    assert two_cores == [(1.0, 0.5), (0.5, 0.5)]                                # prefill may borrow decode's core


def test_on_two_cores_only_the_token_budget_moves():
    cpu_shape = ModelShape(30, 576, 1536, 9, 3, 64, 49152, 4, 4)                 # SmolLM2-135M, fp32
    policy = make_policy(DeviceSpec.cpu(2), cpu_shape)
    # Ten short prompts, the oldest 2 s from its deadline: one 1000-token iteration would take ~3.5 s on
    # one core, so the oldest needs a small budget to come out first.
    state = make_queue_state(10, 8.0, 100, batch=4)
    decision = policy.decide(state, Shares(0.5, 0.5, 8192), SLO(ttft_ms=10_000, tpot_ms=200))
    assert (decision.shares.prefill, decision.shares.decode) == (0.5, 0.5)
    assert decision.shares.token_budget < 1000 and decision.reason.startswith("auto: token budget")


def test_a_tick_is_cheap_even_with_a_long_queue():
    policy = make_policy()
    state = make_queue_state(500, 0.9, 1500, batch=256)
    start = time.perf_counter()
    policy.decide(state, HALF, SLO(1000, 40))
    assert time.perf_counter() - start < 0.25


def test_on_two_cores_with_overlap_a_burst_lends_prefill_the_decode_core_and_gives_it_back():
    cpu_shape = ModelShape(30, 576, 1536, 9, 3, 64, 49152, 4, 4)                 # SmolLM2-135M, fp32
    policy = make_policy(DeviceSpec.cpu(2), cpu_shape, overlap=0.5, probe_prompt_tokens=256)
    slo = SLO(ttft_ms=5000, tpot_ms=300)
    burst = policy.decide(make_queue_state(12, 1.0, 800, batch=2, context=300), Shares(0.5, 0.5, 2048), slo)
    assert (burst.shares.prefill, burst.shares.decode) == (1.0, 0.5), burst.reason
    calm = policy.decide(make_queue_state(0, 0.0, batch=4, context=300), burst.shares, slo)
    assert (calm.shares.prefill, calm.shares.decode) == (0.5, 0.5), calm.reason


def test_cached_prompt_tokens_are_not_prefilled_again():
    """Prefix caching (orchestrator/prefix_view.py): the replay prefills only what is not cached, so a
    queue of conversations resending their history needs no more prefill than its new messages."""
    uncached = make_queue_state(30, 0.5, 1000, batch=32)
    cached = replace(uncached, waiting=[replace(r, cached_tokens=960) for r in uncached.waiting])
    pressed = make_policy().decide(uncached, HALF, SLO_DEFAULT)
    calm = make_policy().decide(cached, HALF, SLO_DEFAULT)
    assert pressed.changed and pressed.shares.prefill > HALF.prefill + 0.2
    assert not calm.changed and calm.at_risk is None and calm.predicted_ttft_misses == 0
    assert calm.ttft_headroom > 4 * pressed.ttft_headroom          # (the latter at the larger prefill share)
    # The tail attends over the cached prefix in place: the same work as a prompt part-way through its chunks.
    computed = replace(uncached, waiting=[replace(r, computed_tokens=960) for r in uncached.waiting])
    assert make_policy().decide(computed, HALF, SLO_DEFAULT).predicted_ttft_ms == calm.predicted_ttft_ms
    # Admission still takes every prompt block out of the free count (cached ones no request holds are in it).
    tight = make_queue_state(10, 0.1, 1000, batch=32, kv_free=4 * 63)
    tight = replace(tight, waiting=[replace(r, cached_tokens=960) for r in tight.waiting])
    assert "6 requests wait for KV blocks" in make_policy().decide(tight, HALF, SLO_DEFAULT).reason
