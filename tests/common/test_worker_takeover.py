"""A decode worker taking up entries pending with it (after a Redis outage, or a dead peer's), with the
real model and a real redis-server: a request whose blocks hold its KV resumes in place from its
recorded tokens; one whose blocks are gone (a preemption had freed them, its re-queue in doubt) goes
back to prefill with its tokens, as does one whose KV was in an arena memory that is gone (a new
arena: Handoff.kv_memory); and `reconnect.resync` lets go and takes the same up again.

Loads the model in this process: run it under the stack lock (docs: helper rules)."""
from __future__ import annotations

import pytest
import redis

from services.common.contracts import Handoff, QueuedRequest, from_json
from services.common.redis_blocks import RedisBlockAllocator
from services.common.redis_queues import enqueue, read_group, read_own_pending
from services.common.stream_entries import FIELD
from services.engine.kv_cache import KVCacheSpec, allocate_kv_pool
from services.engine.llm_engine import DTYPES
from services.engine.loader import load_engine_weights
from services.engine.model import LlamaModel
from services.engine.model_config import ModelConfig
from services.engine.runner import ModelRunner
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, SchedulerMode
from services.worker import reconnect
from services.worker.config import Phase, WorkerConfig
from services.worker.control import ShareState, WorkerControl
from services.worker.loop import DECODE_GROUP, Worker
from services.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.slow
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def engine_parts(default_model_dir):
    model_config = ModelConfig.from_dir(default_model_dir)
    spec = KVCacheSpec.for_model(model_config, 16, DTYPES["float32"], NUM_BLOCKS, 0)
    weights = load_engine_weights(default_model_dir, model_config, DTYPES["float32"])
    model = LlamaModel(model_config, weights, pack_weights=False)
    return model_config, ModelRunner(model, allocate_kv_pool(spec), 16)


def _decode_worker(redis_server, keys, engine_parts, default_model_dir) -> Worker:
    model_config, runner = engine_parts
    config = WorkerConfig(Phase.DECODE, redis_server.url, keys.prefix, 0, 0, default_model_dir / "arena.sock",
                          None, default_model_dir.parent, worker_id="decode-test")
    client = redis.Redis.from_url(redis_server.url)
    blocks = RedisBlockAllocator(client, keys)
    blocks.init_pool(NUM_BLOCKS, 16)
    scheduler = Scheduler(SchedulerConfig(mode=SchedulerMode.DECODE, block_size=16, max_num_seqs=8,
                                          max_num_batched_tokens=256, chunk_size=256,
                                          max_model_len=model_config.max_position,
                                          eos_token_ids=model_config.eos_token_ids), blocks)
    control = WorkerControl(ShareState(1.0, (0,), 0))
    return Worker(config, scheduler, runner, Sampler(), client, control, WorkerMetrics("decode", "m"),
                  stack_cpus=(0,))


def _handoff(request_id: str, prompt_len: int, block_ids: list[int], kv_memory: str = "") -> Handoff:
    return Handoff(request_id, tuple(block_ids), tuple(range(100, 100 + prompt_len)), (5,), prompt_len,
                   SamplingParams(max_tokens=16, temperature=0.0), "t:reply", 1.0, 2.0, kv_memory=kv_memory)


def test_decode_takes_up_what_it_can_resume_and_sends_the_rest_back_to_prefill(redis_server, keys, engine_parts,
                                                                               default_model_dir):
    worker = _decode_worker(redis_server, keys, engine_parts, default_model_dir)
    client, blocks = worker.client, worker.scheduler.blocks
    try:
        kept = blocks.allocate("kept", 2)                       # 20 prompt tokens + 2 decoded: 2 blocks hold them
        blocks.allocate("lost", 3)
        blocks.free("lost")                                     # freed by a preemption whose re-queue was lost
        for request_id, prompt_len, block_ids in (("kept", 20, kept), ("lost", 40, [])):
            enqueue(client, keys.decode_admit, _handoff(request_id, prompt_len, block_ids))
        client.rpush(keys.decode_progress("kept"), 6, 7)
        client.rpush(keys.decode_progress("lost"), 6)
        assert len(read_group(client, keys.decode_admit, DECODE_GROUP, "decode-test", Handoff, count=10)) == 2

        worker.take_over(read_own_pending(client, keys.decode_admit, DECODE_GROUP, "decode-test", Handoff))
        assert set(worker.tracked) == {"kept"}
        seq = worker.tracked["kept"].seq
        assert (seq.output_token_ids, seq.num_computed_tokens, seq.block_ids) == ([5, 6, 7], 22, kept)
        (_, fields), = client.xrange(keys.prefill_queue)
        requeued = from_json(QueuedRequest, fields[FIELD.encode()])
        assert (requeued.request_id, requeued.output_token_ids, len(requeued.prompt_token_ids)) == ("lost", (5, 6), 40)
        assert [p["message_id"] for p in client.xpending_range(keys.decode_admit, DECODE_GROUP, "-", "+", 10)] \
            == [worker.tracked["kept"].entry_id.encode()]      # the lost one's entry released with its re-queue
        assert not client.exists(keys.decode_progress("lost"))

        reconnect.resync(worker, redis.ConnectionError("test"))   # Redis is up: let go, take up again at once
        assert set(worker.tracked) == {"kept"} and worker.tracked["kept"].seq.output_token_ids == [5, 6, 7]
        assert blocks.audit().is_consistent and blocks.num_free == NUM_BLOCKS - 2
    finally:
        worker.publisher.close()
        worker.inputs.close()
        worker.client.close()


def test_hand_offs_whose_kv_was_in_other_memory_go_back_to_prefill(redis_server, keys, engine_parts,
                                                                  default_model_dir):
    """The arena restarted with new memory: decode (restarted on it) resumes only the hand-offs made on
    it; those made on the old memory, taken over or read new, are recomputed, their blocks freed."""
    worker = _decode_worker(redis_server, keys, engine_parts, default_model_dir)
    worker.kv_memory = "new"
    client, blocks = worker.client, worker.scheduler.blocks
    try:
        ids = {name: blocks.allocate(name, 2) for name in ("here", "gone", "older", "unread")}
        for name, memory in (("here", "new"), ("gone", "old"), ("older", "")):
            enqueue(client, keys.decode_admit, _handoff(name, 20, ids[name], memory))
        client.rpush(keys.decode_progress("gone"), 6, 7)
        read_group(client, keys.decode_admit, DECODE_GROUP, "decode-test", Handoff, count=10)
        worker.take_over(read_own_pending(client, keys.decode_admit, DECODE_GROUP, "decode-test", Handoff))
        assert set(worker.tracked) == {"here", "older"}          # "" (an older prefill): trusted, as before
        enqueue(client, keys.decode_admit, _handoff("unread", 20, ids["unread"], "old"))   # never read before
        worker._admit(read_group(client, keys.decode_admit, DECODE_GROUP, "decode-test", Handoff, count=10))
        assert set(worker.tracked) == {"here", "older"}
        requeued = {q.request_id: q for q in (from_json(QueuedRequest, f[FIELD.encode()])
                                              for _, f in client.xrange(keys.prefill_queue))}
        assert set(requeued) == {"gone", "unread"}
        assert requeued["gone"].output_token_ids == (5, 6, 7) and requeued["unread"].output_token_ids == (5,)
        assert blocks.owned("gone") == blocks.owned("unread") == []       # freed: they hold nothing of theirs
        assert not client.exists(keys.decode_progress("gone"))
        assert blocks.audit().is_consistent and blocks.num_free == NUM_BLOCKS - 4
    finally:
        worker.publisher.close()
        worker.inputs.close()
        worker.client.close()
