"""Synthetic text-to-video task for CPU runs and the quality benchmark.

A clip shows one shape of a given size and colour moving in a given direction on a black background; its prompt
names the four attributes ("a large red circle moving left"). The "latent" is the clip itself, folded 2x2 in
space (3 colours x 4 = 12 channels at half resolution) and lifted to 16 channels by a fixed orthonormal
projection, so `decode_latent` inverts `encode_clip` exactly and a tiny Wan sees latents of the usual layout
([16, 3, 8, 8] by default: 48 tokens). The text encoder is a fixed embedding table over the task's vocabulary with
an EOS row, like a T5 output trimmed to its true length. Everything derives from (seed, sample index) and
SYNTHETIC_VERSION: change the generator's output only together with a version bump. `scale` multiplies the
geometry (radii and speed; size is given separately): scale 2 on 32x32 clips draws the same scenes at twice the
resolution, so a shape spans several 4x4-pixel tokens and its outline is fine detail the model must draw; scale 1
is the original task, unchanged.

Image-conditioned mode (I2V/TI2V, `image_condition`): the first frame is given, the motion is to be generated.
Like Wan's I2V input, the conditioning latent is the encoding of the first frame followed by zero (mid-grey)
frames; the "CLIP" tokens are fixed random projections of the frame pooled to 4 x 4 cells, one per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .format import ShardWriter, index_path

SYNTHETIC_VERSION = 1
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("square", "circle", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow"),
    "motion": ("left", "right", "up", "down"),
    "size": ("small", "large"),
}
RGB = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (row, column) per frame, times speed
RADIUS = {"small": 2.5, "large": 4.5}
SPEED = 2.0  # pixels per frame
VOCAB = ("<pad>", "</s>", "a", "moving", *sorted({w for words in ATTRIBUTES.values() for w in words}))
# Brings the projected clip to unit variance overall (seed 0, 2048 samples: std 1.00, per channel 0.53-1.50).
LATENT_SCALE = 2.33
_PROJECTION_SEED = 9_000 + SYNTHETIC_VERSION
_TEXT_SEED = 7_000 + SYNTHETIC_VERSION
_IMAGE_SEED = 5_000 + SYNTHETIC_VERSION
IMAGE_CELLS = 4  # the image tokens read the first frame average-pooled to 4 x 4 cells


@dataclass
class SyntheticSample:
    clip: torch.Tensor  # [3, F, S, S] in [-1, 1]
    labels: dict[str, str]
    prompt: str


def prompt_for(labels: dict[str, str]) -> str:
    return f"a {labels['size']} {labels['colour']} {labels['shape']} moving {labels['motion']}"


def shape_mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, r: float) -> torch.Tensor:
    """Pixels (offsets dy, dx from the centre) covered by a shape of radius r."""
    if shape == "square":
        return (dy.abs() <= r) & (dx.abs() <= r)
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "triangle":  # apex up, base at dy = r
        return (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    raise ValueError(f"unknown shape {shape!r}; choose one of {ATTRIBUTES['shape']}")


class SyntheticTask:
    """Clips, prompts, latents and text embeddings of the synthetic task (see the module docstring)."""

    def __init__(self, frames: int = 3, size: int = 16, text_dim: int = 32, image_dim: int | None = None,
                 image_len: int = 5, scale: int = 1):
        if scale < 1:
            raise ValueError(f"scale={scale} must be a positive integer")
        if size % 2 or size < 12 * scale:
            raise ValueError(f"size={size} must be even and at least {12 * scale} (a large shape spans "
                             f"{9 * scale} pixels at scale {scale})")
        if frames < 2:
            raise ValueError(f"frames={frames}: motion needs at least 2 frames")
        self.frames, self.size, self.text_dim, self.scale = frames, size, text_dim, scale
        g = torch.Generator().manual_seed(_PROJECTION_SEED)
        q, _ = torch.linalg.qr(torch.randn(16, 12, generator=g, dtype=torch.float64))
        self.projection = q.float()  # [16, 12], orthonormal columns
        g = torch.Generator().manual_seed(_TEXT_SEED)
        table = torch.randn(len(VOCAB), text_dim, generator=g)
        table[0] = 0  # <pad> is never emitted; kept zero like a padded T5 row
        self.text_table = table
        self.latent_shape = (16, frames, size // 2, size // 2)
        self.image_dim, self.image_len = image_dim, image_len
        if image_dim is not None:
            g = torch.Generator().manual_seed(_IMAGE_SEED)
            cells = 3 * IMAGE_CELLS * IMAGE_CELLS
            self.image_projection = torch.randn(image_len, image_dim, cells, generator=g) / cells**0.5

    # ---- clips -------------------------------------------------------------------------------------------------
    def draw_labels(self, rng: np.random.Generator) -> dict[str, str]:
        return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}

    def render(self, labels: dict[str, str], start: tuple[float, float]) -> torch.Tensor:
        f = torch.arange(self.frames, dtype=torch.float32).view(-1, 1, 1)
        ys = torch.arange(self.size, dtype=torch.float32).view(1, -1, 1)
        xs = torch.arange(self.size, dtype=torch.float32).view(1, 1, -1)
        sy, sx = STEP[labels["motion"]]
        speed = SPEED * self.scale
        cy, cx = start[0] + speed * sy * f, start[1] + speed * sx * f
        mask = shape_mask(labels["shape"], ys - cy, xs - cx, RADIUS[labels["size"]] * self.scale)  # [F, S, S]
        colour = torch.tensor(RGB[labels["colour"]]).view(3, 1, 1, 1)
        return torch.where(mask.unsqueeze(0), colour, torch.full_like(colour, -1.0))

    def sample(self, index: int, seed: int) -> SyntheticSample:
        rng = np.random.default_rng([seed, index])
        labels = self.draw_labels(rng)
        r = RADIUS[labels["size"]] * self.scale
        travel = SPEED * self.scale * (self.frames - 1)
        sy, sx = STEP[labels["motion"]]
        # Start so the whole shape stays inside the frame for the whole clip.
        lo = [r + (travel if s < 0 else 0) for s in (sy, sx)]
        hi = [self.size - 1 - r - (travel if s > 0 else 0) for s in (sy, sx)]
        start = tuple(float(rng.uniform(a, b)) for a, b in zip(lo, hi))
        return SyntheticSample(self.render(labels, start), labels, prompt_for(labels))

    def clips(self, num: int, seed: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Clips [num, 3, F, S, S] and label ids [num, 4] (columns in ATTRIBUTES order) for classifiers."""
        samples = [self.sample(first + i, seed) for i in range(num)]
        ids = [[ATTRIBUTES[k].index(s.labels[k]) for k in ATTRIBUTES] for s in samples]
        return torch.stack([s.clip for s in samples]), torch.tensor(ids, dtype=torch.int64)

    # ---- latents -------------------------------------------------------------------------------------------------
    def encode_clip(self, clip: torch.Tensor) -> torch.Tensor:
        """[..., 3, F, S, S] in [-1, 1] -> latent [..., 16, F, S/2, S/2]."""
        *lead, _, f, s, _ = clip.shape
        x = (clip + 1).reshape(-1, 3, f, s // 2, 2, s // 2, 2).permute(0, 1, 4, 6, 2, 3, 5)  # [N,3,py,px,F,h,w]
        z = LATENT_SCALE * torch.einsum("kc,ncfhw->nkfhw", self.projection, x.reshape(-1, 12, f, s // 2, s // 2))
        return z.reshape(*lead, 16, f, s // 2, s // 2)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Exact inverse of encode_clip on its range (least squares elsewhere)."""
        *lead, _, f, h, w = latent.shape
        x = torch.einsum("kc,nkfhw->ncfhw", self.projection, latent.float().reshape(-1, 16, f, h, w)) / LATENT_SCALE
        x = x.reshape(-1, 3, 2, 2, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)  # [N, 3, F, h, py, w, px]
        return x.reshape(*lead, 3, f, 2 * h, 2 * w) - 1

    # ---- image conditioning ---------------------------------------------------------------------------------
    def image_condition(self, frame: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first frame(s) [..., 3, S, S] in [-1, 1] -> {"cond": the latent of (frame, then zero frames)
        [..., 16, F, S/2, S/2], "clip": image tokens [..., image_len, image_dim] (when the task has image_dim)}."""
        clip = torch.cat([frame.unsqueeze(-3), torch.zeros_like(frame).unsqueeze(-3).expand(
            *frame.shape[:-2], self.frames - 1, *frame.shape[-2:])], dim=-3)
        out = {"cond": self.encode_clip(clip)}
        if self.image_dim is not None:
            lead = frame.shape[:-3]
            cells = torch.nn.functional.adaptive_avg_pool2d(frame.reshape(-1, 3, *frame.shape[-2:]), IMAGE_CELLS)
            tokens = torch.tanh(torch.einsum("ndc,bc->bnd", self.image_projection, cells.flatten(1)))
            out["clip"] = tokens.reshape(*lead, self.image_len, self.image_dim)
        return out

    # ---- text ----------------------------------------------------------------------------------------------------
    def encode_text(self, prompt: str) -> torch.Tensor:
        """[words + 1, text_dim]: one table row per word, then EOS; "" gives the EOS row alone (negative prompt)."""
        words = prompt.lower().split()
        unknown = sorted(set(words) - set(VOCAB[2:]))
        if unknown:
            raise ValueError(f"words {unknown} are not in the synthetic vocabulary {VOCAB[2:]}")
        return self.text_table[[VOCAB.index(w) for w in words] + [VOCAB.index("</s>")]].clone()

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        return [self.encode_text(p) for p in prompts]

    # ---- shards --------------------------------------------------------------------------------------------------
    def meta(self, index: int, seed: int, labels: dict[str, str]) -> dict:
        return {"task": "synthetic", "version": SYNTHETIC_VERSION, "seed": seed, "index": index,
                "frames": self.frames, "size": self.size, "scale": self.scale, "labels": labels,
                "label_ids": {k: ATTRIBUTES[k].index(v) for k, v in labels.items()}}

    def write_shards(self, out_dir, num_samples: int, seed: int, samples_per_shard: int = 256,
                     dtype: torch.dtype = torch.float32, progress: bool = False, image: bool = False) -> list[Path]:
        """Shards `synthetic-{k:06d}.tar` of samples [k·S, (k+1)·S); finished shards are kept (resumable).
        image: also the first frame's conditioning latent and image tokens (`image_condition`)."""
        out_dir = Path(out_dir)
        paths = []
        num_shards = -(-num_samples // samples_per_shard)
        for k in tqdm(range(num_shards), desc="synthetic shards", disable=not progress):
            path = out_dir / f"synthetic-{k:06d}.tar"
            paths.append(path)
            if index_path(path).exists():
                continue
            with ShardWriter(path) as w:
                for i in range(k * samples_per_shard, min(num_samples, (k + 1) * samples_per_shard)):
                    s = self.sample(i, seed)
                    cond = self.image_condition(s.clip[:, 0]) if image else {}
                    w.add(f"{i:09d}", self.encode_clip(s.clip).to(dtype), self.encode_text(s.prompt).to(dtype),
                          s.prompt, self.meta(i, seed, s.labels), **{k: v.to(dtype) for k, v in cond.items()})
        return paths
