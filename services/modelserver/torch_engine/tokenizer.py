"""Tokenizer and chat template of the served model, from a GGUF file or a Hugging Face folder.

transformers rebuilds a fast tokenizer (vocab, merges, chat template) from GGUF metadata offline.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from .weights import CheckpointError

#: transformers' first import is not thread-safe: a second thread importing it meanwhile gets
#: "cannot import name 'AutoTokenizer'". Loads run in threads, and a cancelled load's thread
#: goes on importing while the next load starts: that is how both servers of a mesh halted.
_IMPORT_LOCK = threading.Lock()


def auto_tokenizer() -> Any:
    """transformers.AutoTokenizer, imported by one thread at a time."""
    with _IMPORT_LOCK:
        from transformers import AutoTokenizer
    return AutoTokenizer


class Tokenizer:
    def __init__(self, path: str) -> None:
        """`path` is a .gguf file or a folder with tokenizer files; nothing is fetched from the hub."""
        AutoTokenizer = auto_tokenizer()

        try:
            if os.path.isdir(path):
                self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            else:
                folder, name = os.path.split(os.path.abspath(path))
                self._tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load a tokenizer from {path}: {e}") from e
        eos = set()
        if self._tok.eos_token_id is not None:
            eos.add(int(self._tok.eos_token_id))
        gen_cfg = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
        if gen_cfg and os.path.isfile(gen_cfg):
            import json

            with open(gen_cfg, encoding="utf-8") as f:
                ids = json.load(f).get("eos_token_id")
            eos.update([ids] if isinstance(ids, int) else (ids or []))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Plain prompt: the tokenizer's own special-token policy (BOS where the model expects it)."""
        return list(self._tok(text)["input_ids"])

    def encode_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template with the assistant turn opened, then tokenize the rendered text
        as-is (the template already placed every special token)."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a plain prompt")
        text = self._tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False,
            add_generation_prompt=add_generation_prompt)
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def save(self, folder: str) -> None:
        """Write tokenizer files in Hugging Face format (tests export GGUF models to folders)."""
        self._tok.save_pretrained(folder)
