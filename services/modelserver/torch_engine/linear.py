"""Linear layers with weights pre-packed for oneDNN when running bf16 on CPU.

Plain F.linear in bf16 makes oneDNN reorder the weight into its blocked (AMX) layout on every
call; packing once at load makes decode GEMMs 2-3x faster. Falls back to F.linear where the
mkldnn ops are missing or disagree with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACK_BATCH_HINT = 64  # measured: packs that serve M=1..300 well


def _mkldnn_ok() -> bool:
    try:
        w = torch.randn(32, 16, dtype=torch.bfloat16)
        x = torch.randn(3, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_BATCH_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), F.linear(x, w).float(), atol=0.1, rtol=0.02))
    except (AttributeError, RuntimeError):
        return False


_MKLDNN: bool | None = None


def packing_available() -> bool:
    global _MKLDNN
    if _MKLDNN is None:
        _MKLDNN = torch.backends.mkldnn.is_available() and _mkldnn_ok()
    return _MKLDNN


class Linear:
    """y = x @ W^T (+ b), with W packed once when that helps."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.bias = bias
        self.packed = weight.dtype == torch.bfloat16 and packing_available()
        if self.packed:
            with torch.inference_mode():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        else:
            self.weight = weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
