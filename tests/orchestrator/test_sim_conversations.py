"""The simulator's prefix caching and its multi-turn workload: turns sent a think time after the
previous answer, resending the history; prefill counts only what is not cached; blocks come back;
the policy sees the cached tokens; a trace without content is unchanged by caching; the command."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from duoserve.cli import main as cli_main
from orchestrator.policy import SLO, Shares
from orchestrator.sim_arrivals import MarkedPrompt
from orchestrator.sim_calibration import calibrate
from orchestrator.sim_conversations import ConversationWorkload
from orchestrator.sim_trace import base_rate, synthetic
from orchestrator.simulator import SimOptions, Simulation, System
from services.engine.prefix_hash import block_keys

H100 = calibrate("h100", "llama-3.1-8b")
SLO_8B = SLO(1000.0, 50.0)
CHAT = ConversationWorkload(num_conversations=20, turns=4, user_tokens=150, answer_tokens=60, think_s=2.0,
                            rate_per_s=2.0, system_tokens=300, seed=3)
COLOCATED = System("colocated-c2048", "colocated", chunk_size=2048)
SPLIT = System("split-static-60/40", "split", shares=Shares(0.6, 0.4, 2048))
DYNAMIC = System("split-dynamic", "split", shares=Shares(0.6, 0.4, 2048), dynamic=True)


class _Counting(Simulation):
    """The real simulation, counting the prompt tokens its iterations feed."""

    prefilled = 0

    def _duration(self, e, out, t):
        self.prefilled += sum(len(c.token_ids) for c in out.prefill_chunks)
        return super()._duration(e, out, t)


def _run(system: System, workload, caching: bool, rate: float = 1.0, cal=H100, cls=_Counting, **options):
    rate_1x = workload.base_rate() if isinstance(workload, ConversationWorkload) else base_rate(workload)
    options = SimOptions(SLO_8B, early_stop=False, prefix_caching=caching, **options)
    sim = cls(system, cal, options, workload, rate, rate_1x)
    return sim, sim.run()


def test_the_workload_states_its_parameters():
    assert [CHAT.prompt_tokens(k) for k in range(4)] == [450, 660, 870, 1080]
    d = CHAT.describe()
    assert (d["requests"], d["rate_per_s"], d["mean_prompt_tokens"]) == (80, 8.0, 765)
    assert d["repeated_prompt_share"] == 0.8039                        # 1 - new messages / all prompt tokens
    assert CHAT.start_times_s() == CHAT.start_times_s() != replace(CHAT, seed=4).start_times_s()
    think = [t for row in replace(CHAT, num_conversations=2000).think_times_s() for t in row]
    assert len(think) == 2000 * 3 and sum(think) / len(think) == pytest.approx(CHAT.think_s, rel=0.05)
    assert think != sorted(think) and replace(CHAT, think_s=0.0).think_times_s()[0] == [0.0] * 3
    with pytest.raises(ValueError):
        ConversationWorkload(1, 0, 1, 1, 0.0, 1.0)


def test_marked_prompts_share_blocks_only_where_meant():
    a, b = MarkedPrompt.make(64, 1, at=32), MarkedPrompt.make(64, 2, at=32)
    ka, kb = block_keys(a, 16), block_keys(b, 16)
    assert ka[:2] == kb[:2] and ka[2] != kb[2]                        # the system prompt, then their own
    longer = MarkedPrompt.make(80, 1, at=32)
    assert block_keys(a + [0] * 16, 16) == block_keys(longer, 16)     # history + answer (0s) = the next prompt


@pytest.mark.parametrize("system", [COLOCATED, SPLIT], ids=lambda s: s.name)
def test_each_turn_resends_the_history_a_think_time_after_its_answer(system):
    sim, result = _run(system, CHAT, caching=True)
    assert result.finished == CHAT.num_requests and result.rejected == 0
    assert sim.blocks.num_free == sim.blocks.num_blocks and sim.blocks.num_cached > 0   # cached blocks are free
    sent = {sim.source.turn_of(i): i for i in range(CHAT.num_requests)}
    think = CHAT.think_times_s()
    for (conv, turn), i in sent.items():
        if turn == 0:
            continue
        before = sent[(conv, turn - 1)]
        assert sim.arrivals[i] == pytest.approx(sim.done_ms[before] + think[conv][turn - 1] * 1000)
        assert len(sim.seqs[i].prompt_token_ids) == sim.seqs[before].num_tokens + CHAT.user_tokens
    assert sorted(sim.arrivals) == sim.arrivals                        # indices in send order


@pytest.mark.parametrize("system", [COLOCATED, SPLIT], ids=lambda s: s.name)
def test_with_caching_prefill_feeds_only_the_uncached_tokens(system):
    plain, without = _run(system, CHAT, caching=False)
    cached, with_ = _run(system, CHAT, caching=True)
    prompts = sum(CHAT.prompt_tokens(k) for k in range(CHAT.turns)) * CHAT.num_conversations
    assert without.preemptions == with_.preemptions == 0
    assert plain.prefilled == prompts
    schedulers = [e.scheduler for e in cached.engines]
    hits = sum(s.prefix_hit_tokens for s in schedulers)
    assert sum(s.prefix_query_tokens for s in schedulers) == prompts
    assert cached.prefilled == prompts - hits
    assert (with_.cached_prompt_tokens, with_.prefix_hit_rate) == (hits, round(hits / prompts, 4))
    assert (without.cached_prompt_tokens, without.prefix_hit_rate) == (0, None)
    # A later turn finds its history's full blocks (the answer's last token has no KV); a first turn the
    # system prompt's, once another conversation computed it.
    history = sum((CHAT.prompt_tokens(k - 1) + CHAT.answer_tokens - 1) // 16 * 16 for k in range(1, CHAT.turns))
    system_prompt = CHAT.system_tokens // 16 * 16
    assert history * CHAT.num_conversations <= hits <= (history + system_prompt) * CHAT.num_conversations
    assert hits > history * CHAT.num_conversations + system_prompt        # the system prompt was shared
    assert with_.ttft_ms["p50"] < without.ttft_ms["p50"]


def test_the_policy_is_given_the_cached_tokens():
    seen: list[int] = []

    class _Watching(Simulation):
        def _build(self):
            super()._build()
            decide = self.policy.decide

            def watched(state, current, slo):
                seen.extend(r.cached_tokens for r in state.waiting)
                return decide(state, current, slo)
            self.policy.decide = watched

    busy = replace(CHAT, rate_per_s=20.0)
    _, result = _run(DYNAMIC, busy, caching=True, rate=1.0, cls=_Watching)
    assert result.finished == busy.num_requests
    assert any(c > 0 for c in seen) and all(c % 16 == 0 for c in seen)
    seen.clear()
    _run(DYNAMIC, busy, caching=True, rate=1.0, cls=_Watching, policy_sees_cache=False)      # the control
    assert seen and not any(seen)


def test_caching_changes_nothing_on_a_trace_without_content():
    trace = synthetic(120, 800, 40, 20.0, seed=5)
    for system in (COLOCATED, SPLIT, DYNAMIC):
        off = _run(system, trace, caching=False)[1].as_dict()
        on_sim, on = _run(system, trace, caching=True)
        assert sum(e.scheduler.prefix_hit_tokens for e in on_sim.engines) == 0      # every prompt its own
        on = on.as_dict()
        for k in ("wall_s", "cpu_s"):
            off.pop(k), on.pop(k)
        assert (on.pop("prefix_hit_rate"), off.pop("prefix_hit_rate")) == (0.0, None)
        assert on == off, system.name


def test_a_refused_turn_ends_its_conversation():
    short = replace(H100, profile=replace(H100.profile, max_model_len=900))     # turn 2 (870) fits, turn 3 not
    sim, result = _run(COLOCATED, CHAT, caching=True, cal=short)
    assert result.rejected == CHAT.num_conversations                          # each conversation's last turn
    assert result.finished == 3 * CHAT.num_conversations


def test_cli_runs_the_multi_turn_workload(tmp_path, capsys):
    out = tmp_path / "mt.json"
    args = ["simulate", "--multi-turn", "--conversations", "10", "--turns", "3", "--user-tokens", "100",
            "--answer-tokens", "20", "--think-s", "1", "--conversation-rate", "2", "--slo-ttft-ms", "1000",
            "--slo-tpot-ms", "50", "--rate-scale", "1", "--systems", "colocated-c1024,split-dynamic",
            "--jobs", "1", "--prefix-caching", "--output", str(out)]
    assert cli_main(args) == 0
    assert "10 conversations of 3 turns" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["trace"]["workload"] == "multi-turn" and report["trace"]["requests"] == 30
    assert report["options"]["prefix_caching"] is True
    assert all(run["finished"] == 30 for s in report["systems"] for run in s["runs"])
    assert cli_main(["simulate", "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"]) == 2    # no --trace, no --multi-turn
    assert "--multi-turn" in capsys.readouterr().err
