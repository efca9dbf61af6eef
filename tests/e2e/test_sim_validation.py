"""The simulator against the real CPU stack (issue 5's validation), as behaviour: the same requests,
sent to the real split stack and simulated with the CPU calibration the stack's own orchestrator
fitted, give a complete report whose p50 and p90 of TTFT and TPOT agree within a sanity band (50%: a
broken simulator or calibration lands far outside it). The accuracy target itself (20%) is a
benchmark, `duoserve bench validate-sim`, with its figures in docs/performance.md: on a shared
2-core machine the real TPOT tail moves with whatever else runs (the simulator has no CPU co-run
slowdown yet), so a timing target in the suite would fail by machine, not by code. The stack runs
without prefix caching: the simulator models it (`--prefix-caching`), but a trace says nothing of its
prompts' content, so it keys each prompt as its own, while the real prompts the benchmark sends share
blocks (with caching the real TTFT came out at half the simulated one)."""
from __future__ import annotations

import os
import sys

import pytest

from bench.datasets import DEFAULT_AZURE_CONV, Arrival, load_azure_conv
from bench.validate_sim import judge, measure_on
from duoserve.stack import Mode
from tests.e2e.conftest import start_stack, stop_stack

pytestmark = [pytest.mark.slow, pytest.mark.long]      # ~2 minutes: `make chaos` runs it, `make test` does not

NUM_REQUESTS = 16          # the first requests of the Azure conversation trace
LENGTH_SCALE = 0.1         # as bench serve's default: the model is tiny, the CPU slow
RATE_SCALE = 0.1           # a tenth of the recorded rate: the stack is busy but keeps up
TOLERANCE = 0.2            # the benchmark's target, reported in the table
SANITY = 0.5               # what the suite checks


@pytest.fixture(scope="module")
def split_stack(tmp_path_factory, default_model_dir):
    running = start_stack(Mode.SPLIT, tmp_path_factory, default_model_dir, prefix_caching=False)
    yield running
    stop_stack(running)


def test_simulated_percentiles_within_20_percent_of_the_real_stack(split_stack):
    start_free = split_stack.num_free_blocks()
    specs = load_azure_conv(DEFAULT_AZURE_CONV, max_requests=NUM_REQUESTS, length_scale=LENGTH_SCALE,
                            rate_scale=RATE_SCALE)
    words = f"azure-conv: first {NUM_REQUESTS} requests, lengths x {LENGTH_SCALE:g}, rate x {RATE_SCALE:g}"
    real = measure_on(split_stack.state, specs, Arrival("trace"), words, "static", slo_ttft_ms=5000,
                      slo_tpot_ms=500, progress=False, say=lambda m: print(m, file=sys.stderr))
    report = judge(real, words, "static", TOLERANCE, cpu_cores=len(os.sched_getaffinity(0)))
    print(report["table"])
    metrics = {(c["metric"], c["quantile"]) for c in report["comparisons"]}
    assert metrics == {(m, q) for m in ("ttft", "tpot") for q in (50, 90)}, metrics
    far = [c for c in report["comparisons"] if not abs(c["rel_error"]) <= SANITY]
    assert not far, report["table"] + f"\nloop gaps: {report['loop_gaps']}\nfit: {report['fit']}"
    assert split_stack.wait_free_blocks(start_free) == start_free
