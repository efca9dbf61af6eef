"""The worker's pipeline publisher against a real redis-server: order kept, flush waits, a failed
send surfaces on the caller's thread, and close sends what was queued."""
from __future__ import annotations

import pytest
import redis

from services.common import redis_retry
from services.worker.publisher import PipelinePublisher


def test_pipelines_go_out_in_order_and_flush_waits(redis_client, keys):
    replies: list[list] = []
    publisher = PipelinePublisher(replies.append, depth=2)
    stream = f"{keys.prefix}:s"
    for i in range(50):
        publisher.submit(redis_client.pipeline(transaction=False).xadd(stream, {"i": i}).llen(f"{keys.prefix}:l"))
    publisher.flush()
    assert [int(e[1][b"i"]) for e in redis_client.xrange(stream)] == list(range(50))
    assert len(replies) == 50 and all(r[-1] == 0 for r in replies)
    publisher.close()


def test_a_failed_send_is_raised_by_the_next_call(redis_client, keys):
    publisher = PipelinePublisher(lambda replies: None)
    publisher.submit(redis_client.pipeline(transaction=False).set(f"{keys.prefix}:k", 1).lpush(f"{keys.prefix}:k", 2))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publisher.flush()
    publisher.submit(redis_client.pipeline(transaction=False).set(f"{keys.prefix}:ok", 1))   # it goes on after
    publisher.close()
    assert redis_client.get(f"{keys.prefix}:ok") == b"1"


def test_close_sends_what_is_queued(redis_client, keys):
    publisher = PipelinePublisher(lambda replies: None, depth=8)
    for i in range(8):
        publisher.submit(redis_client.pipeline(transaction=False).rpush(f"{keys.prefix}:l", i))
    publisher.close()
    assert redis_client.llen(f"{keys.prefix}:l") == 8



def test_without_a_thread_submit_sends_at_once(redis_client, keys):
    replies: list[list] = []
    publisher = PipelinePublisher(replies.append, threaded=False)
    publisher.submit(redis_client.pipeline(transaction=False).rpush(f"{keys.prefix}:l", 1))
    assert replies == [[1]] and redis_client.llen(f"{keys.prefix}:l") == 1
    publisher.flush()
    publisher.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_a_pipeline_that_keeps_its_reply_is_waited_for(redis_client, keys, threaded):
    published: list[list] = []
    publisher = PipelinePublisher(published.append, threaded=threaded)
    publisher.submit(redis_client.pipeline(transaction=False).rpush(f"{keys.prefix}:l", 1))
    kept = publisher.submit(redis_client.pipeline(transaction=False).rpush(f"{keys.prefix}:l", 2)
                            .lpush(f"{keys.prefix}:s", 1).incr(f"{keys.prefix}:l"), keep_reply=True)
    replies = publisher.wait_for(kept)
    assert replies[:2] == [2, 1] and isinstance(replies[2], redis.ResponseError)   # errors as values
    assert published == [[1]]                       # in order; the kept reply went to the caller only
    publisher.submit(redis_client.pipeline(transaction=False).rpush(f"{keys.prefix}:l", 3))
    publisher.close()
    assert published == [[1], [3]]


def test_waiting_for_a_pipeline_after_a_failed_send_raises(redis_client, keys):
    publisher = PipelinePublisher(lambda replies: None)
    publisher.submit(redis_client.pipeline(transaction=False).set(f"{keys.prefix}:k", 1).lpush(f"{keys.prefix}:k", 2))
    kept = publisher.submit(redis_client.pipeline(transaction=False).get(f"{keys.prefix}:k"), keep_reply=True)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        publisher.wait_for(kept)
    publisher.close()


def test_after_a_lost_connection_nothing_more_is_sent_until_abandon(redis_client, keys):
    """A pipeline that failed for want of Redis may or may not have landed: the ones behind it are
    never sent, every call raises until the loop abandons them, then it goes on."""
    gone = redis_retry.client("redis://127.0.0.1:1/0")      # nothing listens there
    publisher = PipelinePublisher(lambda replies: None, depth=8)
    publisher.submit(gone.pipeline(transaction=True).set(f"{keys.prefix}:x", 1))
    publisher.submit(redis_client.pipeline(transaction=True).rpush(f"{keys.prefix}:l", 1))
    with pytest.raises(redis.ConnectionError):
        publisher.flush()
    with pytest.raises(redis.ConnectionError):
        publisher.submit(redis_client.pipeline(transaction=True).rpush(f"{keys.prefix}:l", 2))
    publisher.abandon()
    publisher.submit(redis_client.pipeline(transaction=True).rpush(f"{keys.prefix}:l", 3))
    publisher.close()
    assert redis_client.lrange(f"{keys.prefix}:l", 0, -1) == [b"3"]
