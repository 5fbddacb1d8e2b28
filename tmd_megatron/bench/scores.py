"""VBench-like scores for the synthetic task: attribute classifiers trained on real clips give a semantic score
(their accuracy on videos generated from prompts) and features for a quality score (Fréchet distance to real).

VBench splits its total into a quality score (how the videos look, prompt-agnostic) and a semantic score (whether
they show what the prompt asks for) and reports total = (4·quality + 1·semantic) / 5. Here:
- semantic = mean over the four attributes (shape, colour, motion, size) of the classifier accuracy on generated
  clips against the attributes named in their prompts, in %;
- quality = 100·exp(−FD / tr Σ_real): the Fréchet distance of the classifier's pooled features between generated
  and real clips, divided by the total variance of the real features (so the score does not depend on the
  feature scale; FD = 0 gives 100, an FD as large as the real feature variance gives 37);
- overall = (4·quality + semantic) / 5, VBench's weighting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmd_megatron.data.synthetic import ATTRIBUTES, SyntheticTask

QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0  # VBench: total = (4·quality + 1·semantic) / 5


class AttributeClassifier(nn.Module):
    """A small CNN over clips [B, 3, F, S, S] in [-1, 1] with one linear head per attribute.

    The frames are stacked as channels (3·F), so the first convolution already compares frames (motion
    direction) while staying a cheap 2-D network; global max pooling keeps small shapes from being averaged into
    the background. The pooled activations before the heads are the quality score's features (like I3D's
    for FVD).
    """

    def __init__(self, frames: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3 * frames, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * w, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, clips_B_3_F_S_S: torch.Tensor) -> torch.Tensor:
        return self.body(clips_B_3_F_S_S.flatten(1, 2)).amax(dim=(2, 3))

    def forward(self, clips_B_3_F_S_S: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(clips_B_3_F_S_S)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, clips: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(label ids [N, 4] in ATTRIBUTES order, features [N, 4·width] in float64), batched."""
        ids, feats = [], []
        for chunk in clips.split(batch):
            f = self.features(chunk.float())
            feats.append(f)
            ids.append(torch.stack([self.heads[n](f).argmax(-1) for n in ATTRIBUTES], 1))
        return torch.cat(ids), torch.cat(feats).double()


def train_classifier(task: SyntheticTask, num_clips: int = 8192, steps: int = 800, batch: int = 64, seed: int = 0,
                     noise_std: float = 0.2, width: int = 32) -> AttributeClassifier:
    """Fit on real clips (seed `seed`), with additive Gaussian noise as augmentation so that slightly imperfect
    generated clips are still read by their content rather than rejected on pixel statistics."""
    clips, ids = task.clips(num_clips, seed=10_000 + seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = AttributeClassifier(task.frames, width)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(0, num_clips, (batch,), generator=g)
        x = clips[idx]
        x = x + noise_std * torch.rand(batch, 1, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
        logits = clf(x)
        loss = sum(F.cross_entropy(logits[n], ids[idx, k]) for k, n in enumerate(ATTRIBUTES))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay: a clean final model in few steps
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    return clf.eval().requires_grad_(False)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a^½ Σ_b Σ_a^½)^½) of two feature sets [N, D] (float64).

    (Σ_a^½ Σ_b Σ_a^½)^½ has the same trace as (Σ_a Σ_b)^½ and is symmetric, so two eigendecompositions give it
    without a general matrix square root.
    """
    a, b = feats_a.double(), feats_b.double()
    mu = a.mean(0) - b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(mu @ mu + cov_a.trace() + cov_b.trace() - 2 * inner.clamp_min(0).sqrt().sum())


@dataclass
class RealReference:
    """The real clips' features (the quality reference) and their total variance (the FD scale)."""

    feats: torch.Tensor
    scale: float

    @classmethod
    def build(cls, clf: AttributeClassifier, task: SyntheticTask, num: int, seed: int) -> "RealReference":
        clips, _ = task.clips(num, seed=seed)
        _, feats = clf.predict(clips)
        return cls(feats, float(torch.cov(feats.T).trace()))


@dataclass
class Scores:
    quality: float
    semantic: float
    fd: float
    per_attribute: dict[str, float]

    @property
    def overall(self) -> float:
        return (QUALITY_WEIGHT * self.quality + SEMANTIC_WEIGHT * self.semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)


def score_clips(clf: AttributeClassifier, real: RealReference, clips: torch.Tensor, label_ids: torch.Tensor) -> Scores:
    """Scores of generated clips [N, 3, F, S, S] whose prompts named `label_ids` [N, 4]."""
    pred, feats = clf.predict(clips.clamp(-1, 1))
    per_attr = {n: 100.0 * float((pred[:, k] == label_ids[:, k]).double().mean()) for k, n in enumerate(ATTRIBUTES)}
    fd = frechet_distance(feats, real.feats)
    quality = 100.0 * math.exp(-fd / real.scale)
    return Scores(quality, sum(per_attr.values()) / len(per_attr), fd, per_attr)
