"""Batch building: decodes first, slot mapping through block tables, causal masks with offsets."""

from __future__ import annotations

import torch

from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch


def test_layout_slots_and_masks():
    prefill = SeqSlice(token_ids=[5, 6, 7], start_pos=4, block_table=[9, 2], needs_logits=True)
    decode = SeqSlice(token_ids=[8], start_pos=5, block_table=[3, 1], needs_logits=True)
    partial = SeqSlice(token_ids=[1, 2], start_pos=0, block_table=[4], needs_logits=False)
    b = build_forward_batch([prefill, decode, partial], block_size=4)
    assert b.num_decode == 1
    assert b.input_ids.tolist() == [8, 5, 6, 7, 1, 2]
    assert b.positions.tolist() == [5, 4, 5, 6, 0, 1]
    # position p lives in block_table[p // 4] at offset p % 4
    assert b.slot_mapping.tolist() == [1 * 4 + 1, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 16, 17]
    assert b.decode_block_tables.tolist() == [[3, 1]]
    assert b.decode_mask.view(-1).tolist() == [True] * 6 + [False] * 2
    span = b.prefills[0]
    assert (span.start_row, span.num_tokens, span.context_len) == (1, 3, 7)
    want = torch.tensor([[j <= 4 + i for j in range(7)] for i in range(3)])
    assert torch.equal(span.mask, want)
    # logits only where a sequence's last token was computed, mapped back to input order
    assert b.logits_rows.tolist() == [0, 3] and b.logits_owner == [1, 0]
