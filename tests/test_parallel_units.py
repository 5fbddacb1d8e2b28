"""Single-process checks of tmd_megatron.parallel: partition, schedules, environment parsing, seeding, layouts,
sharding plans, configuration errors, and that every transfer goes through comm.py."""
import ast
import copy
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from tmd_megatron.models.wan import WanConfig, WanModel
from tmd_megatron.parallel import (
    ShardedTokenLayout,
    TensorSpec,
    Topology,
    check_layout,
    dist_env,
    first_host,
    full_from_shards,
    generator_for,
    init_topology,
    parallelize,
    partition_blocks,
    plan_layout,
    run_pipeline,
    schedule_order,
    shards_from_full,
    simulate_schedule,
    student_block_costs,
)
from tmd_megatron.parallel.comm import CommGroup

TINY = WanConfig.preset("tiny")


# ---- partition -------------------------------------------------------------------------------------------------
def _brute_force_max_cost(costs, p, embed, head):
    best = math.inf
    for cuts in itertools.combinations(range(1, len(costs)), p - 1):
        bounds = (0, *cuts, len(costs))
        stage = [sum(costs[bounds[k] : bounds[k + 1]]) for k in range(p)]
        stage[0] += embed
        stage[-1] += head
        best = min(best, max(stage))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_partition_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 10, (1,), generator=g))
    costs = torch.rand(n, generator=g).mul(3).add(0.1).tolist()
    embed, head = float(torch.rand(1, generator=g)) * 2, float(torch.rand(1, generator=g)) * 2
    for p in range(1, min(n, 5) + 1):
        ranges = partition_blocks(costs, p, embed, head)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a < b for a, b in ranges)
        assert all(ranges[k][1] == ranges[k + 1][0] for k in range(p - 1))
        stage = [sum(costs[a:b]) for a, b in ranges]
        stage[0] += embed
        stage[-1] += head
        assert max(stage) == pytest.approx(_brute_force_max_cost(costs, p, embed, head))


def test_partition_counts_flow_head_blocks_n_times():
    # 30 blocks, the last 2 run 4 inner steps: total 36 units; 4 stages -> 9 each, the head blocks alone on one
    costs = student_block_costs(30, flow_head_blocks=2, inner_steps=4)
    assert partition_blocks(costs, 4) == [(0, 9), (9, 18), (18, 27), (27, 30)]
    with pytest.raises(ValueError, match="non-empty"):
        partition_blocks([1.0] * 3, 4)


# ---- schedules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4), (8, 16)])
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_schedule_bubble_is_the_textbook_one(p, m, schedule):
    assert simulate_schedule(p, m, schedule) == pytest.approx((p - 1) / (m + p - 1))


def test_1f1b_order_and_in_flight_bound():
    for p, m in [(2, 4), (4, 8), (4, 2)]:
        for s in range(p):
            order = schedule_order(p, s, m, "1f1b")
            assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            live, peak = set(), 0
            for op, i in order:
                assert op == "F" or i in live  # backward only after its forward
                (live.add if op == "F" else live.discard)(i)
                peak = max(peak, len(live))
            assert peak == min(p - s, m)


def test_single_stage_engine_checks_boundary():
    pp = CommGroup.solo("pp")
    x = torch.randn(2, 3)
    res = run_pipeline(lambda mb, inp: ((inp[0] * 2,), None), pp, 1, boundary=[], inputs=[(x,)],
                       output_grads=[(torch.ones(2, 3),)])
    assert torch.equal(res.outputs[0][0], x * 2)
    with pytest.raises(ValueError, match="inputs for all 2"):
        run_pipeline(lambda mb, inp: ((inp[0],), None), pp, 2, boundary=[], inputs=[(x,)])


def test_engine_refuses_dropping_a_gradient():
    from tmd_megatron.parallel.pipeline import _check_outputs

    out = torch.randn(2, 3, requires_grad=True) * 1
    with pytest.raises(ValueError, match="needs_grad=False"):
        _check_outputs((out,), [TensorSpec((2, 3), torch.float32, needs_grad=False)])
    with pytest.raises(ValueError, match="declared"):
        _check_outputs((out,), [TensorSpec((2, 4))])


# ---- environment, seeding ---------------------------------------------------------------------------------------
def test_torchrun_and_slurm_environments():
    env = dist_env(dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="2950"))
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 8, 1, "n1", 2950)
    env = dist_env(dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_LOCALID="5",
                        SLURM_JOB_NODELIST="gpu-[007-009,012],cpu1", SLURM_JOB_ID="123456"))
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 5, "gpu-007")
    assert env.master_port == 10000 + 123456 % 50000 and env.source == "slurm"
    assert first_host("n[1-2]-ib,m3") == "n1-ib" and first_host("single") == "single"
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        dist_env(dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="x"))


def test_layout_that_does_not_divide_the_world_is_refused_before_starting():
    env = dict(RANK="0", WORLD_SIZE="6", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    with pytest.raises(ValueError, match="not divisible by tp\\*cp\\*pp"):
        init_topology(tp=4, environ=env)


def test_generator_depends_on_dp_rank_only():
    def draw(**coords):
        sizes = dict(tp=2, cp=2, pp=2, dp=2)
        rank = coords.get("tp", 0) + 2 * (coords.get("cp", 0) + 2 * (coords.get("dp", 0) + 2 * coords.get("pp", 0)))
        topo = Topology.virtual(**sizes, rank=rank)
        return torch.randn(4, generator=generator_for(11, 3, "noise", topo))

    base = draw()
    assert torch.equal(base, draw(tp=1)) and torch.equal(base, draw(cp=1)) and torch.equal(base, draw(pp=1))
    assert not torch.equal(base, draw(dp=1))
    topo = Topology.virtual()
    a = torch.randn(4, generator=generator_for(11, 3, "noise", topo))
    assert not torch.equal(a, torch.randn(4, generator=generator_for(11, 4, "noise", topo)))
    assert not torch.equal(a, torch.randn(4, generator=generator_for(11, 3, "other", topo)))


def test_virtual_topology_matches_megatron_rank_order():
    topo = Topology.virtual(tp=2, cp=2, pp=2, rank=5)  # measured with megatron-core 0.16.1 parallel_state
    assert topo.dp_cp.ranks == (5, 7) and topo.pp.ranks == (1, 5) and topo.tp_cp.ranks == (4, 5, 6, 7)
    assert (topo.tp.rank, topo.cp.rank, topo.pp.rank) == (1, 0, 1)


# ---- token layout ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp,cp,sp", [(1, 2, False), (2, 1, True), (2, 2, True), (2, 2, False), (1, 4, False)])
def test_layout_covers_every_token_once(tp, cp, sp):
    num_tokens = 3 * 5 * 7
    tokens = torch.arange(num_tokens, dtype=torch.float32).reshape(1, -1, 1)
    seen, attn = [], set()
    for rank in range(tp * cp):
        layout = ShardedTokenLayout(Topology.virtual(tp=tp, cp=cp, rank=rank), sp)
        shard = layout.split(tokens)
        assert shard.shape[1] == layout.local_len(num_tokens)
        seen.append(shard.flatten())
        att = layout.attention_tokens(num_tokens, "cpu")
        padded = layout.padded_len(num_tokens)
        assert padded % (cp * (tp if sp else 1)) == 0 and padded - num_tokens < cp * tp
        real = padded if att.real_keys is None else att.real_keys
        mine = (torch.arange(padded) < real).view(cp, -1)[layout.topo.cp.rank]  # which tokens it sees are real
        attn.update(att.index[mine].tolist())
    # SP shards (or CP chunks) in rank order rebuild the padded sequence; TP ranks without SP hold copies
    if sp or tp == 1:
        rebuilt = torch.cat(seen)[:num_tokens]
        assert torch.equal(rebuilt, tokens.flatten())
    assert attn == set(range(num_tokens))


# ---- sharding plans -----------------------------------------------------------------------------------------------
def test_checkpoint_moves_between_layouts_offline():
    torch.manual_seed(0)
    full = WanModel(TINY).state_dict()
    plan_a, plan_b = plan_layout(TINY, tp=2, pp=2), plan_layout(TINY, tp=4, pp=1)
    shards_a = shards_from_full(full, plan_a)
    assert shards_a[0][1]["blocks.0.self_attn.q.weight"].shape == (32, 64)  # column: output rows split
    assert shards_a[0][1]["blocks.0.self_attn.o.weight"].shape == (64, 32)  # row: input columns split
    assert shards_a[0][1]["blocks.0.self_attn.norm_q.weight"].shape == (32,)  # q/k gains follow the heads
    assert "head.head.weight" not in shards_a[0][0] and "patch_embedding.weight" not in shards_a[1][0]
    back = full_from_shards(shards_a, plan_a)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    via_b = full_from_shards(shards_from_full(back, plan_b), plan_b)
    assert all(torch.equal(via_b[k], full[k]) for k in full)


def test_single_process_parallel_model_is_the_model():
    torch.manual_seed(0)
    ref = WanModel(TINY)
    model = parallelize(TINY, Topology.single(), ref.state_dict())
    x, t, ctx = torch.randn(1, 16, 3, 10, 14), torch.tensor([300.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), ref(x, t, ctx))


def test_unsplittable_layouts_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tp=3"):
        check_layout(TINY, Topology.virtual(tp=3))
    with pytest.raises(ValueError, match="use cp_comm='ring'"):
        check_layout(TINY, Topology.virtual(tp=2, cp=4), cp_comm="ulysses")
    with pytest.raises(ValueError, match="pp=8 is more than the 4 blocks"):
        check_layout(TINY, Topology.virtual(pp=8))


# ---- all traffic is counted -------------------------------------------------------------------------------------
TRANSFERS = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
             "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "broadcast",
             "send", "recv", "isend", "irecv", "batch_isend_irecv", "P2POp", "all_gather_object", "gather", "scatter",
             "reduce", "barrier"}


def test_only_comm_py_talks_to_torch_distributed():
    """The counter sees everything because nothing else in the package calls a torch.distributed transfer."""
    root = Path(__file__).resolve().parents[1] / "tmd_megatron" / "parallel"
    offenders = []
    for path in root.glob("*.py"):
        if path.name == "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in TRANSFERS:
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("dist", "distributed"):
                    offenders.append(f"{path.name}:{node.lineno} dist.{node.attr}")
                if isinstance(base, ast.Attribute) and base.attr == "distributed":
                    offenders.append(f"{path.name}:{node.lineno} torch.distributed.{node.attr}")
    assert offenders == []


# ---- ZeRO-1 on one process --------------------------------------------------------------------------------------
def _toy_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def _backward(model):
    torch.manual_seed(4)
    model(torch.randn(6, 5)).square().sum().backward()


def test_zero_adamw_equals_adamw_with_clipping_and_resumes():
    from tmd_megatron.parallel import ZeroAdamW

    ref, ours = _toy_model(), _toy_model()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    opt = ZeroAdamW(ours, Topology.single(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _backward(ref)
        _backward(ours)
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.5)
        opt.reduce_grads()
        norm = opt.clip_grad_norm(0.5)
        assert float(norm) == pytest.approx(float(norm_ref), rel=1e-6) and float(norm) > 0.5  # clipping is active
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    # a fresh optimizer restored from the state continues identically
    resumed_model = _toy_model()
    resumed_model.load_state_dict(ours.state_dict())
    resumed = ZeroAdamW(resumed_model, Topology.single(), lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk
    for model, o in ((ours, opt), (resumed_model, resumed)):
        _backward(model)
        o.reduce_grads()
        o.step()
    for a, b in zip(ours.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine present")
def test_te_backend_without_transformer_engine_names_the_fix():
    with pytest.raises(RuntimeError, match="backend='torch'"):
        parallelize(TINY, Topology.single(), {}, backend="te")
    with pytest.raises(ValueError, match="parallelize"):
        WanModel(TINY, backend="te")


# ---- GPU binding (no GPU needed: the choice and the call are checked) --------------------------------------------
def test_local_cuda_index_follows_what_the_task_sees():
    from tmd_megatron.parallel.topology import local_cuda_index

    assert local_cuda_index(3, 8) == 3  # the task sees the node's GPUs
    assert local_cuda_index(3, 1) == 0  # srun --gpus-per-task=1: its own GPU is cuda:0
    with pytest.raises(RuntimeError, match="srun --gpus-per-task=1"):
        local_cuda_index(8, 4)


def test_nccl_process_group_is_bound_to_the_rank_gpu(monkeypatch):
    """init_topology passes device_id (eager NCCL communicators) and picks cuda:0 when one GPU is visible."""
    import torch.distributed as dist

    from tmd_megatron.parallel import init_topology

    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setenv("LOCAL_RANK", "5")
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="5", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(Stop):
        init_topology(environ=env)
    assert seen["device_id"] == torch.device("cuda", 0) and seen["set_device"] == torch.device("cuda", 0)
    assert seen["backend"] == "cuda:nccl,cpu:gloo"
