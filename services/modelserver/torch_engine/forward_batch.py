"""Turn one step's scheduled work into the flat tensors the model consumes.

Single-token slices (decodes, or a 1-token prefill tail) go first so the model attends to all of
them in one padded batched call; multi-token prefill chunks follow and are attended per sequence.
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
class PrefillSpan:
    start_row: int
    num_tokens: int
    context_len: int  # cached + this chunk
    block_ids: torch.Tensor  # [ceil(context_len / block_size)]
    mask: torch.Tensor  # [num_tokens, context_len] bool, True = may attend


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] flat KV slot each new token is written to
    num_decode: int  # rows [0, num_decode) are single-token slices
    decode_block_tables: torch.Tensor  # [D, max_blocks], padded with block 0 (masked out)
    decode_mask: torch.Tensor  # [D, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSpan] = field(default_factory=list)
    #: [S] rows whose logits we need (the builder always sets it).
    logits_rows: torch.Tensor = None  # type: ignore[assignment]  # set by build_forward_batch
    #: index into the input slices for each logits row, in logits order.
    logits_owner: list[int] = field(default_factory=list)


def build_forward_batch(slices: list[SeqSlice], block_size: int) -> ForwardBatch:
    """Flatten slices (decodes first) and precompute masks once per step, not once per layer."""
    order = sorted(range(len(slices)), key=lambda i: len(slices[i].token_ids) != 1)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    owners: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillSpan] = []
    for i in order:
        s = slices[i]
        n = len(s.token_ids)
        row = len(ids)
        ids.extend(s.token_ids)
        for p in range(s.start_pos, s.start_pos + n):
            pos.append(p)
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
        ctx = s.start_pos + n
        if n == 1:
            decode_tables.append(s.block_table[: -(-ctx // block_size)])
            decode_lens.append(ctx)
        else:
            q_pos = torch.arange(s.start_pos, ctx).unsqueeze(1)
            prefills.append(PrefillSpan(
                start_row=row, num_tokens=n, context_len=ctx,
                block_ids=torch.tensor(s.block_table[: -(-ctx // block_size)], dtype=torch.long),
                mask=torch.arange(ctx).unsqueeze(0) <= q_pos,
            ))
        if s.needs_logits:
            logits_rows.append(row + n - 1)
            owners.append(i)
    d = len(decode_tables)
    width = max((len(t) for t in decode_tables), default=0)
    tables = torch.zeros((d, width), dtype=torch.long)
    for r, t in enumerate(decode_tables):
        tables[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    lens = torch.tensor(decode_lens, dtype=torch.long)
    mask = (torch.arange(width * block_size).unsqueeze(0) < lens.unsqueeze(1)).view(d, 1, 1, width * block_size)
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode=d,
        decode_block_tables=tables,
        decode_mask=mask,
        prefills=prefills,
        logits_rows=torch.tensor(logits_rows, dtype=torch.long),
        logits_owner=owners,
    )
