"""The multi-turn workload's pure parts: synthetic conversations with their stated parameters, token
ids (one system prompt for all, a window per user message), one variant per run (no block shared
between runs, the system prompt shared within one), the turns' prompts, the command line."""
from __future__ import annotations

import pytest

from bench.conversations import (Conversation, MultiTurnParams, conversations_for_run, conversations_with_token_ids,
                                 describe_lengths, is_conversations, synthetic_conversations, turn_prompt)
from bench.datasets import Arrival, RequestSpec, for_run, with_token_ids
from services.engine.prefix_hash import block_keys

CORPUS = list(range(2000, 2400))          # 400 distinct ids: windows of it never repeat within a test


def test_synthetic_conversations_have_the_stated_shape():
    params = MultiTurnParams(num_conversations=3, turns=5, user_len=20, answer_len=8, system_len=40, think_s=0.5)
    convs = synthetic_conversations(params)
    assert len(convs) == 3 and all(c.turns == 5 for c in convs)
    assert all(c.user_lens == (20,) * 5 and c.answer_lens == (8,) * 5 and c.think_s == 0.5 for c in convs)
    assert convs[0].max_context() == 40 + 5 * 20 + 5 * 8
    assert "3 conversations x 5 turns" in params.describe() and "think time 0.5 s" in params.describe()
    # Every turn resends its history: prompts 60, 88, 116, 144, 172 tokens.
    assert describe_lengths(convs) == "15 requests, mean 116 in / 8 out tokens, longest 180"


def test_lengths_spread_with_the_range_ratio_and_follow_the_seed():
    params = MultiTurnParams(num_conversations=40, turns=3, user_len=100, answer_len=10, range_ratio=0.5, seed=2)
    convs = synthetic_conversations(params)
    users = [n for c in convs for n in c.user_lens]
    answers = [n for c in convs for n in c.answer_lens]
    assert all(50 <= n <= 150 for n in users) and all(5 <= n <= 15 for n in answers) and len(set(users)) > 20
    assert convs == synthetic_conversations(params)
    assert convs != synthetic_conversations(MultiTurnParams(num_conversations=40, turns=3, user_len=100,
                                                            answer_len=10, range_ratio=0.5, seed=3))


@pytest.mark.parametrize("bad", [dict(turns=0), dict(user_len=0), dict(system_len=-1), dict(range_ratio=1.0),
                                 dict(think_s=-1.0), dict(num_conversations=0)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        MultiTurnParams(**bad)


def test_conversations_share_exactly_their_system_prompt():
    convs = conversations_with_token_ids(synthetic_conversations(
        MultiTurnParams(num_conversations=4, turns=3, user_len=24, answer_len=4, system_len=40)), CORPUS)
    assert {c.system_ids for c in convs} == {tuple(CORPUS[:40])}
    users = [u for c in convs for u in c.user_ids]
    assert all(len(u) == 24 for u in users) and len(set(users)) == 12          # every message its own
    firsts = [turn_prompt(c.system_ids, c.user_ids[0]) for c in convs]
    keys = [block_keys(p, 16) for p in firsts]
    assert all(k[:2] == keys[0][:2] for k in keys)                            # the system prompt's full blocks
    assert len({k[2] for k in keys}) == 4                                     # then each its own
    assert conversations_with_token_ids(convs, [1, 2, 3]) == convs            # ids given: kept


def test_each_run_has_its_own_conversations_and_shares_within_one():
    convs = conversations_with_token_ids(synthetic_conversations(
        MultiTurnParams(num_conversations=3, turns=2, user_len=30, answer_len=4, system_len=32)), CORPUS)
    runs = [conversations_for_run(convs, run) for run in range(3)]
    keys = [{k for c in run for k in block_keys(turn_prompt(c.system_ids, c.user_ids[0]), 16)} for run in runs]
    assert not keys[0] & keys[1] and not keys[1] & keys[2]                    # no block shared between runs
    assert len({c.system_ids for c in runs[1]}) == 1                          # one system prompt within a run
    assert all(c.system_ids[1:] == o.system_ids[1:] and c.user_ids == o.user_ids for c, o in zip(runs[2], convs))
    bare = conversations_with_token_ids([Conversation(0, (20, 20), (4, 4), 0.0)], CORPUS)
    first = conversations_for_run(bare, 7)[0]
    assert first.system_ids == () and first.user_ids[0][0] == 1007 and first.user_ids[1] == bare[0].user_ids[1]


def test_a_turn_resends_the_history_then_its_message():
    assert turn_prompt((1, 2), (3,)) == (1, 2, 3)
    assert turn_prompt((), (5, 6)) == (5, 6)
    assert is_conversations([Conversation(0, (1,), (1,), 0.0)]) and not is_conversations([RequestSpec(1, 1)])
    assert not is_conversations([])
    with pytest.raises(ValueError, match="one answer length per user message"):
        Conversation(0, (1, 2), (1,), 0.0)


def test_for_run_renames_corpus_prompts_even_when_the_caller_cut_them():
    """bench peer cuts the token ids once (every system the same ids): each run still gets its own."""
    specs = with_token_ids([RequestSpec(20, 2), RequestSpec(20, 2)], CORPUS)
    assert all(s.from_corpus for s in specs)
    assert [s.token_ids[0] for s in for_run(specs, 3)] == [1003, 1003]
    given = RequestSpec(3, 2, token_ids=(7, 8, 9))                           # ids the caller chose: sent as given
    assert for_run([given], 3) == [given]


def test_the_command_line_makes_a_multi_turn_workload_at_conversation_rates():
    from bench.workloads import arrival_from_args, workload_from_args
    from duoserve.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--dataset", "multi-turn", "--conversations", "6",
                                      "--turns", "3", "--system-len", "100", "--user-len", "30",
                                      "--answer-len", "10", "--think-time", "0.25", "--request-rate", "0.5"])
    convs, words = workload_from_args(args)
    assert len(convs) == 6 and convs[0] == Conversation(100, (30,) * 3, (10,) * 3, 0.25)
    assert words.startswith("multi-turn: 6 conversations x 3 turns, system prompt 100 tokens (shared)")
    arrival = arrival_from_args(args)
    assert arrival == Arrival("poisson", 0.5, per="conversation")
    assert arrival.describe() == "0.5 conversations/s (Poisson, seed 0)"
    args.arrival = "trace"
    with pytest.raises(ValueError, match="no recorded arrivals"):
        arrival_from_args(args)
    defaults = build_parser().parse_args(["bench", "peer", "--dataset", "multi-turn"])
    assert (defaults.conversations, defaults.turns, defaults.system_len, defaults.user_len, defaults.answer_len,
            defaults.think_time) == (50, 4, 256, 64, 32, 1.0)
