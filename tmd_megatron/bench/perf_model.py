"""Single-process performance ratios: our Wan DiT vs diffusers, FD vs exact JVP in a TM-MF step, sampling cost
against the effective NFE. Each returns rows for the markdown tables of `python -m tmd_megatron.bench.perf`."""
from __future__ import annotations

import torch

from tmd_megatron.models.wan import WanConfig, WanModel

from .timing import interleaved

# A Wan2.1-shaped DiT that fits a 2-core CPU: head dim 64, Wan's text encoder width and length.
DIT_CONFIG = WanConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=4, text_dim=4096, text_len=512, freq_dim=256)
DIT_LATENT = (16, 5, 16, 16)  # 5 x 8 x 8 = 320 video tokens
SMOKE_DIT_CONFIG = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=16, text_len=8, freq_dim=16)
SMOKE_DIT_LATENT = (16, 2, 4, 4)


def diffusers_twin(cfg: WanConfig, seed: int = 0):
    """diffusers' WanTransformer3DModel with `cfg`, and our WanModel holding the same weights."""
    from diffusers import WanTransformer3DModel

    from tmd_megatron.models.wan.keys import key_maps

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_positions,
    )
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on, but make every tensor non-trivial
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = WanModel(cfg)
    _, to_original = key_maps(ours.state_dict().keys())
    ours.load_state_dict({to_original[k]: v for k, v in ref.state_dict().items()})
    return ours, ref


def dit_vs_diffusers(reps: int, smoke: bool = False) -> dict:
    """Forward+backward (fp32, CPU) of our DiT and diffusers' on the same weights and inputs."""
    cfg, latent = (SMOKE_DIT_CONFIG, SMOKE_DIT_LATENT) if smoke else (DIT_CONFIG, DIT_LATENT)
    ours, ref = diffusers_twin(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *latent, generator=g)
    t = torch.tensor([700.0])
    ctx = torch.zeros(1, cfg.text_len, cfg.text_dim)  # Wan pads text with zeros to text_len; give both that
    ctx[:, : cfg.text_len // 4] = torch.randn(1, cfg.text_len // 4, cfg.text_dim, generator=g)
    probe = torch.randn(1, cfg.out_dim, *latent[1:], generator=g)

    def step(model, call):
        model.zero_grad(set_to_none=True)
        (call() * probe).sum().backward()

    with torch.no_grad():
        err = float((ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() / ref(x, t, ctx).sample.abs().max())
    times = interleaved({"ours": lambda: step(ours, lambda: ours(x, t, ctx)),
                         "diffusers": lambda: step(ref, lambda: ref(x, t, ctx).sample)}, reps)
    tokens = latent[1] * latent[2] * latent[3] // cfg.patch_volume
    return {"config": cfg, "tokens": tokens, "max_rel_diff": err, **times}


def fd_vs_exact_jvp(smoke: bool = False) -> dict:
    """The TM-MF step (forward+backward) with the FD-JVP engine vs torch.func.jvp: the algorithms helper's
    cost table (tmd_megatron.algorithms.bench_jvp), one thread, median CPU time."""
    from tmd_megatron.algorithms import bench_jvp

    if smoke:
        cfg, head_blocks, latent, repeats = WanConfig.preset("tiny"), 2, (2, 4, 4), 1
    else:
        cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=64, text_len=32, freq_dim=64)
        head_blocks, latent, repeats = 2, (3, 16, 16), 5
    teacher, student = bench_jvp.build(cfg, head_blocks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = bench_jvp.cost_table(teacher, student, latent, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"config": cfg, "head_blocks": head_blocks, "latent": latent, "costs": costs}


def sampling_cost(reps: int, smoke: bool = False) -> list[dict]:
    """Each sampler of `tmd-sample` (training/sampling.sample): the effective NFE it measures by counting block
    evaluations, Eq. 16's value, and its time per sample."""
    from tmd_megatron.algorithms import effective_nfe
    from tmd_megatron.models.student import DecoupledStudent, StudentConfig
    from tmd_megatron.training.sampling import SamplerConfig, sample

    if smoke:
        cfg, latent, batch, head, teacher_steps = WanConfig.preset("tiny"), (16, 2, 4, 4), 1, 1, 3
    else:
        cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=64, text_len=32, freq_dim=64)
        latent, batch, head, teacher_steps = (16, 3, 16, 16), 2, 2, 50
    torch.manual_seed(0)
    teacher = WanModel(cfg).eval()
    teacher.init_weights()
    with torch.no_grad():
        teacher.head.head.weight.normal_(0, 0.02)
    student = DecoupledStudent.from_teacher(teacher, StudentConfig(flow_head_blocks=head)).eval()
    ctx = torch.randn(batch, 8, cfg.text_dim, generator=torch.Generator().manual_seed(0))
    neg = torch.zeros(1, cfg.text_dim)
    L = cfg.num_layers
    cases = {f"teacher Euler {teacher_steps}x2 (CFG)": ("teacher", teacher, SamplerConfig(teacher_steps=teacher_steps),
                                                       2.0 * teacher_steps)}
    for m in (1, 2, 4):
        cases[f"DMD2-v M={m}"] = ("dmd2v", teacher, SamplerConfig(outer_steps=m), effective_nfe(m, 1, 0, L))
    for m in (1, 2):
        for n in (2, 4):
            cases[f"TMD M={m} N={n} H={head}"] = ("tmd", student, SamplerConfig(outer_steps=m, inner_steps=n),
                                                  effective_nfe(m, n, head, L))
    measured = {name: sample(kind, model, ctx, neg, latent, sc)[1] for name, (kind, model, sc, _) in cases.items()}
    times = interleaved({name: (lambda k=kind, mod=model, sc=sc: sample(k, mod, ctx, neg, latent, sc))
                         for name, (kind, model, sc, _) in cases.items()}, reps, warmup=0)
    return [{"sampler": name, "nfe": nfe, "measured_nfe": measured[name], "time_per_sample": times[name]["wall"] / batch}
            for name, (_, _, _, nfe) in cases.items()]
