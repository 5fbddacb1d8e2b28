"""Two-expert (A14B) model through ExpertStage on a pipeline, against WanExperts on one process (a spawned rank
runs it beside the layout matrix of parallel_cases.py)."""
from __future__ import annotations

import torch

from parallel_cases import (
    BATCH, CFG, HIDDEN_BLOCK, LATENT, hidden_term, out_term, reference_model, rel_err, rel_errs, sample,
)
from parallel_suites import run_suite_with_frozen_teacher
from tmd_megatron.models.wan import WanModel
from tmd_megatron.parallel import init_topology, parallelize, run_pipeline


def expert_stage_errors(tp=1, cp=1, pp=2, m=2) -> dict:
    """A two-expert (A14B) model on PP2 through ExpertStage against WanExperts on one process: microbatch 0 mixes
    the experts (t = 912 high, 37 low at boundary 0.875), microbatch 1 is all low noise. Output, hidden-state loss,
    latent and every parameter gradient of both experts."""
    from tmd_megatron.models.wan import WanExperts
    from tmd_megatron.parallel.stages import ExpertStage

    torch.manual_seed(0)
    states = [reference_model().state_dict()]
    torch.manual_seed(5)
    states.append({k: v + 0.05 * torch.randn_like(v) for k, v in states[0].items()})
    ref = WanExperts(WanModel(CFG), WanModel(CFG), 0.875)
    ref.high.load_state_dict(states[0])
    ref.low.load_state_dict(states[1])
    d = sample(LATENT, torch.float32)
    x = d["x"].clone().requires_grad_(True)
    out, hidden = ref(x, d["t"], d["ctx"], return_hidden=(HIDDEN_BLOCK,))
    grid = tuple(n // p for n, p in zip(LATENT, CFG.patch_size))
    feat = ref.tokens_to_grid(hidden[HIDDEN_BLOCK], ref.geometry(grid, x.device))
    ((out_term(out, d["probe"]) + hidden_term(feat, d["probe_h"])) / BATCH).backward()

    topo = init_topology(tp, cp, pp, timeout_s=120)
    experts = WanExperts(*(parallelize(CFG, topo, s) for s in states), 0.875)
    b_local = BATCH // topo.dp.size
    mb = b_local // m
    sl = [slice(i * mb, (i + 1) * mb) for i in range(m)]

    def hidden_loss(i, hidden, geom):
        return hidden_term(experts.tokens_to_grid(hidden[HIDDEN_BLOCK], geom), d["probe_h"][sl[i]]) / b_local

    high = [experts.route(d["t"][s]) for s in sl]
    stage = ExpertStage(experts, (mb, CFG.in_dim, *LATENT), high, capture=(HIDDEN_BLOCK,), hidden_loss=hidden_loss)
    inputs = [(d["x"][s].clone().requires_grad_(True), d["t"][s], d["ctx"][s]) for s in sl]
    res = run_pipeline(stage, topo.pp, m, boundary=stage.boundary(), inputs=inputs,
                       output_grads=lambda i, o: ((d["probe"][sl[i]] + o[0]) / b_local,))
    out = {"mixed": [bool(h.any() and not h.all()) for h in high]}
    if topo.is_last_stage:
        out["output_err"] = rel_err(torch.cat([o[0] for o in res.outputs]), ref(d["x"], d["t"], d["ctx"]).detach())
    if topo.is_first_stage:
        out["x_grad_err"] = rel_err(torch.cat([g[0] for g in res.input_grads]), x.grad)
    named = dict(ref.named_parameters())
    got = {n: p.grad for n, p in experts.named_parameters() if p.grad is not None}
    _, out["grad_err"], _ = rel_errs(got, {n: named[n].grad for n in got})  # relative to the largest gradient
    out["experts_with_grads"] = sorted({n.split(".")[0] for n, p in experts.named_parameters() if p.grad is not None})
    return out


def run_suite_with_experts(cases: dict) -> dict:
    out = run_suite_with_frozen_teacher(cases)
    out["experts"] = expert_stage_errors()
    return out
