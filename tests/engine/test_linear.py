"""Linear: the oneDNN-packed GEMM (bf16 and float32) against F.linear, and the fixed-row blocks of
batch-invariant mode giving each row the same result whatever rows share the call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.modelserver.torch_engine.linear import Linear, packing_available


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 16, 64])
def test_packed_matches_f_linear(dtype, rows):
    if not packing_available(dtype):
        pytest.skip(f"oneDNN packing unavailable for {dtype} in this torch build")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    lin = Linear(w, b)
    assert lin.packed
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(lin(x).float(), F.linear(x, w, b).float(), atol=tol, rtol=tol)


def test_float32_is_packed_where_onednn_can():
    # float32 is what CPUs without native bf16 run; its GEMMs must take the packed path there too
    assert packing_available(torch.float32) == (torch.backends.mkldnn.is_available()
                                                and Linear(torch.randn(8, 8)).packed)


def test_fixed_rows_make_a_row_independent_of_its_neighbours():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    lin = Linear(w, fixed_rows=4)
    x = torch.randn(11, 32, generator=g)
    alone = lin(x[5:6])
    assert torch.equal(lin(x)[5:6], alone)  # same bits, though 10 other rows shared the call
    assert lin(x).shape == (11, 48)
