"""Linear layers with weights pre-packed for oneDNN on CPU (bf16 and float32).

Plain F.linear in bf16 makes oneDNN reorder the weight into its blocked (AMX) layout on every
call; packing once at load makes decode GEMMs 2-3x faster. In float32 (CPUs without native bf16)
the packed oneDNN GEMM beats MKL's sgemm behind F.linear by 1.2-1.5x on the decode shapes and
2.2x on the vocabulary projection (AVX2 EPYC, 16 rows). Falls back to F.linear where the mkldnn
ops are missing or disagree with it.

A step of very few tokens (one sequence decoding) is bound by reading the weights, not by FLOPs,
so it can use a second, weight-only int8 copy that reads a quarter of float32's bytes (half of
bf16's): the C++ `int8_linear` kernel, with a scale per output row and group of 32 input columns
(llama.cpp's Q8_0 granularity; on SmolLM2 per-row scales measured mean |logit error| 0.26, max 2.1,
these 0.21, max 1.4, bench/engine/accuracy.py). Bigger steps keep the
float GEMM, which is faster there because the int8 kernel's cost grows with the rows.

In batch-invariant mode (`fixed_rows` > 0) every GEMM runs on blocks of exactly that many rows, the
last one zero-padded: a GEMM library picks its kernel (and so its reduction order) by shape, so a
row's result then depends only on its own input, never on how many rows shared the step.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

_PACK_BATCH_HINT = 64  # measured: packs that serve M=1..300 well


_PACKABLE = (torch.bfloat16, torch.float32)


def _mkldnn_ok(dtype: torch.dtype) -> bool:
    try:
        w = torch.randn(32, 16, dtype=dtype)
        x = torch.randn(3, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT)  # noqa: SLF001 - no public op
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: SLF001
        return bool(torch.allclose(got.float(), F.linear(x, w).float(), atol=0.1, rtol=0.02))
    except (AttributeError, RuntimeError):
        return False


_MKLDNN: dict[torch.dtype, bool] = {}


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    if dtype not in _PACKABLE:
        return False
    if dtype not in _MKLDNN:
        _MKLDNN[dtype] = torch.backends.mkldnn.is_available() and _mkldnn_ok(dtype)
    return _MKLDNN[dtype]


#: input columns per int8 scale (the C++ kernel's group)
INT8_GROUP = 32


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row and group of INT8_GROUP columns: weight ~= q * scale[:, k // 32]."""
    n, k = weight.shape
    w = weight.float().view(n, k // INT8_GROUP, INT8_GROUP)
    scale = w.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.view(n, k).contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.float().view(n, k // INT8_GROUP, INT8_GROUP) * scale.unsqueeze(-1)).view(n, k)


class Linear:
    """y = x @ W^T (+ b), with W packed once when that helps.

    `int8_max_rows` > 0: inputs of at most that many rows use the int8 copy through `ops.int8_linear`
    (the C++ kernels; a weight whose input width is not a multiple of INT8_GROUP stays float).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, int8_max_rows: int = 0,
                 fixed_rows: int = 0, ops: ModuleType | None = None) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.fixed_rows = fixed_rows
        self.int8_max_rows = 0
        self.ops = ops
        if int8_max_rows > 0 and ops is not None and weight.shape[1] % INT8_GROUP == 0:
            with torch.inference_mode():
                self.q, self.scale = quantize_int8(weight)
            self.int8_max_rows = int8_max_rows
        self.packed = packing_available(weight.dtype)
        if self.packed:
            with torch.inference_mode():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(  # noqa: SLF001 - no public op
                    weight.contiguous(), _PACK_BATCH_HINT)
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.fixed_rows
        if m and x.shape[0]:
            rows = x.shape[0]
            if rows % m:
                x = torch.cat([x, x.new_zeros((m - rows % m, x.shape[1]))])
            return torch.cat([self._gemm(x[i:i + m]) for i in range(0, x.shape[0], m)])[:rows]
        return self._gemm(x)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        if 0 < x.shape[0] <= self.int8_max_rows and self.ops is not None:
            return self.ops.int8_linear(x.contiguous(), self.q, self.scale, self.bias)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # noqa: SLF001
        return F.linear(x, self.weight, self.bias)
