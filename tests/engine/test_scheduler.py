"""Scheduler and block accounting as plain Python: no model, no torch."""
from __future__ import annotations

import random

import pytest

from services.engine.blocks import BlockManager, OutOfBlocks, blocks_for_tokens
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import (RequestTooLarge, Scheduler, SchedulerConfig, SchedulerMode)
from services.engine.sequence import FinishReason, Sequence, SequenceStatus

EOS = 0


def make_scheduler(num_blocks: int = 64, mode: SchedulerMode = SchedulerMode.HYBRID, **kw) -> Scheduler:
    config = SchedulerConfig(mode=mode, block_size=4, eos_token_ids=(EOS,), **kw)
    return Scheduler(config, BlockManager(num_blocks))


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 8, **kw) -> Sequence:
    return Sequence(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def run_to_end(sched: Scheduler, token: int = 7, max_steps: int = 10_000) -> list:
    """Drive the scheduler as an engine would, sampling `token` always; returns every batch."""
    batches = []
    for _ in range(max_steps):
        if not sched.has_work():
            return batches
        out = sched.schedule()
        batches.append(out)
        sched.postprocess(out, {c.request_id: token for c in out.chunks if c.is_sampled})
    raise AssertionError("scheduler did not finish")


def test_blocks_can_allocate_is_separate_from_allocate():
    blocks = BlockManager(4)
    assert blocks.can_allocate(4) and not blocks.can_allocate(5)
    assert blocks.num_free == 4          # asking changed nothing
    got = blocks.allocate("a", 3)
    assert len(set(got)) == 3 and blocks.num_free == 1
    with pytest.raises(OutOfBlocks):
        blocks.allocate("b", 2)
    assert blocks.free("a") == 3 and blocks.num_free == 4
    assert blocks.free("a") == 0         # freeing twice is harmless


def test_token_budget_and_chunk_size_respected():
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=32, chunk_size=24)
    for i in range(6):
        sched.add(make_seq(f"r{i}", prompt_len=20, max_tokens=5))
    for out in run_to_end(sched):
        total = out.num_prefill_tokens + len(out.decode_chunks)
        assert total <= 32
        assert out.num_prefill_tokens <= 24


def test_long_prompt_is_chunked_and_sampled_once_at_the_end():
    sched = make_scheduler(num_blocks=64, chunk_size=8)
    sched.add(make_seq("long", prompt_len=30, max_tokens=2))
    first = [sched.schedule() for _ in range(1)][0]
    assert [len(c.token_ids) for c in first.prefill_chunks] == [8]
    assert not first.prefill_chunks[0].is_sampled
    sched.postprocess(first, {})
    starts = [0]
    while True:
        out = sched.schedule()
        chunk = out.chunks[0]
        starts.append(chunk.start_position)
        sampled = {chunk.request_id: 5} if chunk.is_sampled else {}
        sched.postprocess(out, sampled)
        if chunk.is_sampled:
            break
    assert starts == [0, 8, 16, 24]
    seq = sched.get("long")
    assert seq.num_computed_tokens == 30 and seq.output_token_ids == [5]


def test_hybrid_decodes_run_beside_prefill_chunks():
    sched = make_scheduler(num_blocks=64, chunk_size=4)
    sched.add(make_seq("a", prompt_len=3, max_tokens=10))
    out = sched.schedule(); sched.postprocess(out, {"a": 9})
    sched.add(make_seq("b", prompt_len=12, max_tokens=10))
    out = sched.schedule()
    assert [c.request_id for c in out.decode_chunks] == ["a"]
    assert [c.request_id for c in out.prefill_chunks] == ["b"]
    assert out.decode_chunks[0].token_ids == (9,) and out.decode_chunks[0].start_position == 3


def test_finish_reasons_and_no_block_leak():
    sched = make_scheduler(num_blocks=32)
    sched.add(make_seq("len", prompt_len=5, max_tokens=3))
    sched.add(make_seq("eos", prompt_len=5, max_tokens=3))
    sched.add(make_seq("ignore", prompt_len=5, max_tokens=3, ignore_eos=True))
    sched.add(make_seq("stoptok", prompt_len=5, max_tokens=3, stop_token_ids=(42,)))
    seqs = {s.request_id: s for s in sched.waiting}
    tokens = {"len": 7, "eos": EOS, "ignore": EOS, "stoptok": 42}
    while sched.has_work():
        out = sched.schedule()
        sched.postprocess(out, {c.request_id: tokens[c.request_id] for c in out.chunks if c.is_sampled})
    assert seqs["len"].finish_reason is FinishReason.LENGTH and len(seqs["len"].output_token_ids) == 3
    assert seqs["eos"].finish_reason is FinishReason.STOP and len(seqs["eos"].output_token_ids) == 1
    assert seqs["ignore"].finish_reason is FinishReason.LENGTH
    assert seqs["stoptok"].finish_reason is FinishReason.STOP
    assert sched.blocks.num_free == 32


def test_preemption_frees_and_requeues_then_everything_completes():
    # 6 blocks of 4 tokens: three requests of 7-token prompts fit (2 blocks each), but cannot all grow.
    sched = make_scheduler(num_blocks=6)
    for i in range(3):
        sched.add(make_seq(f"r{i}", prompt_len=7, max_tokens=6))
    seqs = {s.request_id: s for s in sched.waiting}
    preempted = []
    for out in run_to_end(sched):
        preempted.extend(out.preempted_ids)
        assert sched.blocks.num_free >= 0
    assert preempted, "the pool was too small for all three: someone must have been preempted"
    assert all(s.status is SequenceStatus.FINISHED and len(s.output_token_ids) == 6 for s in seqs.values())
    assert max(s.num_preemptions for s in seqs.values()) >= 1
    assert sched.blocks.num_free == 6


def test_preempted_request_is_recomputed_over_prompt_and_output():
    sched = make_scheduler(num_blocks=4)
    sched.add(make_seq("old", prompt_len=7, max_tokens=8))
    out = sched.schedule(); sched.postprocess(out, {"old": 3})     # 8 tokens in 2 blocks (+ room)
    sched.add(make_seq("new", prompt_len=3, max_tokens=8))
    for _ in range(30):
        out = sched.schedule()
        if out.preempted_ids:
            break
        sched.postprocess(out, {c.request_id: 3 for c in out.chunks if c.is_sampled})
    victim = sched.get(out.preempted_ids[0])
    assert victim.request_id == "new" and victim.block_ids == [] and victim.num_computed_tokens == 0
    assert sched.waiting[0] is victim
    sched.postprocess(out, {c.request_id: 3 for c in out.chunks if c.is_sampled})
    while sched.get("old") is not None and sched.get("old").status is SequenceStatus.RUNNING:
        out = sched.schedule()
        sched.postprocess(out, {c.request_id: 3 for c in out.chunks if c.is_sampled})
    out = sched.schedule()   # the recompute: prompt and its generated tokens, from position 0
    recompute = [c for c in out.prefill_chunks if c.request_id == "new"][0]
    assert recompute.start_position == 0
    assert len(recompute.token_ids) == victim.num_tokens


def test_cancel_frees_blocks_immediately():
    sched = make_scheduler(num_blocks=16)
    sched.add(make_seq("a", prompt_len=9, max_tokens=50))
    out = sched.schedule(); sched.postprocess(out, {"a": 1})
    assert sched.blocks.num_free < 16
    sched.finish("a", FinishReason.CANCELLED)
    assert sched.blocks.num_free == 16 and not sched.has_work()


def test_prefill_mode_hands_off_with_blocks_and_decode_mode_continues():
    blocks = BlockManager(16)
    prefill = Scheduler(SchedulerConfig(mode=SchedulerMode.PREFILL, block_size=4), blocks)
    decode = Scheduler(SchedulerConfig(mode=SchedulerMode.DECODE, block_size=4), blocks)
    seq = make_seq("x", prompt_len=6, max_tokens=3)
    prefill.add(seq)
    out = prefill.schedule()
    assert not out.decode_chunks
    advanced = prefill.postprocess(out, {"x": 11})
    assert advanced == [seq] and seq.status is SequenceStatus.HANDED_OFF and not prefill.has_work()
    assert blocks.owned("x") == seq.block_ids    # ownership travelled with it
    decode.admit_prefilled(seq)
    while decode.has_work():
        out = decode.schedule()
        assert not out.prefill_chunks
        decode.postprocess(out, {"x": 12})
    assert seq.output_token_ids == [11, 12, 12] and blocks.num_free == 16


def test_decode_growth_asked_ahead_is_what_schedule_would_ask():
    blocks = BlockManager(16)
    decode = Scheduler(SchedulerConfig(mode=SchedulerMode.DECODE, block_size=4), blocks)
    seqs = [make_seq(r, prompt_len=n, max_tokens=8) for r, n in (("x", 3), ("y", 5))]
    for seq in seqs:                                      # as prefill hands it off: prompt computed, a first token
        seq.block_ids.extend(blocks.allocate(seq.request_id, blocks_for_tokens(seq.num_tokens, 4)))
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(7)
        decode.admit_prefilled(seq)
    out = decode.schedule()
    assert decode.upcoming_decode_growth(steps_ahead=1) == [("x", 1)]   # asked during the forward pass
    decode.postprocess(out, {"x": 7, "y": 7})             # x: 4 tokens computed, its 5th needs block 2
    assert decode.upcoming_decode_growth() == [("x", 1)]
    granted = blocks.allocate_many(decode.upcoming_decode_growth())
    assert decode.adopt_blocks({**granted, "gone": [15]}) == ["gone"]
    free_before = blocks.num_free
    out = decode.schedule()                               # nothing left to allocate
    assert blocks.num_free == free_before and len(out.decode_chunks) == 2
    assert decode.upcoming_decode_growth() == []


def test_request_too_large_is_refused_up_front():
    sched = make_scheduler(num_blocks=4, max_model_len=100)
    with pytest.raises(RequestTooLarge, match="KV pool"):
        sched.add(make_seq("big", prompt_len=40))
    with pytest.raises(RequestTooLarge, match="context"):
        make_scheduler(num_blocks=400, max_model_len=100).add(make_seq("big", prompt_len=100))


def test_random_workload_leaks_no_blocks():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=40, max_num_batched_tokens=64, chunk_size=32, max_num_seqs=8)
    for i in range(40):
        sched.add(make_seq(f"r{i}", prompt_len=rng.randint(1, 60), max_tokens=rng.randint(1, 30)))
    steps = 0
    while sched.has_work():
        out = sched.schedule()
        sched.postprocess(out, {c.request_id: rng.choice([7, 7, 7, EOS]) for c in out.chunks if c.is_sampled})
        if rng.random() < 0.05 and sched.running:
            sched.finish(rng.choice(sched.running).request_id, FinishReason.CANCELLED)
        owned = sum(len(s.block_ids) for s in sched.running)
        assert owned + sched.blocks.num_free == 40
        steps += 1
    assert sched.blocks.num_free == 40 and steps < 5000


def test_blocks_for_tokens():
    assert [blocks_for_tokens(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]


def test_request_grown_past_the_pool_finishes_with_length_instead_of_looping():
    sched = make_scheduler(num_blocks=3)
    sched.add(make_seq("a", prompt_len=7, max_tokens=50))
    seq = sched.waiting[0]
    run_to_end(sched)
    assert seq.finish_reason is FinishReason.LENGTH and sched.blocks.num_free == 3


class CountingBlocks(BlockManager):
    """The in-process allocator, counting calls: the decode path must grow every row in one call."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self.calls = {"allocate": 0, "allocate_many": 0, "can_allocate": 0}

    def allocate(self, request_id: str, num_blocks: int) -> list[int]:
        self.calls["allocate"] += 1
        return super().allocate(request_id, num_blocks)

    def allocate_many(self, requests):
        self.calls["allocate_many"] += 1
        granted: dict[str, list[int]] = {}
        for request_id, n in requests:
            if n > self.num_free:
                break
            granted.setdefault(request_id, []).extend(super().allocate(request_id, n))
        return granted

    def can_allocate(self, num_blocks: int) -> bool:
        self.calls["can_allocate"] += 1
        return super().can_allocate(num_blocks)


def _decoding(blocks: BlockManager, num_seqs: int, context: int) -> Scheduler:
    """A decode scheduler holding `num_seqs` requests whose `context` tokens fill whole blocks of 4."""
    sched = Scheduler(SchedulerConfig(mode=SchedulerMode.DECODE, block_size=4), blocks)
    for i in range(num_seqs):
        seq = make_seq(f"r{i}", context, max_tokens=50, ignore_eos=True)
        seq.output_token_ids.append(7)
        seq.num_computed_tokens = context
        seq.block_ids.extend(blocks.allocate(seq.request_id, blocks_for_tokens(context, 4)))
        sched.admit_prefilled(seq)
    return sched


def test_decode_rows_crossing_a_block_edge_grow_in_one_allocator_call():
    blocks = CountingBlocks(64)
    sched = _decoding(blocks, 8, context=8)          # 8 tokens = 2 full blocks: each row needs a third
    blocks.calls = dict.fromkeys(blocks.calls, 0)
    out = sched.schedule()
    assert len(out.decode_chunks) == 8 and not out.preempted_ids
    assert blocks.calls == {"allocate": 0, "allocate_many": 1, "can_allocate": 0}
    assert all(len(c.block_ids) == 3 for c in out.decode_chunks)


def test_decode_growth_short_of_blocks_preempts_the_newest_and_leaks_nothing():
    blocks = CountingBlocks(8 * 2 + 3)                # 8 rows of 2 blocks, 3 spare: 5 rows cannot grow
    sched = _decoding(blocks, 8, context=8)
    out = sched.schedule()
    assert out.preempted_ids                           # the newest went back, oldest first kept
    kept = [c.request_id for c in out.decode_chunks]
    assert kept == [f"r{i}" for i in range(len(kept))]
    held = sum(len(s.block_ids) for s in sched.running)
    assert held + blocks.num_free == blocks.num_blocks


# ---------------------------------------------------------------------------------------------
# Prefix caching
# ---------------------------------------------------------------------------------------------

def test_a_repeated_prompt_prefills_only_its_uncached_tail():
    sched = make_scheduler(num_blocks=16, prefix_caching=True)
    sched.add(make_seq("a", 10, max_tokens=2))
    run_to_end(sched)
    assert sched.blocks.num_free == 16 and sched.blocks.num_cached == 2      # 11 of 12 tokens have KV: 2 full blocks
    sched.add(make_seq("b", 10, max_tokens=2))
    first = sched.schedule()
    (chunk,) = first.prefill_chunks
    assert chunk.start_position == 8 and chunk.token_ids == (9, 10)          # two cached blocks skipped
    assert sched.get("b").num_cached_tokens == 8
    assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == (20, 8)


def test_a_prompt_that_fills_its_blocks_exactly_still_computes_its_last_block():
    sched = make_scheduler(num_blocks=16, prefix_caching=True)
    sched.add(make_seq("a", 8, max_tokens=1))
    run_to_end(sched)
    sched.add(make_seq("b", 8, max_tokens=1))
    (chunk,) = sched.schedule().prefill_chunks
    assert chunk.start_position == 4 and len(chunk.token_ids) == 4           # the logits need the last token


def test_concurrent_requests_share_the_prefix_once_it_is_computed():
    sched = make_scheduler(num_blocks=16, prefix_caching=True, chunk_size=8, max_num_batched_tokens=8)
    sched.add(make_seq("a", 12, max_tokens=4))
    out = sched.schedule()
    sched.postprocess(out, {})                                               # a's first 8 tokens: 2 keyed blocks
    sched.add(make_seq("b", 12, max_tokens=4))
    batches = run_to_end(sched)
    b_chunks = [c for out in batches for c in out.prefill_chunks if c.request_id == "b"]
    assert b_chunks[0].start_position == 8
    assert b_chunks[0].block_ids[:2] == out.prefill_chunks[0].block_ids[:2]       # the same blocks, in place
    assert sched.blocks.num_free == 16


def test_a_preempted_request_finds_its_own_blocks_again():
    sched = make_scheduler(num_blocks=6, prefix_caching=True)
    sched.add(make_seq("old", 8, max_tokens=12))
    sched.add(make_seq("new", 8, max_tokens=12))
    batches = run_to_end(sched)
    recomputes = [c for out in batches for c in out.prefill_chunks if c.request_id == "new"][1:]
    assert recomputes and recomputes[0].start_position > 0                  # not from token 0 again
    assert sched.blocks.num_free == 6


def test_without_prefix_caching_nothing_is_cached():
    sched = make_scheduler(num_blocks=16)
    sched.add(make_seq("a", 10, max_tokens=2))
    run_to_end(sched)
    sched.add(make_seq("b", 10, max_tokens=2))
    (chunk,) = sched.schedule().prefill_chunks
    assert chunk.start_position == 0 and sched.blocks.num_cached == 0


def test_copies_of_one_prompt_wait_for_the_first_then_reuse_its_blocks():
    """n > 1: the copies of a prompt sent at once compute only their tail, on the first's blocks."""
    sched = make_scheduler(num_blocks=32, prefix_caching=True)
    for name in ("a", "b", "c"):
        sched.add(make_seq(name, 10, max_tokens=3))
    sched.add(Sequence("other", [50 + i for i in range(6)], SamplingParams(max_tokens=3)))
    first = sched.schedule()
    assert [c.request_id for c in first.prefill_chunks] == ["a", "other"]   # b, c wait; other passes them
    assert not sched.awaits_recent_keys()                                    # nothing keyed yet
    sched.postprocess(first, {"a": 7, "other": 7})
    assert sched.awaits_recent_keys()          # b, c look up what a's chunk just keyed: a worker sends it first
    second = sched.schedule()
    copies = [c for c in second.prefill_chunks if c.request_id in ("b", "c")]
    assert [(c.start_position, c.token_ids) for c in copies] == [(8, (9, 10))] * 2
    assert all(c.block_ids[:2] == first.prefill_chunks[0].block_ids[:2] for c in copies)
    assert sched.prefix_hit_tokens == 16 and sched.get("b").num_cached_tokens == 8
    sched.postprocess(second, {c.request_id: 7 for c in second.chunks if c.is_sampled})
    run_to_end(sched)
    assert sched.blocks.num_free == 32


def test_a_copy_waits_for_every_chunk_of_the_shared_prompt():
    sched = make_scheduler(num_blocks=32, prefix_caching=True, chunk_size=8, max_num_batched_tokens=8)
    sched.add(make_seq("a", 20, max_tokens=2))
    sched.add(make_seq("b", 20, max_tokens=2))
    starts = []
    for _ in range(3):
        out = sched.schedule()
        starts.append([(c.request_id, c.start_position) for c in out.prefill_chunks])
        sched.postprocess(out, {c.request_id: 7 for c in out.chunks if c.is_sampled})
    # b waits while a computes blocks 0-3 (its reusable ones), then computes only its last block
    assert starts == [[("a", 0)], [("a", 8)], [("a", 16), ("b", 16)]]


def test_without_prefix_caching_copies_run_side_by_side():
    sched = make_scheduler(num_blocks=32)
    sched.add(make_seq("a", 10))
    sched.add(make_seq("b", 10))
    assert [c.start_position for c in sched.schedule().prefill_chunks] == [0, 0]
    assert not sched.awaits_recent_keys()


def _check_shared_tables(sched: Scheduler) -> None:
    """Every block held is held once, or by several requests at the same position (a cached prefix
    block: keys are chained from the first block), and held + free is the pool."""
    positions: dict[int, set[int]] = {}
    for seq in sched.running:
        for index, block in enumerate(sched.blocks.owned(seq.request_id)):
            positions.setdefault(block, set()).add(index)
    assert all(len(p) == 1 for p in positions.values())
    assert len(positions) + sched.blocks.num_free == sched.blocks.num_blocks


def test_preempting_requests_that_share_blocks_frees_no_block_another_holds():
    """Three requests on one 8-token prefix outgrow a 9-block pool: the newest are preempted, the
    prefix blocks stay with the older ones, and each recompute finds them cached again."""
    sched = make_scheduler(num_blocks=9, prefix_caching=True)
    prefix = list(range(1, 9))
    for i in range(3):
        sched.add(Sequence(f"r{i}", prefix + [20 + i], SamplingParams(max_tokens=12, ignore_eos=True)))
    preempted, recomputes = [], []
    for _ in range(500):
        if not sched.has_work():
            break
        out = sched.schedule()
        preempted += out.preempted_ids
        recomputes += [c for c in out.prefill_chunks if sched.get(c.request_id).num_preemptions]
        _check_shared_tables(sched)
        sched.postprocess(out, {c.request_id: 7 for c in out.chunks if c.is_sampled})
    assert not sched.has_work() and preempted
    assert recomputes and all(c.start_position >= 8 for c in recomputes)    # the shared prefix found again
    assert sched.blocks.num_free == 9
