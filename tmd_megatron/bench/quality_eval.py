"""Scoring for `make bench-quality`: the evaluation prompts, each generator's samples (the `tmd-sample` code) and
their scores, the teacher's, and the one-time preparation (training shards, negative prompt, attribute classifier
and the real-clip reference). `cfg` is a bench.quality.QualityConfig."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tmd_megatron.data.synthetic import ATTRIBUTES, SyntheticTask

from .scores import AttributeClassifier, RealReference, score_clips, train_classifier

EVAL_SEED = 777  # the sample seed of the evaluation prompts (unseen in training: seed 0)


def synthetic_task(cfg) -> SyntheticTask:
    return SyntheticTask(frames=cfg.frames, size=cfg.size, text_dim=32, scale=cfg.scale)


def eval_prompts(cfg, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts [n, words+1, 32] and label ids [n, 4] of the first `count` (all) evaluation prompts."""
    task = synthetic_task(cfg)
    samples = [task.sample(i, EVAL_SEED) for i in range(cfg.eval_prompts if count is None else count)]
    ids = torch.tensor([[ATTRIBUTES[k].index(s.labels[k]) for k in ATTRIBUTES] for s in samples])
    return torch.stack([task.encode_text(s.prompt) for s in samples]), ids


def generate(cfg, kind: str, path: str, seed: int, method: tuple | None = None,
             count: int | None = None) -> tuple[torch.Tensor, float]:
    """Latents for the (first `count`) evaluation prompts from one generator (training/sampling.sample, the
    `tmd-sample` code: the same noise for every generator at a seed), and its measured effective NFE."""
    from tmd_megatron.models.wan import WanModel
    from tmd_megatron.training.export import load_student
    from tmd_megatron.training.sampling import SamplerConfig, sample

    task = synthetic_task(cfg)
    ctx, _ = eval_prompts(cfg, count)
    if kind == "teacher":
        model = WanModel.from_pretrained(path)
        sampler = SamplerConfig(teacher_steps=cfg.teacher_sampling_steps, teacher_shift=cfg.sampling_shift,
                                cfg_scale=cfg.guidance)
    else:  # the grids the students were distilled for (the recipes keep the paper's shifts and t_max)
        model = WanModel.from_pretrained(path) if kind == "dmd2v" else load_student(path)
        sampler = SamplerConfig(outer_steps=method[1], inner_steps=method[2] if kind == "tmd" else 1)
    return sample(kind, model.eval(), ctx, task.encode_text(""), task.latent_shape, sampler, seed=10_000 + seed)


def evaluate(cfg, out: Path, kind: str, path: str, seed: int, method: tuple | None = None) -> dict:
    """Scores of one generator on the evaluation prompts with this seed's noise."""
    ref = torch.load(out / "classifier.pt", weights_only=True)
    clf = AttributeClassifier(cfg.frames)
    clf.load_state_dict(ref["state"])
    real = RealReference(ref["feats"], ref["scale"])
    latents, nfe = generate(cfg, kind, path, seed, method)
    _, ids = eval_prompts(cfg)
    s = score_clips(clf.eval(), real, synthetic_task(cfg).decode_latent(latents), ids)
    return {"nfe": nfe, "overall": s.overall, "quality": s.quality, "semantic": s.semantic, "fd": s.fd,
            **{f"sem_{k}": v for k, v in s.per_attribute.items()}}


def prepare(cfg, out: Path, log) -> dict:
    """Training shards, the negative-prompt embedding, the classifier and the real-clip reference."""
    task = synthetic_task(cfg)
    task.write_shards(out / "data", cfg.train_clips, seed=0, samples_per_shard=max(1, cfg.train_clips // 4))
    torch.save(task.encode_text(""), out / "negative.pt")
    t0 = time.time()
    clf = train_classifier(task, num_clips=max(64, cfg.train_clips), steps=cfg.classifier_steps)
    real = RealReference.build(clf, task, max(64, 4 * cfg.eval_prompts), seed=123)
    torch.save({"state": clf.state_dict(), "feats": real.feats, "scale": real.scale}, out / "classifier.pt")
    # The instrument's ceiling: real clips of the evaluation prompts' seed scored like generated ones.
    clips, ids = task.clips(cfg.eval_prompts, seed=EVAL_SEED)
    s = score_clips(clf, real, clips, ids)
    log(f"classifier trained in {time.time() - t0:.0f} s; real clips: {s.per_attribute}")
    return {"overall": s.overall, "quality": s.quality, "semantic": s.semantic, "fd": s.fd,
            **{f"sem_{k}": v for k, v in s.per_attribute.items()}}


def evaluate_teacher(cfg, out: Path, seed: int, teacher_dir: str) -> dict:
    t0 = time.time()
    return {**evaluate(cfg, out, "teacher", teacher_dir, seed), "wall": time.time() - t0}
