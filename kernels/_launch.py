"""Launch helpers shared by the kernels."""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32,) + HALF_DTYPES

# Rows one backward program walks through; its partial weight gradients are summed afterwards in torch, which
# keeps the reduction deterministic (no atomics) at the cost of a [num_programs, D] fp32 buffer.
ROWS_PER_PROGRAM = 32


def num_warps_for(block: int) -> int:
    """Enough warps that each thread holds a few elements of a row block."""
    return min(max(block // 256, 1), 16)
