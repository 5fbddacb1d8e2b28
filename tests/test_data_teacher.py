"""Teacher data: the CFG Euler sampler (algorithms.sampling) against a hand-integrated linear ODE, KD pairs
against a recomputation,
and a 2-rank torchrun run of `tmd-preprocess teacher` against the single-process result."""
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tmd_megatron.data import make_loader, pad_context
from tmd_megatron.data.synthetic import SyntheticTask
from tmd_megatron.algorithms.sampling import teacher_euler_sample
from tmd_megatron.algorithms.timesteps import wan_sampling_grid
from tmd_megatron.data.teacher_data import generate_teacher_data, sample_noise
from tmd_megatron.models.wan import WanConfig, WanModel


class LinearVelocity(nn.Module):
    """v(x, t, ctx) = a·x with a = ctx[:, 0, 0] per sample; records the timesteps it is called with."""

    def __init__(self, text_len=4):
        super().__init__()
        self.config = SimpleNamespace(text_len=text_len)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t, ctx, return_hidden=()):
        self.calls.append((t.clone(), ctx[:, 0, 0].clone()))
        return ctx[:, 0, 0].view(-1, 1, 1, 1, 1) * x


def test_euler_cfg_matches_hand_integration():
    steps, shift, g, a_c, a_u = 4, 3.0, 5.0, -0.7, 0.4
    u = np.linspace(0.999, 0.0, steps + 1)
    sig = shift * u / (1 + (shift - 1) * u)
    model = LinearVelocity()
    noise = torch.randn(2, 16, 1, 2, 2, dtype=torch.float64).float()
    ctx, neg = torch.full((2, 4, 3), a_c), torch.full((2, 4, 3), a_u)
    x = teacher_euler_sample(model, noise, ctx, wan_sampling_grid(steps, shift), neg, g)
    factor = 1.0
    for s, s_next in zip(sig[:-1], sig[1:]):
        factor *= 1 + (s_next - s) * (a_u + g * (a_c - a_u))
    torch.testing.assert_close(x, noise * factor, rtol=1e-5, atol=1e-6)
    assert [float(t[0]) for t, _ in model.calls[::2]] == pytest.approx(1000 * sig[:-1], rel=1e-12)
    assert all(t.dtype == torch.float64 for t, _ in model.calls)
    assert all(torch.equal(c, torch.tensor([a_c, a_c])) for _, c in model.calls[::2])  # cond, then uncond
    assert all(torch.equal(c, torch.tensor([a_u, a_u])) for _, c in model.calls[1::2])


def test_noise_depends_on_seed_and_index_only():
    assert torch.equal(sample_noise((2, 3), 7, 5), sample_noise((2, 3), 7, 5))
    assert not torch.equal(sample_noise((2, 3), 7, 5), sample_noise((2, 3), 7, 6))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny")).eval()  # PyTorch default init: a non-zero head
    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    model.save_pretrained(path)
    return model, path


PROMPTS = [SyntheticTask().sample(i, 0).prompt for i in range(6)]
LATENT = (16, 2, 4, 4)


def test_kd_pairs_hold_noise_and_its_ode_result(teacher, tmp_path):
    model, _ = teacher
    task = SyntheticTask(text_dim=model.config.text_dim)
    neg = task.encode_text("")
    n = generate_teacher_data(model, PROMPTS[:3], task.encode_prompts, neg, tmp_path, latent_shape=LATENT, steps=3,
                              guidance=4.0, shift=3.0, seed=9, batch_size=2, samples_per_shard=2, save_noise=True,
                              dtype=torch.float32, prefix="kd", progress=False)
    assert n == 3
    text_len = model.config.text_len
    got = list(make_loader(tmp_path, 1, backend="torch", text_len=text_len, num_epochs=1))
    assert sorted(b["meta"][0]["index"] for b in got) == [0, 1, 2]
    for b in got:
        i = b["meta"][0]["index"]
        assert torch.equal(b["noise"][0], sample_noise(LATENT, 9, i))
        assert torch.equal(b["context"][0], pad_context(task.encode_text(PROMPTS[i]), text_len))
        ref = teacher_euler_sample(model, b["noise"], b["context"], wan_sampling_grid(3, 3.0),
                                   pad_context(neg, text_len)[None], 4.0)
        torch.testing.assert_close(b["latent"], ref, rtol=1e-5, atol=1e-5)
        assert b["prompt"][0] == PROMPTS[i]


def test_bf16_autocast_teacher_stays_close_to_fp32(teacher, tmp_path):
    model, _ = teacher
    task = SyntheticTask(text_dim=model.config.text_dim)
    kw = dict(latent_shape=LATENT, steps=3, seed=2, dtype=torch.float32, progress=False, samples_per_shard=2)
    for name, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
        generate_teacher_data(model, PROMPTS[:2], task.encode_prompts, task.encode_text(""), tmp_path / name,
                              autocast=autocast, **kw)
    a, b = (next(make_loader(tmp_path / n, 2, backend="torch", text_len=64))["latent"] for n in ("fp32", "bf16"))
    err = float((a - b).abs().max() / a.abs().max())
    assert 0 < err < 3e-2  # bf16 compute really ran, and stayed at bf16 accuracy


@pytest.mark.multirank
def test_two_rank_cli_equals_single_process(teacher, tmp_path):
    model, ckpt = teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["teacher", str(prompts), str(tmp_path / "dist"), "--teacher", str(ckpt), "--text-encoder", "synthetic",
            "--latent-shape", ",".join(map(str, LATENT)), "--steps", "2", "--guidance", "3", "--seed", "4",
            "--samples-per-shard", "2", "--dtype", "fp32", "--no-progress", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "tmd_megatron.cli.preprocess", *args]
    # Own session, so a hang kills torchrun and both ranks together.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "rank 0: wrote 4 samples" in out and "rank 1: wrote 2 samples" in out

    task = SyntheticTask(text_dim=model.config.text_dim)
    generate_teacher_data(model, PROMPTS, task.encode_prompts, task.encode_text(""), tmp_path / "single",
                          latent_shape=LATENT, steps=2, guidance=3.0, seed=4, samples_per_shard=2, batch_size=1,
                          dtype=torch.float32, progress=False)
    assert sorted(p.name for p in (tmp_path / "dist").glob("*.tar")) == \
        sorted(p.name for p in (tmp_path / "single").glob("*.tar"))
    text_len = model.config.text_len
    dist = list(make_loader(tmp_path / "dist", 3, backend="torch", text_len=text_len, num_epochs=1, seed=1))
    single = list(make_loader(tmp_path / "single", 3, backend="torch", text_len=text_len, num_epochs=1, seed=1))
    for a, b in zip(dist, single):
        assert a["key"] == b["key"] and a["prompt"] == b["prompt"] and torch.equal(a["context"], b["context"])
        torch.testing.assert_close(a["latent"], b["latent"], rtol=1e-5, atol=1e-5)  # batched 2 vs 1: ulp-level
