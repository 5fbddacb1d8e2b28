"""Measurements behind docs/parallel.md. Run by hand from the repo root (each spawns gloo ranks here):

  .venv/bin/python tests/bench_parallel.py schedule  # measured pipeline idle fraction vs (p-1)/(m+p-1)
  .venv/bin/python tests/bench_parallel.py dp        # ZeRO-1 (ours) vs FSDP2 over DP=2: step time, bytes
  .venv/bin/python tests/bench_parallel.py ulysses   # our Ulysses vs DeepSpeed DistributedAttention (if installed)
  .venv/bin/python tests/bench_parallel.py matrix    # the layout matrix: max errors and comm tables (markdown)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from multirank import run_ranks  # noqa: E402


# ---- pipeline idle fraction -----------------------------------------------------------------------------------------
def _schedule_rank(schedule: str, m: int, width: int, depth: int) -> dict:
    from tmd_megatron.parallel import TensorSpec, init_topology, run_pipeline

    topo = init_topology(pp=2, timeout_s=300)
    g = torch.Generator().manual_seed(topo.pp.rank)
    ws = [torch.randn(width, width, generator=g).div(width**0.5).requires_grad_(True) for _ in range(depth)]

    def stage(mb, inputs):
        h = inputs[0]
        for w in ws:
            h = torch.tanh(h @ w)
        return (h,), None

    x = [(torch.randn(256, width),) for _ in range(m)]
    boundary = [TensorSpec((256, width))]
    grads = [(torch.ones(256, width),) for _ in range(m)]
    idles = []
    for _ in range(6):  # the first run warms up
        res = run_pipeline(stage, topo.pp, m, boundary=boundary, inputs=x if topo.pp.rank == 0 else None,
                           output_grads=grads, schedule=schedule)
        idles.append(res.idle_fraction)
    return dict(stage=topo.pp.rank, idle=statistics.median(idles[1:]))


def bench_schedule():
    print("| schedule | p | m | measured idle, median of 5 (stage 0 / 1) | (p-1)/(m+p-1) |\n|---|---|---|---|---|")
    for schedule in ("1f1b", "gpipe"):
        for m in (1, 2, 4, 8, 16):
            r = run_ranks(_schedule_rank, 2, schedule, m, 512, 6, timeout=600)
            print(f"| {schedule} | 2 | {m} | {r[0]['idle']:.3f} / {r[1]['idle']:.3f} | {1 / (m + 1):.3f} |")


# ---- ZeRO-1 vs FSDP2 -------------------------------------------------------------------------------------------------
def _dp_rank(mode: str, steps: int, m: int) -> dict:
    from tmd_megatron.models.wan import WanConfig, WanModel
    from tmd_megatron.parallel import ZeroAdamW, count_comm, init_topology

    cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32)
    topo = init_topology(timeout_s=300)
    torch.manual_seed(0)
    model = WanModel(cfg)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (topo.dp.size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = ZeroAdamW(model, topo, lr=1e-4)
    x, t, ctx = torch.randn(1, 16, 3, 16, 16), torch.tensor([500.0]), torch.randn(1, 16, 32)
    times, counted = [], 0
    for step in range(steps + 1):
        start = time.perf_counter()
        with count_comm() as c:
            for _ in range(m):
                model(x, t, ctx).square().mean().backward()
            if mode == "fsdp2":
                opt.step()
            else:
                opt.reduce_grads()
                opt.step()
            opt.zero_grad()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
            counted = c.total_bytes()
    params = sum(p.numel() for p in WanModel(cfg).parameters())
    return dict(time=statistics.median(times), counted=counted, params=params,
                held=sum(p.to_local().numel() if hasattr(p, "to_local") else 0 for p in model.parameters()))


def bench_dp():
    m = 4
    print(f"DP=2, Wan dim 256 x 4 blocks, {m} microbatches of 1 sample (192 tokens) per step, gloo on 2 cores")
    print("| optimizer | step time (median of 3) | bytes moved per step per rank |\n|---|---|---|")
    for mode in ("zero1", "fsdp2"):
        r = run_ranks(_dp_rank, 2, mode, 3, m, timeout=600)[0]
        p4 = r["params"] * 4
        if mode == "zero1":
            moved = f"{r['counted']:,} (counted: reduce-scatter + all-gather = 2 x {p4:,})"
        else:  # per microbatch: all-gather forward, all-gather backward (resharded), reduce-scatter gradients
            moved = f"~{3 * m * p4:,} (analytic: 3 x {m} microbatches x {p4:,})"
        print(f"| {mode} | {r['time'] * 1e3:.0f} ms | {moved} |")


# ---- Ulysses: ours vs DeepSpeed -------------------------------------------------------------------------------------
def _ulysses_rank(impl: str, length: int, heads: int, d: int, reps: int) -> dict:
    from tmd_megatron.models.wan.layers import SDPAttention
    from tmd_megatron.parallel import count_comm, init_topology
    from tmd_megatron.parallel.attention import UlyssesAttention

    topo = init_topology(cp=2, timeout_s=300)
    g = torch.Generator().manual_seed(topo.cp.rank)
    q, k, v = (torch.randn(1, length // 2, heads, d, generator=g).requires_grad_(True) for _ in range(3))
    if impl == "ours":
        attn = UlyssesAttention(topo.cp, SDPAttention())
    else:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        deepspeed.init_distributed(dist_backend="gloo")
        core = SDPAttention()
        attn = DistributedAttention(lambda q_, k_, v_, *a, **kw: core(q_, k_, v_), topo.cp.pg, scatter_idx=2,
                                    gather_idx=1)
    times, cpu = [], []
    for rep in range(reps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        with count_comm() as c:
            out = attn(q, k, v) if impl == "ours" else attn(q, k, v, 0)
            out.square().sum().backward()
        if rep:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return dict(time=statistics.median(times), cpu=statistics.median(cpu), calls=sum(n for n, _ in c.table().values()),
                out=out.detach().numpy())


def bench_ulysses():
    length, heads, d = 4096, 8, 64
    print(f"Ulysses CP=2, {length} tokens, {heads} heads x {d}, fp32 fwd+bwd, gloo on 2 cores")
    print("| implementation | wall / CPU time (median of 7) | all-to-all calls (fwd+bwd) | output |\n|---|---|---|---|")
    ours = None
    for impl in ("ours", "deepspeed"):
        try:
            r = run_ranks(_ulysses_rank, 2, impl, length, heads, d, 7, timeout=600)[0]
        except RuntimeError as err:
            print(f"| {impl} | not run: {str(err).splitlines()[-1]} | |")
            continue
        ours = r["out"] if ours is None else ours
        calls = r["calls"] if impl == "ours" else "not counted (DeepSpeed's own collectives): 8"
        same = float(abs(r["out"] - ours).max())
        print(f"| {impl} | {r['time'] * 1e3:.0f} / {r['cpu'] * 1e3:.0f} ms | {calls} | max diff to ours {same:.1e} |")


# ---- layout matrix ---------------------------------------------------------------------------------------------------
def bench_matrix():
    import test_parallel_2rank as t2
    import test_parallel_4rank as t4
    import test_parallel_8rank as t8
    from parallel_cases import F32_KEYS, failures, run_suite

    keys = [*F32_KEYS, "grads_per_tensor", "params_per_tensor"]
    print("| layout | ranks | " + " | ".join(keys) + " | comm = analytic |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    comm_rows = []
    for world, cases in ((2, {k: v for k, v in t2.CASES.items() if k not in t2.SABOTAGE}), (4, t4.CASES),
                         (8, t8.CASES)):
        results = run_ranks(run_suite, world, cases, timeout=600)
        for name in cases:
            worst = {k: max(r["layouts"][name]["errors"].get(k, 0.0) for r in results) for k in keys}
            ok = all("communication" not in p for p in failures(results, name))
            print(f"| {name} | {world} | " + " | ".join(f"{worst[k]:.1e}" for k in keys) + f" | {ok} |")
            got, expected = results[0]["layouts"][name]["comm"]["pipeline"]
            comm_rows.append((name, got, expected))
    print("\nRank 0, one step (forward + backward of all microbatches), analytic vs measured:\n")
    print("| layout | op [group] | calls | bytes analytic | bytes measured |\n|---|---|---|---|---|")
    for name, got, expected in comm_rows:
        if name.endswith("_fp64_ac"):
            continue
        for (op, group), (calls, nbytes) in expected.items():
            measured = got.get((op, group), (0, 0))[1]
            print(f"| {name} | {op} [{group}] | {calls} | {nbytes:,} | {measured:,} |")


if __name__ == "__main__":
    {"schedule": bench_schedule, "dp": bench_dp, "ulysses": bench_ulysses, "matrix": bench_matrix}[sys.argv[1]]()
