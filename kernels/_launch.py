"""Launch helpers shared by the kernels."""
from __future__ import annotations

import torch

# Activation dtypes the kernels take; fp64 stays on the torch reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Rows one backward program walks through; its partial weight gradients are summed afterwards in torch, which
# keeps the reduction deterministic (no atomics) at the cost of a [num_programs, D] fp32 buffer.
ROWS_PER_PROGRAM = 32


def num_warps_for(block: int) -> int:
    """Warps for a row block of `block` elements: at most 8 elements per thread and array.

    Up to 32 warps: at Wan 14B's width (block 8192) 16 warps made the backward kernels spill registers, 32 do
    not (`python -m kernels.compile_check` prints registers and stack per kernel).
    """
    return min(max(block // 256, 1), 32)
