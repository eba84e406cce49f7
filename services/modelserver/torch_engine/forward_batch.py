"""Turn one step's scheduled work into the flat tensors the model consumes.

Single-token slices (decodes, or a 1-token prefill tail) go first, then multi-token prefill chunks.
Each slice is one "sequence" of the step's attention: its query rows, its block table and its
context length (cached tokens + this slice). The C++ kernel reads exactly that; the plain-torch
path derives its padded decode batch and per-chunk spans from it once per step (attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SeqSlice:
    """Tokens of one sequence to compute this step."""

    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]
    needs_logits: bool  # the slice ends at the sequence's last token, so we sample after it


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token is written to
    num_decode: int  # slices [0, num_decode) are single-token, at rows [0, num_decode)
    seq_starts: list[int]  # [S + 1] query rows of slice s are [seq_starts[s], seq_starts[s + 1])
    context_lens: list[int]  # [S] cached + this slice's tokens
    block_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0 (never read: lengths bound it)
    logits_rows: torch.Tensor = None  # type: ignore[assignment]  # [N] rows whose logits we need
    #: index into the input slices for each logits row, in logits order.
    logits_owner: list[int] = field(default_factory=list)
    seq_starts_t: torch.Tensor = None  # type: ignore[assignment]  # int32 copies for the kernel
    context_lens_t: torch.Tensor = None  # type: ignore[assignment]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(slices: list[SeqSlice], block_size: int) -> ForwardBatch:
    """Flatten slices (decodes first); every per-step tensor is built here once, not once per layer."""
    order = sorted(range(len(slices)), key=lambda i: len(slices[i].token_ids) != 1)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    owners: list[int] = []
    starts = [0]
    ctx_lens: list[int] = []
    tables: list[list[int]] = []
    for i in order:
        s = slices[i]
        n = len(s.token_ids)
        row = len(ids)
        ids.extend(s.token_ids)
        table = s.block_table
        for p in range(s.start_pos, s.start_pos + n):
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        ctx = s.start_pos + n
        starts.append(row + n)
        ctx_lens.append(ctx)
        tables.append(table[: -(-ctx // block_size)])
        if s.needs_logits:
            logits_rows.append(row + n - 1)
            owners.append(i)
    width = max((len(t) for t in tables), default=0)
    bt = torch.zeros((len(tables), max(width, 1)), dtype=torch.int32)
    for r, t in enumerate(tables):
        bt[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode=sum(1 for i in order if len(slices[i].token_ids) == 1),
        seq_starts=starts,
        context_lens=ctx_lens,
        block_tables=bt,
        logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        logits_owner=owners,
        seq_starts_t=torch.tensor(starts, dtype=torch.int32),
        context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32),
    )
