"""When the Triton kernels replace the torch reference (no triton import here: this runs on every CPU box).

Rule: kernels run on CUDA tensors when CUDA and triton are both present, unless TMD_KERNELS=0. On CPU they run
only for tests that ask for them (`override(True)`) with Triton's interpreter (TRITON_INTERPRET=1) on.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from contextlib import contextmanager

import torch

ENV = "TMD_KERNELS"
_override: bool | None = None


@functools.cache
def _cuda_and_triton() -> bool:
    # find_spec only: importing triton on a CPU box is harmless, but launching a kernel there says "0 active
    # drivers", so nothing here touches triton's driver.
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _env_allows() -> bool:
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: set {ENV}=0 to disable the Triton kernels or {ENV}=1 (default) to allow them")
    return value == "1"


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def enabled() -> bool:
    """True when the model path uses the kernels: CUDA and triton present and TMD_KERNELS is not 0.

    `override` takes precedence (tests, A/B benchmarks).
    """
    if _override is not None:
        return _override
    return _env_allows() and _cuda_and_triton()


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels should process this tensor: enabled, and on CUDA (or on CPU under the interpreter)."""
    if not enabled():
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


@contextmanager
def override(on: bool):
    """Force the kernels on or off inside the block, whatever CUDA and TMD_KERNELS say."""
    global _override
    previous, _override = _override, bool(on)
    try:
        yield
    finally:
        _override = previous
