"""Linear layers on MKL's packed fp32 GEMM, for generating on a CPU.

A decode step multiplies a few rows (one per sequence in the batch) by every weight matrix. MKL's plain sgemm
is slow at such skinny shapes; with the weight packed once into MKL's internal layout (`mkl_sgemm_pack`, the
path torch.compile's CPU freezing pass takes for fp32 linears) the same product ran 1.3–1.8× faster on this
2-core AMD EPYC at 2–64 rows, and greedy generation of SmolLM2-135M (64 tokens, identical answers) 1.29× / 1.12×
faster at batch 16 / 32 on one thread, 1.49× / 1.27× on two (`bench/engine_options.py`). At more rows
(prefill, scoring) packing gains nothing or loses, so those calls keep the plain path; so does one row on one
thread, where MKL's plain gemv was 5% faster (on two threads the packed one was 15% faster), and so do several
threads on a CPU other than AMD's (`PACK_ON_SEVERAL_THREADS`: slower there). The weights are shared, not copied;
only the packed copy is extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ksg_ray.common.hardware import amd_cpu

__all__ = ["MAX_PACKED_ROWS", "PACK_ON_SEVERAL_THREADS", "PackedLinear", "pack_linears", "packed_gemm_available"]

MAX_PACKED_ROWS = 64  # above it the plain sgemm is as fast (prefill, scoring): measured on this CPU


# Greedy generation, packed ÷ plain, side by side (`bench/engine_options.py`, batch 16 / 32): on an AMD EPYC (MKL on
# its Intel path) 1.29 / 1.12x on one thread and 1.49 / 1.27x on two; on an Intel Xeon without AMX (family 6 model
# 207) 1.15x on one thread at batch 16 but 0.83 / 0.90x and 0.79x on two (three runs), though there too the linear
# layers alone ran 1.3x faster packed on two threads: what is lost is in the interplay with the rest of a decode
# step, not understood. Measured on those two CPUs only, so several threads pack on AMD alone, one thread everywhere.
PACK_ON_SEVERAL_THREADS = amd_cpu()


def packed_gemm_available() -> bool:
    """Whether this torch has MKL and its packed-GEMM ops (CPU builds with MKL do; others fall back)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedLinear(nn.Module):
    """An `nn.Linear` (same `weight` and `bias` parameters) that multiplies few rows by a packed weight."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_PACKED_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_rows = max_rows
        with torch.no_grad():
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), max_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        threads = torch.get_num_threads()
        if (n > self.max_rows or torch.is_grad_enabled() or (n == 1 and threads == 1)
                or (threads > 1 and not PACK_ON_SEVERAL_THREADS)):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkl._mkl_linear(rows, self._packed, self.weight, self.bias, n)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed up to {self.max_rows} rows"


def pack_linears(model: nn.Module, max_rows: int = MAX_PACKED_ROWS) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear`, in place; returns how many.

    Call it after the model has its final weights and device (after merging adapters, after `.to()`): the
    packed copy is not a parameter and does not follow later changes.
    """
    if not packed_gemm_available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.device.type == "cpu" and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child, max_rows))
                count += 1
    return count
