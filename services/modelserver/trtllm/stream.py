"""Turns TensorRT-LLM's cumulative streamed outputs into chunks a client can trust.

TensorRT-LLM streams each CompletionOutput with the *whole* text and token ids so far. It cuts a
stop string from the text only in the final output, and trims the stop word's token ids only
there too; it matches stop strings as token sequences, so a stop string the model spells with
other tokens is not seen at all. Relayed naively, earlier chunks carry part of the stop string and
the client's token ids (used to resume after a migration) disagree with `completion_tokens`.

So text and token ids are released together, only at token boundaries (the points where an output
arrived), and only up to where no stop string could still begin: the held-back tail is released
when the stream proves it harmless, or dropped when a stop string completes (matched here on the
text, whether or not TensorRT-LLM matched it). Every released text piece belongs to the token ids
released with it, so a resumed request continues exactly after what the client has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Release:
    """What may go to the client now."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def held_back(pending: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(pending)), best, -1):
            if pending.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stop: Sequence[str], start: int) -> int:
    """Where the earliest stop string begins in text[start:], or -1."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits, default=-1)


def chosen_logprob(entry: Any, token: int) -> float | None:
    """The sampled token's log-probability: versions give a float or {token_id: Logprob(logprob=...)}."""
    if isinstance(entry, Mapping):
        lp: Any = entry.get(token)
        return None if lp is None else float(getattr(lp, "logprob", lp))
    return None if entry is None else float(entry)


class OutputTracker:
    """One request's view: feed every streamed output, send what `update`/`finish` return."""

    def __init__(self, stop: Sequence[str] = (), logprobs: bool = False) -> None:
        self.stop = tuple(stop)
        self.want_logprobs = logprobs
        self.text = ""  # released text
        self.token_ids: list[int] = []  # released ids
        self.stopped = False  # a stop string ended the answer (here or in TensorRT-LLM)
        #: TensorRT-LLM took back tokens or text already released (cannot be retracted): counted
        #: and logged by the engine; the design expects it never to happen.
        self.inconsistencies = 0
        self._bounds: list[tuple[int, int]] = []  # unreleased (tokens, chars) output boundaries

    def update(self, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None = None) -> Release:
        """A non-final output: release what is certain, hold back a possible stop-string start."""
        if self.stopped:
            return Release()
        self._note(text, token_ids)
        cut = find_stop(text, self.stop, len(self.text)) if self.stop else -1
        if cut >= 0:
            self.stopped = True
            return self._release_to(cut, text, token_ids, logprobs, tokens_end_before=True)
        safe = len(text) - held_back(text[len(self.text):], self.stop)
        return self._release_to(safe, text, token_ids, logprobs)

    def finish(self, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None = None,
               *, stopped: bool = False) -> Release:
        """The final output (or the last one seen, when the request ends early): release the rest.
        A stop string still in the text is cut here; trimmed stop-word tokens are never sent."""
        if self.stopped:
            return Release()
        self.stopped = stopped
        if len(token_ids) < len(self.token_ids) or list(token_ids[:len(self.token_ids)]) != self.token_ids:
            self.inconsistencies += 1
            return Release()
        self._note(text, token_ids)
        cut = find_stop(text, self.stop, len(self.text)) if self.stop else -1
        if cut >= 0:
            self.stopped = True
            return self._release_to(cut, text, token_ids, logprobs, tokens_end_before=True)
        self._bounds = [(len(token_ids), len(text))]
        return self._release_to(len(text), text, token_ids, logprobs)

    # ---- internals ---------------------------------------------------------------------------
    def _note(self, text: str, token_ids: Sequence[int]) -> None:
        if not text.startswith(self.text):
            self.inconsistencies += 1  # earlier text rewritten: keep ours, continue after it
        # Stop-word trimming can shorten token_ids: boundaries past the end are gone.
        self._bounds = [(t, c) for t, c in self._bounds if t <= len(token_ids) and c <= len(text)]
        if len(token_ids) > len(self.token_ids) and (not self._bounds or self._bounds[-1][0] < len(token_ids)):
            self._bounds.append((len(token_ids), len(text)))

    def _release_to(self, limit: int, text: str, token_ids: Sequence[int], logprobs: Sequence[Any] | None,
                    tokens_end_before: bool = False) -> Release:
        """Release up to the last boundary at or before `limit` characters. With a stop string at
        `limit`, the text goes up to it and the tokens are those that end before it begins."""
        ok = [(t, c) for t, c in self._bounds if c <= limit and not text[:c].endswith("\ufffd")]
        if tokens_end_before:
            end_tok = ok[-1][0] if ok else len(self.token_ids)
            end_chr = max(limit, len(self.text))
        elif ok:
            end_tok, end_chr = ok[-1]
        else:
            return Release()
        new_ids = [int(t) for t in token_ids[len(self.token_ids):end_tok]]
        out = Release(text[len(self.text):end_chr], new_ids, self._logprobs(logprobs, new_ids))
        self.text += out.text
        self.token_ids.extend(new_ids)
        self._bounds = [(t, c) for t, c in self._bounds if t > end_tok]
        return out

    def _logprobs(self, entries: Sequence[Any] | None, new_ids: list[int]) -> list[float]:
        if not self.want_logprobs or not entries:
            return []
        start = len(self.token_ids)
        out = []
        for i, tok in enumerate(new_ids):
            lp = chosen_logprob(entries[start + i], tok) if start + i < len(entries) else None
            if lp is not None:
                out.append(lp)
        return out
