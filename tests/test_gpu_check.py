"""`make gpu-check` without a GPU: it prints its plan and exits 0; and its sections run end to end on CPU at tiny
sizes (the TE section with tests/te_double.py standing in for Transformer Engine), so a GPU node's scarce
minutes are not spent on a Python error."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = """
import sys
sys.path.insert(0, "tests")
import te_double
from megatron.core import parallel_state  # before the double: megatron probes TE's version
te_double.install()
from tmd_megatron.bench import gpu_check
sys.exit(gpu_check.main(["--smoke-on-cpu"]))
"""


def test_without_cuda_it_prints_the_plan_and_exits_0(capsys):
    import torch

    from tmd_megatron.bench.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the check would run")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "sees no CUDA device" in out and "7. pytest tests/gpu" in out


@pytest.mark.timeout(600)
def test_sections_run_on_cpu_at_tiny_sizes():
    proc = subprocess.run([sys.executable, "-c", SMOKE], cwd=ROOT, capture_output=True, text=True, timeout=540)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    for title in ("Transformer Engine layers vs the torch backend (ok", "Ring attention chunk kernels vs the "
                  "explicit reference (ok", "FD-JVP precision at Wan 1.3B width (ok",
                  "TMD stage-2 step: peak memory vs the planner (ok"):
        assert title in out, out[-4000:]
    assert "| cpu_flash | float32 |" in out  # the ring section compared the fused kernel, not math with itself
