"""model.compile=true (regional torch.compile of the DiT blocks and the fusion block, inductor on CPU) against eager:
two steps of the real trainer from the same seed, per stage, with activation checkpointing. The layouts (TP+SP with
checkpointing, CP ring and Ulysses) are compiled cases of tests/test_parallel_2rank.py."""
import io

import pytest
import torch

from tmd_megatron.parallel import Topology
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.trainer import Trainer

# inductor reorders and fuses fp32 reductions: a few ulp per op, compounded over two optimizer steps
TOL = 1e-4


def _run(tmp_path, compiled: bool, extra):
    res = resolve(compose(["experiment=tiny_smoke", f"run.out_dir={tmp_path / str(compiled)}", "run.resume=never",
                           "run.tensorboard=false", "parallel.activation_checkpointing=true", "optim.eps=1.0",
                           f"model.compile={str(compiled).lower()}", *extra]))
    torch.manual_seed(0)
    trainer = Trainer(res, Topology.single(), stream=io.StringIO())
    trainer.start()
    before = {k: v.detach().clone() for k, v in trainer.roles.student.state_dict().items()}
    metrics = [trainer.advance() for _ in range(2)]
    after = {k: v.detach().clone() for k, v in trainer.roles.student.state_dict().items() if v.is_floating_point()}
    return metrics, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [["method=tm_mf"], []], ids=["stage1", "stage2"])
def test_compiled_trainer_matches_eager(tmp_path, stage):
    from torch._dynamo.utils import counters

    counters.clear()
    eager, eager_state = _run(tmp_path, False, stage)
    compiled, compiled_state = _run(tmp_path, True, stage)
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled
    compared = 0
    for a, b in zip(eager, compiled):
        for k, v in a.items():
            if k in b and (isinstance(v, float) or torch.is_tensor(v) and v.numel() == 1):
                assert float(b[k]) == pytest.approx(float(v), rel=TOL, abs=1e-6), k
                compared += 1
    assert compared >= 2
    # optim.eps=1 makes AdamW a momentum SGD (sqrt of the second moment << 1): the update is linear in the
    # gradient (Adam's usual eps turns ulp differences of a ~0 gradient, e.g. a zero-initialised bias's, into
    # sign flips of a whole step). Per tensor: within TOL of the eager update plus the fp32 rounding of the
    # parameter itself (updates of ~1e-7 on weights of ~0.1 are a few ulp)
    before, after = eager_state
    worst = 0.0
    for k, v in after.items():
        bound = TOL * (v - before[k]).norm() + 4 * torch.finfo(torch.float32).eps * v.norm() + 1e-30
        worst = max(worst, ((compiled_state[1][k] - v).norm() / bound).item())
    assert any((v != before[k]).any() for k, v in after.items())
    assert worst <= 1.0, worst
