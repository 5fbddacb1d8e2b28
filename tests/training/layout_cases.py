"""Training steps of the real trainer under a parallel layout, reported as full (single-device) tensors.

`run_case` runs on every rank of a spawned group (or in the test process for the single-process reference):
it builds the recipe experiment=tiny_smoke with the case's method and layout, takes a few steps, and returns
on rank 0 the reduced metrics of each step and the full state of every trained role.
"""
from __future__ import annotations

import io

from tmd_megatron.parallel import Topology, destroy_topology, gather_full_state, init_topology
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.trainer import Trainer

STEPS = 3
# Adam's first steps are about lr·sign(g): with eps=1e-8 a gradient entry at roundoff level flips its update by
# 2·lr between layouts. eps=1e-3 keeps the update proportional to g, so 1e-5 compares the math, not the signs.
STABLE_ADAM = ["optim.eps=1e-3"]
# stage 1 from the teacher (+ fresh extras); stage 2 (TMD) from the teacher, the smoke recipe's shortcut
METHODS = {"tm_mf": ["method=tm_mf"], "tmd": []}


def run_case(method: str, layout: dict, out_dir: str) -> dict | None:
    """out_dir: shared by the ranks of the case (rank 0 writes the synthetic shards there)."""
    tp, cp, pp = layout.get("tp", 1), layout.get("cp", 1), layout.get("pp", 1)
    overrides = ["experiment=tiny_smoke", *METHODS[method], f"parallel.tp={tp}", f"parallel.cp={cp}",
                 f"parallel.pp={pp}", f"parallel.cp_comm={layout.get('cp_comm', 'ring')}",
                 f"parallel.sequence_parallel={layout.get('sp', True)}", f"run.out_dir={out_dir}",
                 "run.resume=never", "run.tensorboard=false", *STABLE_ADAM, *layout.get("overrides", [])]
    res = resolve(compose(overrides))
    topo = init_topology(tp, cp, pp, device="cpu") if layout.get("distributed", True) else Topology.single()
    trainer = Trainer(res, topo, stream=io.StringIO())
    trainer.start()
    metrics = [trainer.advance() for _ in range(STEPS)]
    held = trainer.roles.trainable()
    roles = ["student", "fake", "disc"] if res.dmd2v is not None else ["student"]
    full = {role: _gather(held.get(role), topo) for role in roles}
    # numpy, not torch: tensors would cross the result queue through shared memory that dies with the rank
    full = {role: {k: v.numpy() for k, v in state.items() if not k.startswith("head_patch_embedding.")}
            for role, state in full.items()}
    return {"metrics": metrics, "full": full} if topo.world.rank == 0 else None


def _gather(module, topo) -> dict:
    """A role's full state; a stage holding none of it (discriminator heads elsewhere) still joins the exchange."""
    if module is not None:
        return gather_full_state(module, topo)
    from tmd_megatron.parallel import comm

    full = {}
    for part in comm.all_gather_object({}, topo.pp):
        full.update(part)
    return full


def run_cases(cases: dict, base_dir: str) -> dict:
    """All cases on this rank, one after another (init_topology rebuilds the groups for each layout)."""
    out = {name: run_case(method, layout, f"{base_dir}/{name.replace('/', '_')}") for name, (method, layout) in cases.items()}
    destroy_topology()
    return out


def compare(case: dict, ref: dict, rtol: float = 1e-5) -> list[str]:
    """Metrics within rtol of the reference's; each role's parameters within rtol of its largest entry."""
    problems = []
    for step, (a, b) in enumerate(zip(case["metrics"], ref["metrics"])):
        for name, want in b.items():
            if name.startswith("grad_norm") or name == "step_time_s":
                continue
            got = a.get(name)
            if got is None or abs(got - want) > tolerance(name, want, rtol):
                problems.append(f"step {step} {name}: {got} vs {want}")
    for role, ref_state in ref["full"].items():
        state = case["full"][role]
        if state.keys() != ref_state.keys():
            problems.append(f"{role}: tensors differ {sorted(set(state) ^ set(ref_state))[:5]}")
            continue
        scale = max(float(abs(t).max()) for t in ref_state.values())
        worst = max(float(abs(state[k] - ref_state[k]).max()) for k in ref_state) / scale
        if worst > rtol:
            problems.append(f"{role}: parameters differ by {worst:.2e} of their largest entry")
    return problems


def tolerance(name: str, want: float, rtol: float = 1e-5) -> float:
    """rtol relative to the value, except VSD: its value is a mean of O(1) terms (a normalised direction times x̂)
    that cancel to near zero, so it is compared on the scale of its terms (absolutely)."""
    return rtol if name == "vsd" else rtol * max(abs(want), 1e-6)


def max_param_error(case: dict, ref: dict) -> float:
    errs = []
    for role, ref_state in ref["full"].items():
        scale = max(float(abs(t).max()) for t in ref_state.values())
        errs.append(max(float(abs(case["full"][role][k] - ref_state[k]).max()) for k in ref_state) / scale)
    return max(errs)


