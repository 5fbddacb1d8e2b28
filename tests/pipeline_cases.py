"""Engine checks on a generic stage function (a small MLP per stage), run on every rank of a PP group.

Reference: the same stages composed on one process with torch autograd.
"""
from __future__ import annotations

import torch

from tmd_megatron.parallel import TensorSpec, init_topology, run_pipeline, schedule_order, transfer

WIDTH, M, B = 8, 4, 3
SLOW_S = 0.1  # the last stage's forward in the run-ahead check


def _weights(num_stages: int):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(WIDTH, WIDTH, generator=g) / WIDTH**0.5 for _ in range(num_stages)]


def _data():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(M, B, WIDTH, generator=g)
    out_grad = torch.randn(M, B, WIDTH, generator=g)
    probe = torch.randn(M, B, WIDTH, generator=g)
    return x, out_grad, probe


def _stage_math(w, h, s, probe_mb):
    """Stage s: h -> tanh(h @ w), plus a 'discriminator' loss on stage 0's output."""
    out = torch.tanh(h @ w)
    loss = (out * probe_mb).sum() if s == 0 else None
    return out, loss


def _reference(frozen: bool):
    ws = [w.clone().requires_grad_(not frozen) for w in _weights(2)]
    x, out_grad, probe = _data()
    x = x.clone().requires_grad_(True)
    outs, total = [], 0.0
    for i in range(M):
        h = x[i]
        for s, w in enumerate(ws):
            h, loss = _stage_math(w, h, s, probe[i])
            total = total + (loss if loss is not None else 0.0)
        outs.append(h)
    out = torch.stack(outs)
    roots = [total] if frozen else [total, (out * out_grad).sum()]
    torch.autograd.backward(roots)
    grads = None if frozen else [w.grad for w in ws]
    return out.detach(), x.grad, grads


def run_engine_checks() -> dict:
    topo = init_topology(pp=2, timeout_s=120)
    s, p = topo.pp.rank, topo.pp.size
    x, out_grad, probe = _data()
    boundary = [TensorSpec((B, WIDTH))]
    results = {}
    for name, schedule, frozen in [("1f1b", "1f1b", False), ("gpipe", "gpipe", False), ("frozen", "1f1b", True)]:
        w = _weights(p)[s].clone().requires_grad_(not frozen)

        def stage_fn(mb, inputs):
            out, loss = _stage_math(w, inputs[0], s, probe[mb])
            return (out,), loss

        inputs = [(x[i].clone().requires_grad_(True),) for i in range(M)] if s == 0 else None
        grads = None if frozen else [(out_grad[i],) for i in range(M)]
        res = run_pipeline(stage_fn, topo.pp, M, boundary=boundary, inputs=inputs, output_grads=grads,
                           schedule=schedule)
        ref_out, ref_xgrad, ref_wgrads = _reference(frozen)
        r = dict(order_ok=[(op, i) for op, i, _, _ in res.trace] == schedule_order(p, s, M, schedule),
                 max_in_flight=res.max_in_flight, stage=s)
        if s == p - 1:
            r["out_err"] = float((torch.stack([o[0] for o in res.outputs]) - ref_out).abs().max())
        if s == 0:
            x_grad = torch.stack([g[0] for g in res.input_grads])
            r["xgrad_err"] = float((x_grad - ref_xgrad).abs().max())
            r["loss_reported"] = all(v is not None for v in res.losses)
        if not frozen:
            r["wgrad_err"] = float((w.grad - ref_wgrads[s]).abs().max())
        else:
            r["no_param_grad"] = w.grad is None
            # the input gradient goes to the last stage, where e.g. the student output lives
            moved = transfer([x_grad if s == 0 else torch.empty(M, B, WIDTH)], topo.pp, 0, p - 1)
            if s == p - 1:
                r["transfer_err"] = float((moved[0] - ref_xgrad).abs().max())
        results[name] = r

    w = _weights(p)[s].clone().requires_grad_(True)
    inputs = [(x[i].clone().requires_grad_(True),) for i in range(M)] if s == 0 else None
    graphs = []  # did any stage output carry an autograd graph?

    def forward_fn(mb, inp):
        out = torch.tanh(inp[0] @ w)
        graphs.append(out.requires_grad)
        return (out,), None

    res = run_pipeline(forward_fn, topo.pp, M, boundary=boundary, inputs=inputs, forward_only=True)
    fwd = dict(max_in_flight=res.max_in_flight, stage=s, no_graph=not any(graphs) and len(graphs) == M)
    if s == p - 1:
        ref_out, _, _ = _reference(True)
        fwd["out_err"] = float((torch.stack([o[0] for o in res.outputs]) - ref_out).abs().max())
    results["forward_only"] = fwd

    # sends do not wait for the receiver: with a slow last stage, the first stage streams all its forwards at once
    import time

    def slow_last(mb, inp):
        if s == p - 1:
            time.sleep(SLOW_S)
        return (torch.tanh(inp[0] @ w),), None

    res = run_pipeline(slow_last, topo.pp, M, boundary=boundary, inputs=inputs, forward_only=True)
    ahead = dict(stage=s, last_forward_end=res.trace[-1][3], wall=res.wall)
    if s == p - 1:
        ahead["out_err"] = float((torch.stack([o[0] for o in res.outputs]) - _reference(True)[0]).abs().max())
    results["run_ahead"] = ahead
    return results
