"""A model's tokenizer as routers use it: from the files a model server hands out (GetTokenizer),
encoding a request exactly as the torch engine does (torch_engine/tokenizer.py), so a router
computes the same KV block keys as the engine that will serve it.

transformers is imported only when a tokenizer is built (routers that never see KV events never
load it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def files_digest(files: Mapping[str, bytes]) -> str:
    """The digest the model server publishes for these files (torch_engine/cache_link.py)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class PromptTokenizer:
    def __init__(self, tok: Any) -> None:
        self._tok = tok

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> PromptTokenizer:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                if os.path.basename(name) != name or name.startswith("."):
                    raise ValueError(f"tokenizer file name {name[:64]!r} is not a plain file name")
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            return cls(AutoTokenizer.from_pretrained(folder, local_files_only=True))

    def _chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> list[int]:
        text = self._tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str, messages: Sequence[Message]) -> list[int]:
        if prompt or not messages:
            return list(self._tok(prompt)["input_ids"])
        return self._chat([(m.role, m.content) for m in messages], True)

    def public_tokens(self, messages: Sequence[Message], ids: Sequence[int]) -> int:
        """Tokens of `ids` that belong to the leading system message(s) (share_system_prompt)."""
        system = []
        for m in messages:
            if m.role != "system":
                break
            system.append((m.role, m.content))
        if not system:
            return 0
        return common_prefix(self._chat(system, False), ids)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
