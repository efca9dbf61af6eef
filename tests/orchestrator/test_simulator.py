"""The simulator on a short slice of the Azure conversation trace: conservation, the performance model's
times, the policy against static splits, the JSON report, determinism, and purity."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from duoserve.cli import main as cli_main
from orchestrator.coresidency import CoResidency, shared_fraction, stretch
from orchestrator.perf_model import Coefficients
from orchestrator.policy import SLO, Shares
from orchestrator.sim_calibration import (GPU_PROFILE, LLAMA2_7B, LLAMA3_8B, _op_scale, calibrate, load_coefficients,
                                          vidur_check)
from orchestrator.sim_sweep import compare, default_systems
from orchestrator.sim_trace import TraceRequest, base_rate, load_trace, poisson
from orchestrator.simulator import SimOptions, Simulation, System

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "bench" / "data"            # reference data copied into the repo (bench/data/README.md)

# The first 120 requests of Azure's LLM inference trace, conversation service, 2023-11-16 18:15:46 on
# (minutes:seconds after 18:00, ContextTokens, GeneratedTokens).
# Source: Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv (CC-BY 4.0); bench/data/azure_conv_2023.csv.
AZURE_CONV_HEAD = """
    15:46.6805900,374,44 15:50.9951690,396,109 15:51.2224670,879,55 15:51.3910170,91,16 15:52.5732450,91,16
    15:52.9921190,381,84 15:54.4260870,1313,142 15:54.9320210,388,84 15:55.0176690,242,14 15:55.1455750,209,152
    15:55.3808030,394,124 15:56.1080580,394,59 15:56.2631480,1315,174 15:56.7869690,2221,15 15:57.2267160,389,90
    15:57.8385010,415,106 15:58.1114940,120,12 15:58.5172230,369,74 15:59.5671350,206,162 15:59.7056780,1353,142
    15:59.7304330,197,152 16:00.7401400,181,154 16:00.7783700,388,54 16:00.9738990,4085,62
    16:04.1015080,2584,170 16:04.4735280,203,147 16:04.8411030,126,194 16:05.1444820,389,87
    16:05.6600290,2548,116 16:06.5945170,91,16 16:06.6257870,4081,74 16:07.1595310,181,123 16:07.3389430,191,217
    16:07.6225060,27,183 16:08.0506550,203,217 16:08.0556770,398,81 16:09.3934620,126,172 16:09.6754460,209,181
    16:10.0519930,209,181 16:10.8268860,28,175 16:11.4489750,437,88 16:11.5755510,181,104 16:11.7620120,203,138
    16:11.9039690,200,177 16:11.9304300,4073,58 16:12.0048440,91,16 16:12.5976970,1087,401 16:12.9350680,382,64
    16:13.0876470,412,102 16:13.1417340,194,217 16:14.0108560,203,217 16:14.2331190,200,217 16:14.7708240,64,174
    16:15.0339470,458,123 16:15.2591250,1352,158 16:15.2883620,874,404 16:15.4449690,378,58 16:16.0208780,91,16
    16:16.3666680,4074,50 16:16.8620890,389,89 16:17.9497610,212,183 16:18.3010800,1085,394
    16:18.4408190,407,131 16:18.5975930,396,82 16:19.0690950,1029,399 16:19.9164720,962,399
    16:20.0941180,203,217 16:20.1715910,898,94 16:20.2073600,181,253 16:20.3263030,320,18 16:20.4292920,1119,414
    16:20.5055900,124,157 16:20.6131190,1313,179 16:21.4270360,1096,383 16:21.9746590,400,102
    16:22.8191020,1057,424 16:23.2010070,203,162 16:23.5453290,1314,216 16:23.8053960,2,93
    16:24.1565550,1065,409 16:24.8355200,372,60 16:25.0732320,4094,82 16:25.2296340,1104,394
    16:25.4939220,1075,415 16:25.7725050,4088,37 16:25.9011740,1225,372 16:26.0047170,1118,426
    16:26.3183540,380,102 16:26.3257810,1133,385 16:26.7224570,42,167 16:27.0312240,2590,50
    16:27.1597540,1140,377 16:27.8064630,126,203 16:28.0379810,431,84 16:29.0146450,1115,421
    16:29.2102830,206,179 16:29.2112150,400,91 16:29.2258530,1123,396 16:29.2444100,862,379
    16:29.3658130,859,422 16:29.3718280,890,402 16:29.3958900,1192,419 16:29.4891630,899,403
    16:29.6803370,163,224 16:29.8740510,181,212 16:30.2696450,416,88 16:30.2905000,1163,426 16:30.4717140,243,14
    16:30.5740160,1041,428 16:30.6036610,1350,146 16:30.7213310,1104,396 16:30.7419110,1127,426
    16:31.5086690,1114,414 16:31.6903470,1083,396 16:31.7061030,1313,173 16:31.7855360,888,395
    16:31.8009570,13,130 16:31.8555470,874,89 16:31.9274420,1065,395 16:32.1833420,1157,426
"""


def write_sample(path: Path, n: int = 120) -> Path:
    rows = AZURE_CONV_HEAD.split()[:n]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                    "".join(f"2023-11-16 18:{row}\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> list[TraceRequest]:
    return load_trace(write_sample(tmp_path_factory.mktemp("trace") / "azure.csv"))


H100 = calibrate("h100", "llama-3.1-8b")
SLO_8B = SLO(1000.0, 50.0)


def run(system: System, trace, rate: float, *, early_stop: bool = False, cal=H100, slo=SLO_8B):
    sim = Simulation(system, cal, SimOptions(slo, early_stop=early_stop), trace, rate, base_rate(trace))
    return sim, sim.run()


SYSTEMS = {s.name: s for s in default_systems(GPU_PROFILE)}


# ---------------------------------------------------------------------- trace
def test_trace_rebased_in_order_with_lengths(sample):
    assert len(sample) == 120
    assert sample[0] == TraceRequest(0.0, 374, 44)
    assert sample[1].arrival_s == pytest.approx(50.9951690 - 46.6805900)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(sample, sample[1:]))
    assert base_rate(sample) == pytest.approx(119 / (92.1833420 - 46.6805900))


# ---------------------------------------------------------------------- conservation
@pytest.mark.parametrize("name", ["colocated-c512", "colocated-c2048", "split-static-60/40", "split-dynamic"])
def test_every_request_finishes_and_every_block_comes_back(sample, name):
    sim, result = run(SYSTEMS[name], sample, 4.0)
    assert result.finished == len(sample) and result.rejected == 0 and not result.early_stopped
    assert all(t < math.inf for t in sim.first_ms) and all(t < math.inf for t in sim.done_ms)
    assert all(d >= f >= a for a, f, d in zip(sim.arrivals, sim.first_ms, sim.done_ms))
    assert all(len(seq.output_token_ids) == r.output_tokens for seq, r in zip(sim.seqs, sample))
    assert sim.blocks.num_free == sim.blocks.num_blocks
    for e in sim.engines:
        assert not e.scheduler.has_work() and not e.inbox


def test_preempted_requests_are_recomputed_and_still_finish(sample):
    """A KV pool far too small for the load: decode preempts, prefill recomputes, nothing is lost."""
    from dataclasses import replace
    tiny = replace(H100, num_kv_blocks_colocated=600, num_kv_blocks_split=600)
    for name in ("colocated-c1024", "split-static-60/40"):
        sim, result = run(SYSTEMS[name], sample, 4.0, cal=tiny)
        assert result.preemptions > 0, name
        assert result.finished == len(sample) and sim.blocks.num_free == 600


# ---------------------------------------------------------------------- the performance model's times
def test_colocated_at_low_load_ttft_is_the_predicted_prefill_time():
    """Requests 100 s apart run alone: TTFT is the predicted time of their prompt's chunks."""
    prompts = [90, 1000, 2047, 3000, 4500]
    trace = [TraceRequest(100.0 * i, p, 8) for i, p in enumerate(prompts)]
    model = H100.build_model()
    for chunk in (512, 2048):
        sim, result = run(System(f"colocated-c{chunk}", "colocated", chunk_size=chunk), trace, 1.0)
        for i, p in enumerate(prompts):
            want, done = 0.0, 0
            while done < p:
                q = min(chunk, p - done)
                want += model.predict_colocated_ms(1.0, q, q * (done + q), 0, 0, 1)
                done += q
            assert sim.first_ms[i] - sim.arrivals[i] == pytest.approx(want, rel=1e-9), (chunk, p)
        # Alone, each of the 7 decode steps is one predicted decode row (context prompt + k).
        assert sim.done_ms[0] - sim.first_ms[0] == pytest.approx(
            sum(model.predict_colocated_ms(1.0, 0, 0, 1, prompts[0] + k, 0) for k in range(1, 8)), rel=1e-9)


def test_split_ttft_alone_is_the_predicted_prefill_at_its_share():
    trace = [TraceRequest(0.0, 1500, 4)]
    sim, _ = run(SYSTEMS["split-static-70/30"], trace, 1.0)
    model = H100.build_model()
    assert sim.first_ms[0] == pytest.approx(model.predict_prefill_ms(0.7, 1500, 1500 * 1500, 1), rel=1e-9)


def test_contention_shared_units_and_bandwidth():
    """Co-residency off: units both caps cover are halved while the other engine works; HBM bandwidth drawn
    beyond the device's stretches the memory-bound part of an iteration by the excess."""
    from services.engine.scheduler import ScheduledChunk, SchedulerOutput
    model = H100.build_model()
    rows = 64
    batch = SchedulerOutput((), tuple(ScheduledChunk(str(i), (0,), 1200, (), True) for i in range(rows)))
    timeshared = CoResidency(enabled=False)
    sim = Simulation(System("overlap", "split", shares=Shares(0.8, 0.4, 2048)), H100,
                     SimOptions(SLO_8B, coresidency=timeshared), [], 1.0, 1.0)
    dec, pre = sim.decode, sim.prefill
    alone = sim._duration(dec, batch, 0.0)
    assert alone == pytest.approx(model.predict_decode_ms(0.4, rows, rows * 1201))
    pre.busy_until, pre.mem_frac = 10.0, 0.0          # prefill busy, drawing no bandwidth
    shared = pre.units + dec.units - 132
    halved = sim._duration(dec, batch, 0.0)
    assert halved == pytest.approx(
        model.predict_units_ms("decode", dec.units - shared / 2, 0, 0, rows, rows * 1201, rows))
    assert halved > alone
    pre.mem_frac = 0.8                                 # now prefill draws most of the bandwidth
    stretched = sim._duration(dec, batch, 0.0)
    f = model.features(dec.units - shared / 2, 0, 0, rows, rows * 1201, rows)
    c = model.coefficients["decode"]
    mem = c.memory * f[3] + c.attention * f[2]
    assert dec.mem_frac + 0.8 > 1 and stretched == pytest.approx(halved + mem * (dec.mem_frac + 0.8 - 1))
    off = Simulation(System("overlap", "split", shares=Shares(0.8, 0.4, 2048)), H100,
                     SimOptions(SLO_8B, bw_contention=False, coresidency=timeshared), [], 1.0, 1.0)
    off.prefill.busy_until, off.prefill.mem_frac = 10.0, 0.8
    assert off._duration(off.decode, batch, 0.0) == pytest.approx(halved)


def _decode_batch(rows: int):
    from services.engine.scheduler import ScheduledChunk, SchedulerOutput
    return SchedulerOutput((), tuple(ScheduledChunk(str(i), (0,), 1200, (), True) for i in range(rows)))


def _prefill_batch(tokens: int):
    from services.engine.scheduler import ScheduledChunk, SchedulerOutput
    return SchedulerOutput((ScheduledChunk("p", tuple(range(tokens)), 0, (), True),), ())


def test_coresident_engines_slow_each_other_by_demand_not_by_half():
    """Co-residency on (the default): while prefill runs on the overlapping SMs, decode's iteration is
    `stretch` times its time alone at its whole cap, which beats losing half the shared SMs; prefill
    under a running decode batch loses little (decode's compute demand is small)."""
    sim = Simulation(System("overlap", "split", shares=Shares(1.0, 0.3, 2048)), H100, SimOptions(SLO_8B), [], 1.0, 1.0)
    dec, pre = sim.decode, sim.prefill
    decode_alone = sim._duration(dec, _decode_batch(64), 0.0)
    prefill_alone = sim._duration(pre, _prefill_batch(2048), 0.0)
    pre.busy_until = 10.0
    decode_together = sim._duration(dec, _decode_batch(64), 0.0)
    co = sim.coresidency
    assert co.enabled                                  # the GPU's default
    phi_d = shared_fraction(dec.units, pre.units, 132)
    assert phi_d == 1.0
    assert decode_together == pytest.approx(decode_alone * stretch(dec.demand, pre.demand, phi_d, co))
    assert decode_alone < decode_together < decode_alone * (1 + co.residual) * 1.2
    dec.busy_until, pre.busy_until = 10.0, math.inf
    prefill_together = sim._duration(pre, _prefill_batch(2048), 0.0)
    phi_p = shared_fraction(pre.units, dec.units, 132)
    assert prefill_together == pytest.approx(prefill_alone * stretch(pre.demand, dec.demand, phi_p, co))
    assert prefill_alone < prefill_together < prefill_alone * 1.15
    # The same split time-shared: prefill loses half of decode's 38 SMs whenever decode runs.
    old = Simulation(System("overlap", "split", shares=Shares(1.0, 0.3, 2048)), H100,
                     SimOptions(SLO_8B, coresidency=CoResidency(enabled=False)), [], 1.0, 1.0)
    old.decode.busy_until = 10.0
    assert old._duration(old.prefill, _prefill_batch(2048), 0.0) > prefill_together


def test_overlapping_cap_alone_gets_its_whole_cap():
    over = System("overlap", "split", shares=Shares(0.8, 0.4, 2048))
    sim, _ = run(over, [TraceRequest(0.0, 1500, 4)], 1.0)     # decode idle while prefill runs
    assert sim.first_ms[0] == pytest.approx(H100.build_model().predict_prefill_ms(0.8, 1500, 1500 * 1500, 1))


# ---------------------------------------------------------------------- the policy
RATE_POLICY = 20.0     # the slice at 20x its rate: the static splits attain 0.68 to 0.96


def test_dynamic_is_not_worse_than_the_best_static_split(sample):
    attain = {}
    for name, s in SYSTEMS.items():
        if s.layout == "split":
            attain[name] = run(s, sample, RATE_POLICY)[1].attainment
    best_static = max(v for k, v in attain.items() if k != "split-dynamic")
    assert attain["split-dynamic"] >= best_static - 0.02, attain


def test_dynamic_moves_shares_through_the_policy(sample):
    sim, result = run(SYSTEMS["split-dynamic"], sample, RATE_POLICY)
    assert result.share_changes > 0
    assert sim.policy is not None and sim.shares != SYSTEMS["split-dynamic"].shares


# ---------------------------------------------------------------------- determinism and the report
def _strip_times(report):
    report = json.loads(json.dumps(report))
    report.pop("wall_s", None)
    for s in report["systems"]:
        for r in s["runs"]:
            r.pop("wall_s"), r.pop("cpu_s")
    return report


def test_same_seed_same_results_other_seed_other_results(sample):
    systems = [SYSTEMS["colocated-c1024"], SYSTEMS["split-dynamic"]]
    opts = SimOptions(SLO_8B)
    head = sample[:60]
    a = compare(H100, opts, poisson(head, 7), systems, [6.0], bisect_steps=0)
    b = compare(H100, opts, poisson(head, 7), systems, [6.0], bisect_steps=0)
    c = compare(H100, opts, poisson(head, 8), systems, [6.0], bisect_steps=0)
    assert _strip_times(a) == _strip_times(b)
    assert _strip_times(a)["systems"] != _strip_times(c)["systems"]


def test_cli_writes_the_json_report(tmp_path, capsys):
    trace = write_sample(tmp_path / "azure.csv", 60)
    out = tmp_path / "sim.json"
    code = cli_main(["simulate", "--trace", str(trace), "--gpu", "h100", "--model", "llama-3.1-8b",
                     "--slo-ttft-ms", "200", "--slo-tpot-ms", "50", "--rates", "1,50", "--bisect-steps", "2",
                     "--systems", "colocated-c1024,split-static-60/40,split-dynamic", "--jobs", "1",
                     "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "split-dynamic" in table and "max rate" in table
    assert "run/s" not in printed.err and "\r" not in printed.err      # no progress bar off a terminal
    report = json.loads(out.read_text())
    assert {"systems", "ratios", "rates", "slo", "trace", "calibration", "summary", "attainment_target",
            "slo_ttft_ms", "slo_tpot_ms", "rate_search", "options", "wall_s"} <= set(report)
    assert [s["name"] for s in report["systems"]] == ["colocated-c1024", "split-static-60/40", "split-dynamic"]
    for s in report["systems"]:
        assert {"max_rate_multiple", "max_rate_per_s", "max_rate_bound", "runs"} <= set(s)
        assert len(s["runs"]) == 4              # 2 grid rates + 2 bisection steps
        for r in s["runs"]:
            assert {"attainment", "ttft_ms", "tpot_ms", "rate_per_s", "finished", "early_stopped"} <= set(r)
        summary = report["summary"][s["name"]]
        assert {"max_rate", "max_rate_text", "per_rate", "vs", "ratio_text"} <= set(summary)
        assert set(summary["max_rate"]) == {"value", "how"}
    assert report["ratios"]["best_colocated"] == "colocated-c1024"
    assert report["trace"]["requests"] == 60
    assert report["options"]["coresidency"]["enabled"] and report["options"]["overlap"] == 1.0


def test_cli_reports_with_and_without_coresidency(tmp_path, capsys):
    """--no-coresidency is the time-shared model; --coresidency-calibration reads gpu-check's file."""
    from orchestrator.coresidency import CoRun, Demand, write_calibration
    trace = write_sample(tmp_path / "azure.csv", 40)
    cal = tmp_path / "coresidency.json"
    run = CoRun(132, 38, 132, 50.0, 2.0, 55.0, 2.8, Demand(0.8, 0.15, 0.15), Demand(0.1, 0.8, 0.7))
    write_calibration(cal, "test GPU", [run])
    reports = {}
    for name, extra in (("off", ["--no-coresidency"]), ("measured", ["--coresidency-calibration", str(cal)])):
        out = tmp_path / f"{name}.json"
        assert cli_main(["simulate", "--trace", str(trace), "--slo-ttft-ms", "300", "--slo-tpot-ms", "50",
                         "--rate-scale", "4", "--systems", "split-dynamic", "--jobs", "1", "--output", str(out),
                         *extra]) == 0
        reports[name] = json.loads(out.read_text())["options"]["coresidency"]
    capsys.readouterr()
    assert reports["off"]["enabled"] is False
    assert reports["measured"]["enabled"] and "test GPU" in reports["measured"]["source"]
    assert reports["measured"]["residual"] > 0


# ---------------------------------------------------------------------- calibration
def test_op_scale_is_one_for_the_source_shape_and_follows_the_gemms():
    assert all(v == pytest.approx(1.0) for v in _op_scale(LLAMA2_7B, LLAMA2_7B).values())
    scale = _op_scale(LLAMA2_7B, LLAMA3_8B)
    assert scale["attn_pre_proj"] == pytest.approx(6144 / 12288)       # GQA: 8 KV heads, not 32
    assert scale["mlp_up_proj"] == pytest.approx(14336 / 11008)


def test_h100_prior_matches_vidur_scaled_to_llama3_8b():
    check = vidur_check(DATA / "vidur_h100_llama2_7b_mlp.csv", H100.build_model())
    assert check["rows"] > 100 and check["median_rel_error"] < 0.10


def test_cpu_coefficients_from_duoctl_json_or_plain(tmp_path):
    duoctl = {"backend": "cpu", "phases": [
        {"phase": p, "coefficients": [{"name": n, "value": v} for n, v in
                                      zip(("overhead_ms", "linear", "attention", "memory"), (3.0, 1.1, 2.0, 0.9))]}
        for p in ("prefill", "decode", "colocated")]}
    (tmp_path / "fit.json").write_text(json.dumps(duoctl))
    (tmp_path / "plain.json").write_text(json.dumps({"decode": {"overhead_ms": 5, "linear": 1, "attention": 2,
                                                                "memory": 1.5}}))
    assert load_coefficients(tmp_path / "fit.json")["decode"] == Coefficients(3.0, 1.1, 2.0, 0.9)
    cal = calibrate("cpu", "smollm2-135m", cpu_cores=2, coefficients_path=tmp_path / "plain.json")
    model = cal.build_model()
    assert model.coefficients["decode"] == Coefficients(5, 1, 2, 1.5)
    assert model.device.kind == "cpu" and model.device.num_units == 2
    assert cal.profile.overlap == 0.5 and cal.profile.max_num_seqs == 128
    with pytest.raises(ValueError, match="--gpu"):
        calibrate("tpu", "llama-3.1-8b")
    (tmp_path / "partial.json").write_text(json.dumps({"decode": {"overhead_ms": 5}}))
    with pytest.raises(ValueError, match="lacks"):
        load_coefficients(tmp_path / "partial.json")


def test_cpu_mode_runs_the_cpu_stack_settings(sample):
    cal = calibrate("cpu", "smollm2-135m", cpu_cores=2)
    short = [TraceRequest(r.arrival_s, max(1, r.prompt_tokens // 10), max(1, r.output_tokens // 10))
             for r in sample[:30]]
    for name in ("colocated-c512", "split-static-50/50", "split-dynamic"):
        system = next(s for s in default_systems(cal.profile) if s.name == name)
        sim, result = run(system, short, 1.0, cal=cal, slo=SLO(2000, 200, prefer="tpot"))
        assert result.finished == len(short), name


# ---------------------------------------------------------------------- purity
def test_simulator_imports_nothing_heavy():
    code = ("import sys, orchestrator.simulator, orchestrator.sim_sweep; "
            "print(','.join(m for m in ('torch', 'grpc', 'redis', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""
