import json
import math

import pytest
import torch

from tmd_megatron.training.metrics import MetricLogger, read_metrics
from tmd_megatron.training.optim import EMA, NonFiniteGuard, adamw, all_finite, lr_factor


def test_ema_matches_closed_form():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    history = []
    for k in range(5):
        with torch.no_grad():
            m.weight.add_(1.0)
        history.append(m.weight.detach().clone())
        ema.update(m)
    expect = w0.clone()
    for w in history:
        expect = 0.9 * expect + 0.1 * w
    assert torch.allclose(ema.shadow["weight"], expect, atol=1e-6)


def test_lr_schedule():
    assert [lr_factor(s, 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, 4, 104, "cosine") == 1.0 and abs(lr_factor(104, 4, 104, "cosine")) < 1e-12
    assert math.isclose(lr_factor(54, 4, 104, "cosine"), 0.5)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_factor(0, 0, 1, "linear")


def test_adamw_groups_skip_decay_for_vectors():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = adamw(m.parameters(), 1e-3, 0.01, (0.9, 0.99), 1e-8)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m[0].weight)}


def test_guard_and_finite_check():
    assert all_finite([torch.ones(2), None]) and not all_finite([torch.tensor([1.0, float("nan")])])
    g = NonFiniteGuard(max_skipped=2)
    g.record_skip(1)
    g.record_skip(2)
    with pytest.raises(FloatingPointError, match="max_skipped_steps=2"):
        g.record_skip(3)


def test_metric_logger_writes_jsonl_tensorboard_and_console(tmp_path):
    import io

    out = io.StringIO()
    log = MetricLogger(tmp_path, total_steps=4, stream=out)
    log.log(1, {"loss": 1.5})
    log.log(2, {"loss": 1.25})
    log.log(2, {"loss": 1.0})  # a resumed run re-logs step 2
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.5, 1.0]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 1.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "2/4" in out.getvalue() and "loss=1.25" in out.getvalue()
