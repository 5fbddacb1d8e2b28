"""Loader throughput against the training step's consumption rate: `python -m tmd_megatron.data.bench`.

Measures, on this machine, samples/s of both loaders on (a) the synthetic task's shards (the CPU training data)
and (b) paper-sized samples (latent [16, 21, 60, 104] bf16, 160 rows of 4096-wide bf16 text), and the samples/s a
tiny-Wan training step consumes (forward + backward of the flow-matching loss on the synthetic latents).
The machine may be shared: each loader rate is the best of --repeat runs, the step rate a median step.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from .format import ShardWriter
from .loader import make_loader
from .loader_dali import dali_available
from .synthetic import SyntheticTask


def loader_rate(shards, batch_size: int, backend: str, text_len: int, batches: int) -> tuple[float, float]:
    """(samples/s, MB/s of tensors delivered), first batch (pipeline start-up) excluded."""
    loader = make_loader(shards, batch_size, backend=backend, text_len=text_len, seed=0)
    next(loader)
    nbytes, t0 = 0, time.perf_counter()
    for _ in range(batches):
        b = next(loader)
        nbytes += sum(v.numel() * v.element_size() for v in b.values() if isinstance(v, torch.Tensor))
    dt = time.perf_counter() - t0
    loader.close()
    return batches * batch_size / dt, nbytes / dt / 1e6


def consumption_rate(batch_size: int, steps: int) -> float:
    """Samples/s of a tiny-Wan training step (fwd + bwd + AdamW) on synthetic latents [16, 3, 8, 8]."""
    from tmd_megatron.models.wan import WanConfig, WanModel

    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch_size, 16, 3, 8, 8)
    ctx = torch.randn(batch_size, model.config.text_len, model.config.text_dim)

    def step():
        t = torch.rand(batch_size)
        noise = torch.randn_like(x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        loss = (model(x_t, 1000 * t, ctx) - (noise - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):  # median step: the machine is shared, single slow steps are noise
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch_size / sorted(times)[len(times) // 2]


def write_paper_sized(root: Path, num: int, text_rows: int = 160) -> None:
    g = torch.Generator().manual_seed(0)
    with ShardWriter(root / "paper-000000.tar") as w:
        for i in range(num):
            w.add(f"{i:06d}", torch.randn(16, 21, 60, 104, generator=g).bfloat16(),
                  torch.randn(text_rows, 4096, generator=g).bfloat16(), f"prompt {i}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--repeat", type=int, default=3, help="loader runs per row; the best is reported")
    args = p.parse_args(argv)
    n_syn, n_paper, steps = (256, 8, 5) if args.quick else (4096, 48, 30)
    backends = ["torch"] + (["dali"] if dali_available() else [])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        SyntheticTask().write_shards(tmp / "syn", n_syn, seed=0, samples_per_shard=512)
        write_paper_sized(tmp / "paper", n_paper)
        for backend in backends:
            rate, mb = max(loader_rate(tmp / "syn", 8, backend, 64, n_syn // 8 - 2) for _ in range(args.repeat))
            rows.append((f"loader {backend}", "synthetic [16,3,8,8] fp32, batch 8", rate, mb))
            rate, mb = max(loader_rate(tmp / "paper", 1, backend, 512, n_paper - 2) for _ in range(args.repeat))
            rows.append((f"loader {backend}", "paper-size [16,21,60,104] bf16, batch 1", rate, mb))
    rows.append(("consumption", "tiny Wan train step, batch 8", consumption_rate(8, steps), float("nan")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| what | data | samples/s | MB/s |")
    print("|---|---|---:|---:|")
    for what, data, rate, mb in rows:
        print(f"| {what} | {data} | {rate:,.1f} | {'-' if mb != mb else f'{mb:,.0f}'} |")
    need = rows[-1][2]
    for what, data, rate, _ in rows[:-1]:
        if data.startswith("synthetic"):
            print(f"{what}: {rate / need:.1f}x the tiny-Wan consumption rate")


if __name__ == "__main__":
    main()
