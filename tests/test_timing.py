"""Issue 16: the step-time model's parts (training/timing.py) against independent references: the pipeline
simulator against closed forms, the compute term against the FLOP counts (themselves held against torch's
FlopCounterMode in test_flops.py), the communication term against comm_model.pipeline_comm for a whole stage (held
against the comm counter of the real layouts in test_parallel_*rank.py), and the CLI (`tmd-plan --time/--search`).
The prediction against the measured trainer is `make bench` (docs/benchmarks.md)."""
import dataclasses
import math

import pytest

from tmd_megatron.cli.plan import main as plan_main
from tmd_megatron.parallel.comm_model import pipeline_comm
from tmd_megatron.parallel.pipeline import simulate_pipeline
from tmd_megatron.training import flops as TF
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.timing import EXPOSED, Profile, StepModel

HUGE = 1e12
# Every rate unbounded and every fixed cost zero: the test profiles below switch on one term at a time.
FREE = Profile("free", peak_tflops=1.0, gemm_tflops=HUGE, attn_fwd_tflops=HUGE, attn_bwd_tflops=HUGE, mem_gbps=HUGE,
               intra_gbps=HUGE, inter_gbps=HUGE, intra_latency_us=0.0, inter_latency_us=0.0, ranks_per_node=8)


def test_forward_pass_makespan_with_transfers():
    p, m, f, tau = 3, 5, 1.0, 0.25
    wall, busy = simulate_pipeline([f] * p, [0.0] * p, m, "forward", transfer=tau)
    assert wall == pytest.approx((p - 1) * (f + tau) + m * f)
    assert busy == pytest.approx([m * f] * p)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_one_shared_core_is_never_idle(schedule):
    """With one core for every rank and free transfers some op is always ready, so the pass takes exactly the sum
    of all ops; with unbounded cores the same pass takes (m + p − 1) (f + b) on equal stages."""
    p, m = 2, 4
    f = [[1.0, 2.0, 1.0, 3.0], [2.0, 1.0, 1.0, 1.0]]
    b = [[2.0, 1.0, 2.0, 2.0], [1.0, 3.0, 1.0, 2.0]]
    wall, busy = simulate_pipeline(f, b, m, schedule, cores=1.0)
    assert wall == pytest.approx(sum(map(sum, f)) + sum(map(sum, b)))
    assert sum(busy) == pytest.approx(wall)
    wall, _ = simulate_pipeline([1.0] * p, [2.0] * p, m, schedule)
    assert wall == pytest.approx((m + p - 1) * 3.0)


def _res(*overrides):
    return resolve(compose(["experiment=tiny_smoke", *overrides]))


@pytest.mark.parametrize("method", ["flow_matching", "tm_mf", "tmd"])
def test_compute_term_is_flops_over_rate(method):
    """Only GEMMs cost time (1 TFLOP/s): one rank's predicted step is its GEMM FLOPs of the step (every pass, every
    microbatch, checkpointing re-runs included) over the rate."""
    res = _res(f"method={method}")
    prof = dataclasses.replace(FREE, gemm_tflops=1.0)
    model = StepModel(res, 1, prof)
    m = model.lay.microbatches
    for generator in (True, False):
        flops = TF.per_rank_step(TF.stage_passes(res, model.st, 0, generator), m)
        assert model.step(generator)[0] == pytest.approx(flops.gemm / 1e12, rel=1e-9)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "parallel.sequence_parallel=false"],
                                    ["parallel.cp=2", "parallel.cp_comm=ulysses"]])
def test_exposed_collectives_are_the_stage_bytes(layout):
    """Flow matching on two ranks, links of 1 GB/s without latency: the exposed collective time of a step is every
    collective of the stage (pipeline_comm over all blocks, with the output merge) at its ring factor over the
    bandwidth. The model builds it per block and per pass, so this checks that composition."""
    res = _res("method=flow_matching", *layout)
    prof = dataclasses.replace(FREE, intra_gbps=1.0)
    model = StepModel(res, 2, prof)
    lay, m = model.lay, model.lay.microbatches
    table = pipeline_comm(res.wan, tuple(res.raw.data.latent)[1:], lay.micro_batch, m, tp=lay.tp, cp=lay.cp, pp=1,
                          pp_rank=0, blocks=range(res.wan.num_layers), sp=lay.sequence_parallel,
                          cp_comm=lay.cp_mode, e=4, x_grad=False)
    n = 2
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
              "all_to_all": (n - 1) / n}
    expect = sum(factor[op] * nbytes for (op, _), (_, nbytes) in table.items()) / 1e9
    parts = model.step(True)[1]
    assert expect > 0 and parts[EXPOSED] == pytest.approx(expect, rel=1e-9)


def test_pipeline_idle_comes_from_the_schedule():
    """PP2 with m = 4 and only GEMMs costing time: the predicted idle of the passes is at least the schedule's
    bubble (p − 1)/(m + p − 1) and close to it (the stages are balanced by FLOPs)."""
    res = _res("method=flow_matching", "parallel.pp=2", "data.global_batch=8", "parallel.microbatches=4")
    prof = dataclasses.replace(FREE, gemm_tflops=1.0)
    pred = StepModel(res, 2, prof).predict()
    bound = 1 / 5
    assert bound - 1e-9 <= pred.idle < bound + 0.1, pred.idle


def test_plan_time_and_search(capsys):
    base = ["wan1.3b_tmd_n2h5_m1", "--layout-only", "model.init=/x"]
    assert plan_main([*base, "--world", "8", "--time", "--cluster", "h100-ib"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("predicted time per iteration on h100-ib"))
    assert float(line.split(": ")[1].split(" s")[0]) > 0
    assert plan_main([*base, "--world", "8", "--search", "--device-memory", "80"]) == 0
    out = capsys.readouterr().out
    rows = [s for s in out.splitlines() if s[:4].strip().isdigit()]
    assert len(rows) == 10
    seconds = [float(r.split()[-5]) for r in rows]
    assert seconds == sorted(seconds)
    # the winner's overrides compose into a recipe the planner accepts
    over = out.split("overrides of #1: ")[1].split()
    assert plan_main(["wan1.3b_tmd_n2h5_m1", "--layout-only", "model.init=/x", "--world", "8", *over]) == 0


def test_plan_refuses_an_unknown_profile(capsys):
    code = plan_main(["tiny_smoke", "--world", "1", "--time", "--cluster", "nope-ib"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope-ib" in err and "h100-ib" in err and "Traceback" not in err


def test_block_traffic_scales_with_tokens():
    """The elementwise bytes of a block grow linearly in the tokens (beyond the text's fixed share)."""
    from tmd_megatron.training.timing import block_traffic

    cfg = _res().wan
    a, b = block_traffic(cfg, 64, 1), block_traffic(cfg, 128, 1)
    assert 1.5 < b[0] / a[0] < 2.0 and 1.5 < b[2] / a[2] < 2.0
    assert math.isclose(a[1], b[1])  # the same ops


def test_fused_traffic_counts_one_kernel_per_elementwise_run():
    """relu((2x)ᵀ + 1) @ w, then (sigmoid(z) * 3).sum(): eager runs 6 elementwise ops, each reading and writing whole
    tensors; fused, two kernels: the first reads x and writes the product's input, the second reads z and writes
    the scalar. A view between ops of one run (the transpose) reads and writes nothing of its own."""
    import torch

    from tmd_megatron.models.flops import elementwise_traffic

    x, w = torch.randn(64, 64), torch.randn(64, 64)
    n = x.numel() * 4

    def fn():
        y = torch.relu((x * 2).t() + 1)
        return ((y @ w).sigmoid() * 3).sum()

    assert elementwise_traffic(fn, fused=True) == (3 * n + 4, 2)
    eager_bytes, eager_ops = elementwise_traffic(fn)
    assert eager_ops == 6 and eager_bytes > 2 * (3 * n + 4)


def test_compiled_blocks_change_only_the_elementwise_term():
    """model.compile=true: a block's fused traffic is under its eager traffic, with fewer ops (kernels), and the
    predicted step is shorter in its passes only (optimizer, transfers and gradient reduction unchanged)."""
    from tmd_megatron.training.timing import block_traffic, predict

    cfg = _res().wan
    eager, fused = block_traffic(cfg, 64, 2), block_traffic(cfg, 64, 2, fused=True)
    assert fused[0] < eager[0] and fused[2] < eager[2] and fused[1] < eager[1] and fused[3] < eager[3]
    a = predict(_res(), 1, "h100-ib")
    b = predict(_res("model.compile=true"), 1, "h100-ib")
    assert b.seconds < a.seconds and a.parts.keys() == b.parts.keys()
    changed = {k for k in a.parts if not math.isclose(a.parts[k], b.parts[k])}
    assert changed and all(k.startswith("passes") for k in changed), changed


def test_collectives_take_no_core_but_wait_for_shared_peers():
    """Ops of 1 s compute + 1 s collective, two stages on one core, two microbatches forward only: the collectives
    of both stages overlap each other and take no core (7 s, not the 8 s of all work in series), the compute is
    shared (2 s while both stages compute) and only compute counts as busy."""
    wall, busy = simulate_pipeline([1.0, 1.0], [0.0, 0.0], 2, "forward", cores=1.0, f_comm=[1.0, 1.0])
    assert wall == pytest.approx(7.0) and busy == pytest.approx([2.0, 2.0])
    wall, busy = simulate_pipeline([1.0], [0.0], 1, "forward", f_comm=[1.0])
    assert wall == pytest.approx(2.0) and busy == pytest.approx([1.0])


def test_link_fit_recovers_latency_and_bandwidth_and_skips_lost_transfers():
    """Samples made from a known link (1 ms per call, 2 GB/s) give it back; a 0 s sample (a transfer lost in the
    timing noise, which made the relative weights infinite) is left out instead of breaking the fit."""
    from tmd_megatron.bench.calibrate import fit_link

    alpha, bw = 1e-3, 2e9
    samples = [(c, b, alpha * c + b / bw) for c, b in ((1, 1e5), (2, 1e6), (1, 1e7), (4, 4e7))]
    for got in (samples, samples + [(1, 1e3, 0.0)]):
        a, w = fit_link(got)
        assert a == pytest.approx(alpha, rel=1e-6) and w == pytest.approx(bw, rel=1e-6)
    with pytest.raises(RuntimeError, match="quieter machine"):
        fit_link([(1, 1e5, 0.0), (2, 1e6, 0.0), (1, 1e7, 1e-3)])
