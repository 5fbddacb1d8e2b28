"""`make demo`: the main job on its embedded default.

Until the trainer lands (issue: Training system) this runs the foundation end to end on CPU: a tiny
Wan2.1-structured DiT, a checkpoint round trip through both key formats, and the parameter counts of the
real presets. It is replaced by the tiny TMD distillation (teacher -> stage 1 -> stage 2 -> sampling).
"""
from __future__ import annotations

import tempfile
import time

import torch

from tmd_megatron.models.wan import WanConfig, WanModel


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    model.init_weights()
    x = torch.randn(2, 16, 3, 8, 8)
    t = torch.tensor([250.0, 750.0])
    ctx = torch.randn(2, 20, model.config.text_dim)
    with torch.no_grad():
        ref = model(x, t, ctx)
        rows = []
        with tempfile.TemporaryDirectory() as d:
            for fmt in ("original", "diffusers"):
                model.save_pretrained(f"{d}/{fmt}", format=fmt, max_shard_bytes=200_000)
                back = WanModel.from_pretrained(f"{d}/{fmt}")
                rows.append((fmt, float((back(x, t, ctx) - ref).abs().max())))
    print("checkpoint round trip (tiny model)      max |delta| of the output")
    for fmt, err in rows:
        print(f"  {fmt:<38} {err:.1e}")
    print("preset parameter counts (built on the meta device)")
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        with torch.device("meta"):
            n = sum(p.numel() for p in WanModel(WanConfig.preset(name)).parameters())
        print(f"  {name:<38} {n:,}")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
