"""Incremental detokenizer: UTF-8 safety and stop strings, with a byte-level toy vocabulary."""

from __future__ import annotations

from services.modelserver.torch_engine.detokenizer import IncrementalDetokenizer

# token id -> bytes, like a byte-level BPE where one character can span tokens
VOCAB = {1: b"Hel", 2: b"lo", 3: b" w", 4: b"orld", 5: b"caf", 6: b"\xc3", 7: b"\xa9", 8: b"!", 9: b" STOP", 10: b"ST"}


def decode(ids) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def feed(d: IncrementalDetokenizer, ids) -> list[str]:
    return [d.add(i) for i in ids]


def test_plain_stream_reassembles_text():
    d = IncrementalDetokenizer(decode)
    assert "".join(feed(d, [1, 2, 3, 4])) + d.flush() == "Hello world"


def test_multibyte_char_split_across_tokens_is_never_emitted_half():
    d = IncrementalDetokenizer(decode)
    parts = feed(d, [5, 6, 7, 8])
    assert parts == ["caf", "", "é", "!"]
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_prefix_is_held_back_then_released():
    d = IncrementalDetokenizer(decode, stop=("lo there",))
    parts = feed(d, [1, 2])  # "Hello": "lo" could start the stop string
    assert parts == ["He", "l"]  # "l" alone could already start it
    parts = feed(d, [3])  # "Hello w": can no longer match
    assert parts == ["lo w"] and not d.stopped
    assert d.add(4) == "orld"


def test_stop_string_ends_generation_and_is_not_returned():
    d = IncrementalDetokenizer(decode, stop=("STOP",))
    out = "".join(feed(d, [1, 2, 9, 8]))
    assert d.stopped and out == "Hello "
    assert "STOP" not in d.text


def test_stop_string_across_token_boundary():
    d = IncrementalDetokenizer(decode, stop=("STlo",))
    out = feed(d, [1, 10])  # "HelST": "ST" held
    assert out == ["Hel", ""]
    assert d.add(2) == "" and d.stopped and d.text == "Hel"


def test_flush_releases_held_text_when_generation_ends_otherwise():
    d = IncrementalDetokenizer(decode, stop=("lo there",))
    assert "".join(feed(d, [1, 2])) == "Hel"
    assert d.flush() == "lo"
