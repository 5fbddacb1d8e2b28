"""Kernel tests: compiled on CUDA where there is one, else Triton's CPU interpreter at tiny sizes.

(The folder is not called tests/kernels: with tests/ on sys.path that name would shadow the kernels package.)

Triton decides interpreted vs compiled when a @triton.jit function is defined (module import), so
TRITON_INTERPRET must be set before kernels.layer_norm_modulate / rms_norm / rope are imported. The model never
imports them on a CPU box unless a test forces the kernels on, so setting it here, at collection, is in time;
test_jitted_functions_match_the_device checks it.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
