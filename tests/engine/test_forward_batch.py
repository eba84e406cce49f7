"""Batch building: decodes first, slot mapping through block tables, per-slice rows and context lengths."""

from __future__ import annotations

import torch

from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch


def test_layout_slots_and_lengths():
    prefill = SeqSlice(token_ids=[5, 6, 7], start_pos=4, block_table=[9, 2], needs_logits=True)
    decode = SeqSlice(token_ids=[8], start_pos=5, block_table=[3, 1], needs_logits=True)
    partial = SeqSlice(token_ids=[1, 2], start_pos=0, block_table=[4], needs_logits=False)
    b = build_forward_batch([prefill, decode, partial], block_size=4)
    assert b.num_decode == 1
    assert b.input_ids.tolist() == [8, 5, 6, 7, 1, 2]
    assert b.positions.tolist() == [5, 4, 5, 6, 0, 1]
    # position p lives in block_table[p // 4] at offset p % 4
    assert b.slot_mapping.tolist() == [1 * 4 + 1, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 16, 17]
    assert b.seq_starts == [0, 1, 4, 6] and b.context_lens == [6, 7, 2]
    assert b.seq_starts_t.dtype == torch.int32 and b.context_lens_t.tolist() == [6, 7, 2]
    # each slice's table is cut to the pages its context uses, then padded with 0
    assert b.block_tables.tolist() == [[3, 1], [9, 2], [4, 0]]
    # logits only where a sequence's last token was computed, mapped back to input order
    assert b.logits_rows.tolist() == [0, 3] and b.logits_owner == [1, 0]
