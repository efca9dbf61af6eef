"""Arrival processes: vLLM's Poisson / gamma gaps (seeded, at the asked rate) and trace replay."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.datasets import Arrival, RequestSpec, load_azure_conv, schedule, trace_rate

HEAD = Path(__file__).parent / "data" / "azure_conv_2023_head.csv"


def specs(n: int) -> list[RequestSpec]:
    return [RequestSpec(8, 4) for _ in range(n)]


def test_poisson_starts_at_zero_is_seeded_and_keeps_the_rate():
    times = schedule(specs(20_001), Arrival("poisson", rate=4.0, seed=1))
    assert times[0] == 0.0 and all(a <= b for a, b in zip(times, times[1:]))
    assert 20_000 / times[-1] == pytest.approx(4.0, rel=0.03)
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)     # exponential: CV 1
    assert times == schedule(specs(20_001), Arrival("poisson", rate=4.0, seed=1))
    assert times != schedule(specs(20_001), Arrival("poisson", rate=4.0, seed=2))


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_keeps_the_rate_and_burstiness_sets_the_spread(burstiness):
    times = schedule(specs(20_001), Arrival("gamma", rate=2.0, burstiness=burstiness, seed=0))
    gaps = np.diff(times)
    assert np.mean(gaps) == pytest.approx(0.5, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_everything_at_once():
    assert schedule(specs(5), Arrival("poisson", rate=math.inf)) == [0.0] * 5


def test_trace_replays_recorded_times_or_rescales_them_to_a_rate():
    trace = load_azure_conv(HEAD, length_scale=1.0)
    assert schedule(trace, Arrival("trace")) == [s.arrival_s for s in trace]
    recorded = trace_rate(trace)
    assert recorded == pytest.approx(11 / trace[-1].arrival_s)
    times = schedule(trace, Arrival("trace", rate=recorded * 3))
    assert times == pytest.approx([s.arrival_s / 3 for s in trace])
    assert 11 / times[-1] == pytest.approx(recorded * 3)


def test_bad_arrivals_are_refused():
    with pytest.raises(ValueError, match="arrival times"):
        schedule(specs(3), Arrival("trace", rate=1.0))
    with pytest.raises(ValueError, match="needs a request rate"):
        Arrival("poisson")
    with pytest.raises(ValueError, match="burstiness"):
        Arrival("gamma", rate=1.0, burstiness=0)


def test_each_run_of_a_workload_has_prompts_of_its_own():
    from bench.datasets import RequestSpec, for_run, with_token_ids
    from services.engine.prefix_hash import block_keys

    specs = with_token_ids([RequestSpec(40, 4) for _ in range(3)], list(range(200, 260)))
    runs = [for_run(specs, run) for run in range(3)]
    assert all(len(s.token_ids) == 40 and s.token_ids[1:] == o.token_ids[1:]
               for run in runs for s, o in zip(run, specs))
    keys = [set(k for s in run for k in block_keys(s.token_ids, 16)) for run in runs]
    assert not keys[0] & keys[1] and not keys[1] & keys[2]            # no block shared between runs
    text = RequestSpec(3, 4, prompt="hello")
    assert for_run([text], 5) == [text]
