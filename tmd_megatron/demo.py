"""`make demo`: the main job on its embedded default, a tiny TMD distillation on CPU, end to end.

1. a tiny Wan teacher learns the synthetic text-to-video task by flow matching (experiment=tiny_teacher);
2. TMD stage 1, transition matching MeanFlow, from the teacher (experiment=tiny_tmd method=tm_mf);
3. TMD stage 2, DMD2-v with flow-head rollout, from the stage-1 student (experiment=tiny_tmd method=tmd);
   and the DMD2-v baseline from the teacher (experiment=tiny_dmd2v) under the same budget;
4. sampling: each generator's videos for a few prompts (mp4 previews through the task's exact decoder), with the
   effective NFE measured by counting block evaluations.
Everything lands in runs/demo/. Budgets are small: this shows the machinery, not the paper's quality.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

from tmd_megatron.data.synthetic import SyntheticTask
from tmd_megatron.models.wan import WanModel
from tmd_megatron.parallel import Topology
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.export import load_student
from tmd_megatron.training.metrics import read_metrics
from tmd_megatron.training.sampling import SamplerConfig, sample
from tmd_megatron.training.trainer import Trainer

PROMPTS = ["red circle moving left", "blue square moving up", "green triangle moving right", "yellow cross moving down"]


def _train(name: str, overrides: list[str], out: Path, log) -> dict:
    res = resolve(compose([*overrides, f"run.out_dir={out / name}", "run.resume=never", "run.log_every=25"]))
    t0 = time.monotonic()
    Trainer(res, Topology.single(), stream=log).fit()
    last = read_metrics(out / name / "metrics.jsonl")[-1]
    loss = {k: v for k, v in last.items() if k.endswith("loss") or k in ("vsd",)}
    return {"stage": name, "method": res.method, "steps": res.max_steps, "seconds": time.monotonic() - t0, "last": loss}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tmd-demo", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (e.g. 0.1 for a smoke run)")
    a = p.parse_args(argv)
    out, scale = Path(a.out), a.scale
    # Tiny models: one intra-op thread is about as fast as two and immune to oversubscription when the machine is
    # shared (two processes spinning two OpenMP threads each on two cores slowed steps ~100x here).
    torch.set_num_threads(1)
    log = io.StringIO()
    steps = lambda n: f"run.max_steps={max(2, int(n * scale))}"  # noqa: E731
    t_all = time.monotonic()
    teacher = out / "teacher" / "export"
    rows = [_train("teacher", ["experiment=tiny_teacher", steps(1500), "data.global_batch=16"], out, log)]
    stage1 = ["experiment=tiny_tmd", f"model.teacher={teacher}"]
    rows.append(_train("tmd_stage1", [*stage1, "method=tm_mf", steps(300)], out, log))
    rows.append(_train("tmd_stage2", [*stage1, "method=tmd", f"model.init={out / 'tmd_stage1' / 'export'}", steps(120)],
                       out, log))
    rows.append(_train("dmd2v", ["experiment=tiny_dmd2v", f"model.teacher={teacher}", steps(120)], out, log))

    task = SyntheticTask(text_dim=32)
    ctx = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, 8 - c.shape[0])) for c in task.encode_prompts(PROMPTS)])
    negative = task.encode_text("")
    generators = [
        ("teacher (Euler, CFG 5)", "teacher", WanModel.from_pretrained(teacher), SamplerConfig(teacher_steps=50)),
        ("TMD N2H1, M=2", "tmd", load_student(out / "tmd_stage2" / "export"), SamplerConfig(outer_steps=2, inner_steps=2)),
        ("DMD2-v, M=2", "dmd2v", WanModel.from_pretrained(out / "dmd2v" / "export"), SamplerConfig(outer_steps=2)),
    ]
    from tmd_megatron.cli.sample import _write_mp4

    sampled = []
    for label, kind, model, cfg in generators:
        t0 = time.monotonic()
        x, nfe = sample(kind, model, ctx, negative, task.latent_shape, cfg, seed=0)
        seconds = time.monotonic() - t0
        videos = task.decode_latent(x)
        folder = out / "samples" / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(PROMPTS)):
            _write_mp4(folder / f"{i}.mp4", videos[i])
        # the latent the task would give for the prompt's own clip is unknown (random start); report the spread
        sampled.append((label, nfe, seconds / len(PROMPTS), float(x.std())))

    print("\ntraining (single CPU process, synthetic text-to-video task)")
    print(f"  {'stage':<12} {'method':<14} {'steps':>6} {'seconds':>8}  last logged losses")
    for r in rows:
        losses = ", ".join(f"{k}={v:.4g}" for k, v in r["last"].items())
        print(f"  {r['stage']:<12} {r['method']:<14} {r['steps']:>6} {r['seconds']:>8.1f}  {losses}")
    print("\nsampling (4 prompts; effective NFE measured by counting DiT block calls)")
    print(f"  {'generator':<24} {'eff. NFE':>8} {'s/sample':>9} {'latent std':>11}")
    for label, nfe, sec, std in sampled:
        print(f"  {label:<24} {nfe:>8.2f} {sec:>9.3f} {std:>11.3f}")
    print(f"\nvideos: {out / 'samples'}/<generator>/<i>.mp4 (prompts: {json.dumps(PROMPTS)})")
    print(f"done in {time.monotonic() - t_all:.0f} s")


if __name__ == "__main__":
    main()
