"""Linear: the oneDNN-packed GEMM (bf16 and float32) against F.linear, the fixed-row blocks of
batch-invariant mode giving each row the same result whatever rows share the call, and the int8
weight kernel (group scales) against F.linear over the dequantized weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from services.modelserver.torch_engine import ops
from services.modelserver.torch_engine.linear import (
    INT8_GROUP,
    Linear,
    dequantize_int8,
    packing_available,
    quantize_int8,
)


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


OPS: Any = ops.load()
needs_ops = pytest.mark.skipif(OPS is None, reason=f"C++ ops not built: {ops.status()}")


def test_int8_quantization_round_trips_within_half_a_step():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 96, generator=g)
    w[3, 32:64] = 0.0  # an all-zero group: scale 0, values 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40, 96 // INT8_GROUP)
    err = (dequantize_int8(q, scale) - w).abs().view(40, 3, INT8_GROUP)
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-7).all())
    assert scale[3, 1] == 0 and bool((q[3, 32:64] == 0).all())


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_int8_kernel_matches_dequantized_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(97, 128, generator=g).to(dtype)  # odd output count: the threads' split has a tail
    b = torch.randn(97, generator=g).to(dtype)
    x = torch.randn(rows, 128, generator=g).to(dtype)
    lin = Linear(w, b, int8_max_rows=16, ops=OPS)
    assert lin.int8_max_rows == 16
    want = F.linear(x.float(), dequantize_int8(lin.q, lin.scale), b.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lin(x).float(), want, atol=tol, rtol=tol)
    big = torch.randn(17, 128, generator=g).to(dtype)  # above int8_max_rows: the float GEMM
    torch.testing.assert_close(lin(big).float(), F.linear(big, w, b).float(), atol=tol * 10, rtol=tol * 10)


@needs_ops
def test_int8_kernel_row_does_not_depend_on_its_neighbours():
    g = torch.Generator().manual_seed(5)
    q, scale = quantize_int8(torch.randn(64, 64, generator=g))
    x = torch.randn(7, 64, generator=g)
    full = OPS.int8_linear(x, q, scale)
    for i in range(7):
        assert torch.equal(OPS.int8_linear(x[i:i + 1], q, scale)[0], full[i])


@needs_ops
def test_int8_kernel_refuses_bad_shapes_and_narrow_weights_stay_float():
    q, scale = quantize_int8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        OPS.int8_linear(torch.randn(1, 48), q[:, :48].contiguous(), scale[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="scale must be float32"):
        OPS.int8_linear(torch.randn(1, 64), q, scale[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="x's K"):
        OPS.int8_linear(torch.randn(1, 32), q, scale)
    assert Linear(torch.randn(8, 40), int8_max_rows=4, ops=OPS).int8_max_rows == 0  # 40 columns: no groups
