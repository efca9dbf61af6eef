"""`duoserve bench serve` against a real split stack: six short requests, every metric from real streams."""
from __future__ import annotations

import json

import pytest

from duoserve.cli import main

pytestmark = pytest.mark.slow


def test_bench_serve_measures_six_requests(split_stack, tmp_path, capsys):
    start_free = split_stack.num_free_blocks()
    out = tmp_path / "result.json"
    rc = main(["bench", "serve", "--target", split_stack.target, "--dataset", "random", "--num-requests", "6",
               "--input-len", "24", "--output-len", "6", "--request-rate", "4", "--seed", "1",
               "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Successful requests:                     6" in printed.out
    assert "req/s]" not in printed.err and "\r" not in printed.err          # no progress bar off a terminal

    result = json.loads(out.read_text())
    records = result["records"]
    assert len(records) == 6 and all(r["success"] for r in records), [r["error"] for r in records]
    for r in records:
        assert r["output_tokens"] == 6 and r["finish_reason"] == "length"   # forced length (ignore_eos)
        assert r["prompt_len"] == 24                                         # the server's count of our ids
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert 1 <= len(r["itl_s"]) <= 5                                     # chunks after the first
        assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 5)
        assert r["sent_s"] >= r["scheduled_s"] - 0.01
    assert [r["scheduled_s"] for r in records] == sorted(r["scheduled_s"] for r in records)

    m = result["metrics"]
    assert m["completed"] == 6 and m["total_input_tokens"] == 144 and m["total_output_tokens"] == 36
    assert m["request_throughput"] == pytest.approx(6 / m["duration_s"])
    assert m["slo_attainment"] == 1.0 and m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert m["ttft"]["median_ms"] > 0 and m["tpot"]["count"] == 6 and m["e2e"]["percentiles_ms"]["p99"] > 0
    assert split_stack.wait_free_blocks(start_free) == start_free          # the stack is left as found


def test_bench_serve_multi_turn_resends_the_history_and_hits_the_cache(split_stack, tmp_path, capsys):
    start_free = split_stack.num_free_blocks()
    out = tmp_path / "multi.json"
    rc = main(["bench", "serve", "--target", split_stack.target, "--dataset", "multi-turn", "--conversations", "2",
               "--turns", "3", "--system-len", "40", "--user-len", "20", "--answer-len", "4", "--think-time", "0.1",
               "--request-rate", "2", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "Arrivals:                        2 conversations/s" in printed.out and "Cached prompt tokens:" in printed.out
    records = json.loads(out.read_text())["records"]
    assert len(records) == 6 and all(r["success"] for r in records), [r["error"] for r in records]
    for c in range(2):
        turns = sorted((r for r in records if r["conversation"] == c), key=lambda r: r["turn"])
        assert [r["prompt_len"] for r in turns] == [60, 84, 108]          # + the 4-token answer and 20 new tokens
        for before, after in zip(turns, turns[1:]):
            assert after["sent_s"] >= before["sent_s"] + before["e2e_s"] + 0.1 - 0.01   # after the answer + think
            assert after["cached_tokens"] >= before["prompt_len"] // 16 * 16          # the history's full blocks
    assert split_stack.wait_free_blocks(start_free) == start_free          # cached blocks count as free
