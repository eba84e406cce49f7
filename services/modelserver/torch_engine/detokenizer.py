"""Incremental detokenization with stop strings.

Text is released only when it is final: never half of a multi-byte UTF-8 character (decoders show
those as U+FFFD until the rest arrives) and never a tail that could still grow into a stop string.
A matched stop string ends generation and is not returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DecodeFn = Callable[[Sequence[int]], str]

# Prompt tokens decoded along with the output, so the first output token keeps its leading space
# under tokenizers that strip it at the start of a decode (SentencePiece).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, decode: DecodeFn, context_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self.text = ""  # decoded output so far (stop string excluded once matched)
        self._emitted = 0  # chars of self.text already returned
        self.stopped = False  # a stop string matched

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete character: wait for more bytes
        self.text += full[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release()

    def flush(self) -> str:
        """Generation ended for another reason: whatever was held back for stop strings is final."""
        out = self.text[self._emitted:]
        self._emitted = len(self.text)
        return out

    def _release(self) -> str:
        if self._stop:
            # A match cannot start before _emitted: that text was released because no suffix of it
            # could begin a stop string.
            cut = min((i for i in (self.text.find(s, max(0, self._emitted)) for s in self._stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.stopped = True
                self.text = self.text[:cut]
                return self.flush()
            end = len(self.text) - self._held_back()
        else:
            end = len(self.text)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of some stop string."""
        pending = self.text[self._emitted:]
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:k]):
                    best = k
                    break
        return best
