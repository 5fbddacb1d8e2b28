"""Multi-rank suites beside the layout matrix of parallel_cases.py, run in the same spawns: the noise rule, modules
replicated over CP, and the GAN path through a frozen pipelined teacher."""
from __future__ import annotations

import torch

from parallel_cases import (BATCH, CFG, HIDDEN_BLOCK, LATENT, hidden_term, reference_model, rel_err, run_suite,
                            sample)
from tmd_megatron.parallel import ZeroAdamW, count_comm, init_topology, parallelize, run_pipeline, WanStage


def draw_noise() -> dict:
    """generator_for under TP x DP and CP x DP: (dp, cp, tp) coordinates and the noise each rank draws."""
    from tmd_megatron.parallel import generator_for

    out = {}
    for name, sizes in {"tp2": dict(tp=2), "cp2": dict(cp=2)}.items():
        topo = init_topology(**sizes, timeout_s=120)
        noise = torch.randn(5, generator=generator_for(1234, 7, "student_noise", topo)).tolist()
        out[name] = ((topo.dp.rank, topo.cp.rank, topo.tp.rank), noise)
    return out


def replicated_module_errors() -> dict:
    """A module every CP rank computes identically (a discriminator on merged features): with `replicated`,
    ZeroAdamW averages its gradient over CP instead of summing it. Error with and without the flag."""
    topo = init_topology(cp=2, timeout_s=120)
    feats = torch.randn(topo.dp.size, 5, 8, generator=torch.Generator().manual_seed(9))

    def disc():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 1)

    ref = disc()
    sum(ref(f).square().mean() for f in feats).div(topo.dp.size).backward()  # mean over the DP samples
    out = {}
    for flagged in (True, False):
        model = disc()
        model(feats[topo.dp.rank]).square().mean().backward()
        zero = ZeroAdamW(model, topo, replicated=[n for n, _ in model.named_parameters()] if flagged else ())
        zero.reduce_grads()
        reduced = zero.reduced_grads()
        out[flagged] = max(rel_err(reduced[n], p.grad) for n, p in ref.named_parameters())
    return out


def run_suite_with_noise(cases: dict) -> dict:
    out = run_suite(cases)
    out["noise"] = draw_noise()
    out["replicated"] = replicated_module_errors()
    return out


def frozen_teacher_input_grad(tp=1, cp=1, pp=2, m=2) -> dict:
    """The GAN term's path through a frozen teacher: parameters frozen, a discriminator-like loss on the
    hidden state of block 1 (first stage), no output gradient, conditioning sent without gradients; the
    latent's gradient comes back on the first stage and is moved to the last. Errors vs one process."""
    from tmd_megatron.parallel import transfer

    ref_model = reference_model()
    d = sample(LATENT, torch.float32)
    x = d["x"].clone().requires_grad_(True)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    _, hidden = ref_model(x, d["t"], d["ctx"], return_hidden=(HIDDEN_BLOCK,))
    grid = tuple(n // p for n, p in zip(LATENT, CFG.patch_size))
    feat = ref_model.tokens_to_grid(hidden[HIDDEN_BLOCK], ref_model.geometry(grid, x.device))
    (hidden_term(feat, d["probe_h"]) / BATCH).backward()

    topo = init_topology(tp, cp, pp, timeout_s=120)
    model = parallelize(CFG, topo, reference_model().state_dict())
    model.requires_grad_(False)
    b_local = BATCH // topo.dp.size
    mb = b_local // m
    lo = topo.dp.rank * b_local
    sl = [slice(lo + i * mb, lo + (i + 1) * mb) for i in range(m)]

    def disc_loss(i, hidden, geom):
        return hidden_term(model.tokens_to_grid(hidden[HIDDEN_BLOCK], geom), d["probe_h"][sl[i]]) / b_local

    stage = WanStage(model, (mb, CFG.in_dim, *LATENT), capture=(HIDDEN_BLOCK,), hidden_loss=disc_loss,
                     conditioning_grads=False)
    inputs = [(d["x"][s].clone().requires_grad_(True), d["t"][s], d["ctx"][s]) for s in sl]
    with count_comm() as counter:
        res = run_pipeline(stage, topo.pp, m, boundary=stage.boundary(), inputs=inputs)
    grad = torch.cat([g[0] for g in res.input_grads]) if topo.is_first_stage else torch.empty(b_local, *x.shape[1:])
    moved = transfer([grad], topo.pp, 0, topo.pp.size - 1)
    out = {"stage": topo.pp.rank, "params_without_grad": all(p.grad is None for p in model.parameters())}
    sent_pp = counter.table().get(("send", "pp"), (0, 0))[0]
    out["pp_sends"] = sent_pp  # during the pass: activations forward (4 per mb), only token gradients back (1 per mb)
    if moved is not None:
        out["x_grad_err"] = rel_err(moved[0] / topo.dp.size, x.grad[lo : lo + b_local])
    return out


def run_suite_with_frozen_teacher(cases: dict) -> dict:
    out = run_suite(cases, engine=True)
    out["frozen_teacher"] = frozen_teacher_input_grad()
    return out
