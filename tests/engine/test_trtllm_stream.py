"""OutputTracker, stats parsing and KV-event parsing: the pure parts of the TensorRT-LLM backend."""

from __future__ import annotations

import json
from types import SimpleNamespace

from services.modelserver.trtllm.kv_events import KvEventFeed, parse_events
from services.modelserver.trtllm.stats import StatsCache, parse_stats
from services.modelserver.trtllm.stream import OutputTracker, chosen_logprob, held_back


def feed(tracker: OutputTracker, steps: list[tuple[str, list[int]]], final: tuple[str, list[int]] | None = None,
         stopped: bool = False) -> list[tuple[str, list[int]]]:
    out = [tracker.update(text, ids) for text, ids in steps]
    if final is not None:
        out.append(tracker.finish(*final, stopped=stopped))
    return [(r.text, r.token_ids) for r in out]


def test_without_stop_strings_everything_goes_at_once():
    t = OutputTracker()
    assert feed(t, [("Hel", [1]), ("Hello", [1, 2])], ("Hello!", [1, 2, 3])) == \
        [("Hel", [1]), ("lo", [2]), ("!", [3])]


def test_stop_prefix_is_held_with_its_token_then_released():
    t = OutputTracker(stop=("END",))
    got = feed(t, [("a", [1]), ("a E", [1, 2]), ("a Ex", [1, 2, 3])], ("a Ex.", [1, 2, 3, 4]))
    assert got == [("a", [1]), ("", []), (" Ex", [2, 3]), (".", [4])]


def test_stop_matched_by_tensorrt_llm_final_trims_and_nothing_leaks():
    # TensorRT-LLM streamed " E" and "ND" uncut, then cut the text and trimmed both ids at the end.
    t = OutputTracker(stop=(" END",))
    got = feed(t, [("ok", [1]), ("ok E", [1, 2]), ("ok END", [1, 2, 3])], ("ok", [1]), stopped=True)
    assert "".join(x for x, _ in got) == "ok" and [i for _, ids in got for i in ids] == [1]
    assert t.stopped and t.inconsistencies == 0


def test_stop_seen_only_in_text_cuts_and_drops_the_tokens_that_carry_it():
    t = OutputTracker(stop=("the mat",))
    got = feed(t, [("sat", [1]), ("sat on", [1, 2]), ("sat on the", [1, 2, 3]), ("sat on the mat", [1, 2, 3, 4])])
    assert "".join(x for x, _ in got) == "sat on " and [i for _, ids in got for i in ids] == [1, 2]
    assert t.stopped and t.update("sat on the mat.", [1, 2, 3, 4, 5]).text == ""


def test_incomplete_utf8_waits_for_the_next_token():
    t = OutputTracker()
    assert feed(t, [("caf\ufffd", [1]), ("café", [1, 2])]) == [("", []), ("café", [1, 2])]


def test_taking_back_sent_tokens_is_counted_not_retracted():
    t = OutputTracker()
    feed(t, [("ab", [1, 2])])
    assert t.finish("a", [1]).text == "" and t.inconsistencies == 1


def test_logprobs_follow_released_tokens_in_both_shapes():
    t = OutputTracker(logprobs=True)
    r1 = t.update("a", [7], [{7: SimpleNamespace(logprob=-0.5)}])
    r2 = t.finish("ab", [7, 8], [{7: SimpleNamespace(logprob=-0.5)}, -1.5])
    assert r1.logprobs == [-0.5] and r2.logprobs == [-1.5]
    assert chosen_logprob({9: -1.0}, 8) is None


def test_held_back_is_the_longest_stop_prefix():
    assert held_back("abc E", ("END", "Ex")) == 1
    assert held_back("abc EN", ("END",)) == 2
    assert held_back("abc", ("END",)) == 0


def test_stats_parse_and_load():
    raw = json.dumps({"numActiveRequests": 3, "numQueuedRequests": 2, "kvCacheStats": {
        "maxNumBlocks": 100, "freeNumBlocks": 60, "usedNumBlocks": 40, "tokensPerBlock": 16,
        "reusedBlocks": 5, "missedBlocks": 15}})
    snap = parse_stats(raw, now=1.0)
    assert snap is not None and (snap.active, snap.queued, snap.kv_used, snap.kv_total) == (3, 2, 40, 100)
    assert snap.hit_rate == 0.25
    assert parse_stats("not json", 1.0) is None and parse_stats([1], 1.0) is None
    cache = StatsCache(max_running=8, stale_after_s=2.0)
    assert cache.load(inflight=0, tokens_per_second=0.0, now=0.0).unknown  # nothing yet: unknown, not idle
    cache.update(raw, now=1.0)
    fresh = cache.load(inflight=6, tokens_per_second=5.0, now=1.5)
    assert (fresh.running, fresh.queue_depth, fresh.kv_blocks_used, fresh.unknown) == (3, 3, 40, False)
    assert fresh.prefix_cache_hit_tokens_total == 80
    assert cache.load(inflight=2, tokens_per_second=0.0, now=9.0).unknown  # quiet while busy
    idle = cache.load(inflight=0, tokens_per_second=0.0, now=9.0)
    assert (idle.running, idle.queue_depth, idle.unknown, idle.kv_blocks_total) == (0, 0, False, 100)


def test_kv_events_parse_and_fan_out():
    stored = {"event_id": 4, "data": {"type": "stored", "parent_hash": None, "blocks": [
        {"block_hash": 11, "tokens": [{"token_id": 1}, {"token_id": 2}]}, {"block_hash": 12, "tokens": [3]}]}}
    removed = {"event_id": 5, "data": {"type": "removed", "block_hashes": [11, "x"]}}
    parsed = parse_events(json.dumps([stored, removed, {"data": {"type": "updated"}}, "junk"]))
    assert parsed == [("stored", (11, 12), None, ((1, 2), (3,))), ("removed", (11,), None, ())]
    assert parse_events({"data": {"type": "created"}}) == [("reset", (), None, ())]
    feed_ = KvEventFeed(queue_size=2)
    sub = feed_.subscribe()
    for _ in range(3):
        feed_.publish_raw(stored)
    q = next(iter(feed_._subscribers))  # noqa: SLF001 - inspect the bounded queue directly
    assert [e.kind for e in (q.get_nowait(),)] == ["reset"]  # overflow: backlog dropped, reader resets
    assert sub is not None
