"""Model TFLOP/s per device and MFU of the running job, logged with every step's metrics.

Model FLOPs of a step are the analytic count of training/flops.py (checked against torch's FlopCounterMode):
the unsharded model, each product once (no activation-checkpointing re-computation), for the global batch.
MFU divides the achieved model TFLOP/s per device by the device's dense peak for the compute dtype: NVIDIA's
datasheet figures for GPUs, and for a CPU the GEMM throughput measured once per process (there is no datasheet
number for a shared CPU; `python -m tmd_megatron.bench.calibrate` measures the full `cpu` profile).
"""
from __future__ import annotations

import functools
import time

import torch

# Dense (no sparsity) peak TFLOP/s by compute dtype, from NVIDIA's datasheets: H100 SXM / H200 SXM bf16 989.4,
# fp32 66.9; H100 PCIe 756.5 / 51.2; A100 (SXM and PCIe) 312 / 19.5; B200 2250 / 80 (HGX B200 per GPU).
DEVICE_PEAKS = {  # matched in order against torch.cuda.get_device_name()
    "H100 PCIe": {"bf16": 756.5, "fp32": 51.2},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "GH200": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "B200": {"bf16": 2250.0, "fp32": 80.0},
}


@functools.lru_cache(maxsize=None)
def measured_cpu_tflops(threads: int) -> float:
    """Best of five 1024^3 fp32 GEMMs on `threads` threads (about 0.1 s)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e12


def device_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s of one device for `dtype`, where it comes from); None where unknown."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return measured_cpu_tflops(threads), f"CPU GEMM measured on {threads} thread(s)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in DEVICE_PEAKS.items():
            if key in name:
                return peaks.get(dtype), f"{name} datasheet, {dtype} dense"
        return None, f"{name}: no peak in training/mfu.py DEVICE_PEAKS"
    return None, f"{device.type}: no peak known"


class Throughput:
    """Accumulates the model FLOPs of the steps taken since the last log line and turns them into metrics."""

    def __init__(self, res, world: int, device: torch.device):
        self.res, self.world, self.device = res, world, device
        self.per_step: dict[bool, float] | None = None  # generator step? -> model FLOPs of the global batch
        self.pending = 0.0
        self.peak: float | None = None  # TFLOP/s; 0 where unknown

    def count(self, generator: bool, latent_fhw) -> None:
        """Add the FLOPs of the step just taken (latent: the batch's (F, H, W), which synthetic data sets)."""
        if self.per_step is None:
            from .flops import step_flops
            from tmd_megatron.models.flops import total

            try:
                self.per_step = {g: total(step_flops(self.res, g, latent=latent_fhw).values()).model
                                 for g in (True, False)}
            except ValueError:  # a configuration the count does not model (jvp=exact): no throughput metrics
                self.per_step = {}
        self.pending += self.per_step.get(generator, 0.0)

    def metrics(self, seconds: float) -> dict[str, float]:
        """TFLOP/s per device (and MFU) over the steps counted in the last `seconds`; resets the count."""
        if not self.pending or seconds <= 0:
            return {}
        tflops = self.pending / seconds / self.world / 1e12
        self.pending = 0.0
        if self.peak is None:  # measured here, outside the steps (a CPU's GEMM benchmark)
            self.peak = device_peak(self.device, self.res.raw.model.compute_dtype)[0] or 0.0
        out = {"tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        return out
