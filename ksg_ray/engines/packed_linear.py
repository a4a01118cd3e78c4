"""Linear layers with a packed weight, for the few-row products of generating on a CPU.

A decode step multiplies a few rows (one per sequence in the batch) by every weight matrix: it is bound by reading
the weights, and plain sgemm is slow at such skinny shapes. Two packed kernels, the weight packed once:

- `mkl`: MKL's packed fp32 GEMM (`mkl_sgemm_pack`, the path torch.compile's CPU freezing pass takes for fp32
  linears); the same numbers as `nn.Linear`. On a 2-core AMD EPYC the product ran 1.3-1.8x faster at 2-64 rows and
  greedy generation of SmolLM2-135M (64 tokens, identical answers) 1.29x / 1.12x faster at batch 16 / 32 on one
  thread, 1.49x / 1.27x on two. On an Intel Xeon without AMX it lost on two threads (below), so there several
  threads keep the plain path (`PACK_ON_SEVERAL_THREADS`).
- `fp16`: fbgemm's fp16-weight GEMM (`quantized.linear_dynamic_fp16`): the weight stored in fp16 (half the bytes
  to read), the activations and the sums in fp32, so the result is exactly `nn.Linear` with fp16-rounded weights.
  On the Intel Xeon (family 6 model 207), greedy generation ran 1.17 / 1.14 / 1.06x plain at batch 1 / 16 / 32 on
  one thread and 1.09 / 1.09 / 1.05x on two (`bench/engine_options.py --kernel fp16`), where `mkl` lost on two; 62
  of 64 greedy 64-token answers were identical, and the answer NLL of 48 medical dev
  records moved 3.7318 -> 3.7319 with every linear layer in fp16: a rounding, not a loss (int8 weights cost 3.73
  -> 4.75 and looped: not offered).

At more rows (prefill, scoring) both kernels take the plain path, and the fp16 one takes it for anything but a
decode step (one position per sequence), so prompts and scores stay exact fp32; with autograd on, so does
training. `DEFAULT_KERNEL` is `mkl` on the AMD EPYC where it was measured to win (family 26) and `fp16` elsewhere.
The weights are shared, not copied; only the packed copy is extra memory.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from ksg_ray.common.hardware import amd_cpu, cpu_family

__all__ = ["DEFAULT_KERNEL", "KERNELS", "MAX_PACKED_ROWS", "PACK_ON_SEVERAL_THREADS", "PackedLinear",
           "kernel_available", "pack_linears", "packed_gemm_available"]

MAX_PACKED_ROWS = 64  # above it the plain sgemm is as fast (prefill, scoring): measured on this CPU
KERNELS = ("mkl", "fp16")
# `mkl` where it was measured to win: the family-26 AMD EPYC (below). On a family-25 one (Zen 3, AVX2 only) it lost
# on two threads, 0.96 / 0.93 / 0.87x plain at batch 16 / 32 / 64, where fp16 ran 1.09 / 1.00 / 0.99x; on one thread
# at batch 8 / 16 mkl 1.23 / 1.19x, fp16 1.25 / 1.14x (`bench/engine_options.py`). fp16 lost nowhere beyond noise.
DEFAULT_KERNEL = "mkl" if amd_cpu() and cpu_family() == 26 else "fp16"

# Greedy generation, mkl-packed ÷ plain, side by side (`bench/engine_options.py`, batch 16 / 32): on the family-26
# AMD EPYC (MKL on its Intel path) 1.29 / 1.12x on one thread and 1.49 / 1.27x on two; on an Intel Xeon without AMX
# (family 6 model 207) 1.15x on one thread at batch 16 but 0.83 / 0.90x and 0.79x on two (three runs), though there
# too the linear layers alone ran 1.3x faster packed on two threads: what is lost is in the interplay with the rest
# of a decode step, not understood. Several threads pack on AMD alone (the family-25 EPYC above lost there too,
# but `auto` does not take mkl there).
PACK_ON_SEVERAL_THREADS = amd_cpu()


def packed_gemm_available() -> bool:
    """Whether this torch has MKL and its packed-GEMM ops (CPU builds with MKL do; others fall back)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def kernel_available(kernel: str) -> bool:
    """Whether this torch can run `kernel` ("mkl": MKL's packed sgemm; "fp16": fbgemm's fp16-weight GEMM)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown packed-linear kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "mkl":
        return packed_gemm_available()
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                              "linear_prepack_fp16")


class PackedLinear(nn.Module):
    """An `nn.Linear` (same `weight` and `bias` parameters) that multiplies few rows by a packed weight."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_PACKED_ROWS, kernel: str = DEFAULT_KERNEL) -> None:
        super().__init__()
        if not kernel_available(kernel):
            raise RuntimeError(f"this torch ({torch.__version__}) cannot run the {kernel!r} packed-linear kernel")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_rows, self.kernel = max_rows, kernel
        with torch.no_grad():
            if kernel == "fp16":
                bias = None if self.bias is None else self.bias.detach()
                self._packed = torch.ops.quantized.linear_prepack_fp16(self.weight.detach(), bias)
            else:
                self._packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), max_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        if n > self.max_rows or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if self.kernel == "fp16":
            if x.dim() != 3 or x.shape[1] != 1:  # not a decode step (batch, 1 position, features): exact fp32
                return F.linear(x, self.weight, self.bias)
            out = torch.ops.quantized.linear_dynamic_fp16(rows, self._packed)
        else:
            threads = torch.get_num_threads()
            if (n == 1 and threads == 1) or (threads > 1 and not PACK_ON_SEVERAL_THREADS):
                return F.linear(x, self.weight, self.bias)
            out = torch.ops.mkl._mkl_linear(rows, self._packed, self.weight, self.bias, n)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kernel} kernel up to "
                f"{self.max_rows} rows")


def pack_linears(model: nn.Module, max_rows: int = MAX_PACKED_ROWS, kernel: str = DEFAULT_KERNEL) -> int:
    """Replace every fp32 CPU `nn.Linear` in `model` by a `PackedLinear`, in place; returns how many.

    Call it after the model has its final weights and device (after merging adapters, after `.to()`): the
    packed copy is not a parameter and does not follow later changes. A torch without `kernel` packs nothing.
    """
    if not kernel_available(kernel):
        return 0
    targets = [(parent, name, child) for parent in list(model.modules()) for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    # fbgemm's fp16 packing runs on one thread (211 layers of SmolLM2-135M: 2.9 s); the ops release the GIL, so
    # a thread per core packs them side by side (2.1-2.3 s on 2 cores), for every engine a job loads
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(targets)))) as pool:
        packed = list(pool.map(lambda t: PackedLinear(t[2], max_rows, kernel), targets))
    for (parent, name, _), layer in zip(targets, packed, strict=True):
        setattr(parent, name, layer)
    return len(targets)
