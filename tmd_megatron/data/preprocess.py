"""Videos + prompts -> shards of Wan VAE latents and umT5 embeddings (`tmd-preprocess videos`).

Videos are read with PyAV, `num_frames` frames taken evenly over the clip (all of them when the clip has exactly
that many, as Wan's own 81-frame outputs do), resized to cover (height, width) and centre-cropped, scaled to
[-1, 1] and encoded by diffusers' AutoencoderKLWan (the Wan2.1 VAE's 16 channels or the Wan2.2 VAE's 48); the
posterior mean is normalised per channel with the VAE's mean/std (WAN_SPEC §4). Prompts go through
`PromptEncoder` (Wan's text rule). For image-to-video models (`i2v=True`) each sample also gets the conditioning
latent, the VAE latent of its first frame followed by zero frames (Wan2.1 wan/image2video.py), and with an image
encoder the CLIP tokens of that frame (`ClipImageEncoder`: diffusers' WanImageToVideoPipeline.encode_image, the
penultimate hidden state of transformers' CLIPVisionModel). TI2V needs nothing extra: its condition is the
latent's own first frame. Work is split into shards of
`samples_per_shard` manifest entries; shard k belongs to rank k mod world_size, and a shard whose index exists is
finished and skipped, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .format import ShardWriter, index_path
from .text import PromptEncoder

log = logging.getLogger(__name__)

WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class PreprocessError(ValueError):
    pass


def check_video_size(num_frames: int, height: int, width: int, spatial_stride: int = 8) -> None:
    problems = []
    if num_frames % 4 != 1:
        problems.append(f"num_frames={num_frames} must be 4n+1 (the Wan VAE keeps frame 0 and packs 4 per latent)")
    multiple = 2 * spatial_stride
    if height % multiple or width % multiple:
        problems.append(f"height={height}, width={width} must be multiples of {multiple} (VAE stride "
                        f"{spatial_stride} x DiT patch 2)")
    if problems:
        raise PreprocessError("; ".join(problems))


def read_video(path, num_frames: int, height: int, width: int) -> torch.Tensor:
    """[3, num_frames, height, width] float32 in [-1, 1]."""
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, OSError, IndexError) as err:
        raise PreprocessError(f"cannot decode video {path}: {err}") from None
    if len(frames) < num_frames:
        raise PreprocessError(f"video {path} has {len(frames)} frames, fewer than num_frames={num_frames}")
    pick = torch.linspace(0, len(frames) - 1, num_frames).round().long().tolist()
    x = torch.stack([torch.from_numpy(frames[i]) for i in pick]).permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    # Cover the target, leaving an even margin so the centre crop is exactly centred (<= 1 pixel of stretch).
    size = (height + 2 * round((h * scale - height) / 2), width + 2 * round((w * scale - width) / 2))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def read_image(path, height: int, width: int) -> torch.Tensor:
    """[3, height, width] float32 in [-1, 1]: an image file (PNG, JPEG, ...; decoded by PyAV), resized to cover and
    centre-cropped like a video frame."""
    try:
        return read_video(path, 1, height, width)[:, 0]
    except PreprocessError as err:
        raise PreprocessError(str(err).replace("video", "image")) from None


class WanVAE:
    """AutoencoderKLWan with Wan's latent normalisation: encode -> (mean - μ_c)/σ_c, decode inverts it.

    μ, σ: the VAE config's latents_mean/std (diffusers stores Wan2.1's and Wan2.2's there), else Wan2.1's."""

    def __init__(self, vae, device="cpu", dtype: torch.dtype = torch.float32):
        z = vae.config.z_dim
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is None or len(mean) != z or std is None or len(std) != z:
            if z != len(WAN_LATENT_MEAN):
                raise PreprocessError(f"the VAE has z_dim={z} but its config gives no latents_mean/latents_std of "
                                      f"that length; Wan2.1's built-in normalisation is for 16 channels")
            mean, std = WAN_LATENT_MEAN, WAN_LATENT_STD
        vae = vae.to(device).eval()
        if next(vae.parameters()).dtype != dtype:
            vae = vae.to(dtype)
        self.vae, self.device, self.dtype = vae, torch.device(device), dtype
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.spatial_stride = int(getattr(vae.config, "scale_factor_spatial", None) or 8)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "WanVAE":
        from diffusers import AutoencoderKLWan

        if not Path(path).is_dir():  # diffusers would take the name for a hub repository
            raise PreprocessError(f"VAE folder {path} does not exist: give the local AutoencoderKLWan folder "
                                  "(e.g. <Wan2.1-T2V-14B-Diffusers>/vae; nothing is downloaded)")
        return cls(AutoencoderKLWan.from_pretrained(str(path), local_files_only=True), **kwargs)

    @torch.no_grad()
    def encode(self, video_B_3_F_H_W: torch.Tensor) -> torch.Tensor:
        mu = self.vae.encode(video_B_3_F_H_W.to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent_B_C_F_H_W: torch.Tensor) -> torch.Tensor:
        z = latent_B_C_F_H_W.float() * self.std + self.mean
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float().cpu()

    def encode_first_frame(self, video_B_3_F_H_W: torch.Tensor) -> torch.Tensor:
        """The I2V conditioning latent: the encoding of each video's first frame followed by zero frames."""
        first = video_B_3_F_H_W[:, :, :1]
        return self.encode(torch.cat([first, torch.zeros_like(video_B_3_F_H_W[:, :, 1:])], dim=2))


class ClipImageEncoder:
    """CLIP image tokens of a frame as Wan2.1 I2V reads them: transformers' CLIPVisionModel (ViT-H/14 for the
    released models, 257 x 1280) with its CLIPImageProcessor, penultimate hidden state (diffusers'
    WanImageToVideoPipeline.encode_image)."""

    def __init__(self, processor, model, device="cpu", dtype: torch.dtype = torch.float32):
        self.processor, self.model = processor, model.to(device, dtype).eval()
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "ClipImageEncoder":
        from transformers import CLIPImageProcessor, CLIPVisionModel

        return cls(CLIPImageProcessor.from_pretrained(str(path)), CLIPVisionModel.from_pretrained(str(path)), **kwargs)

    @torch.no_grad()
    def __call__(self, frames_B_3_H_W: torch.Tensor) -> torch.Tensor:
        # back to the video's 8-bit pixels, which the processor resizes, crops and normalises like any image
        pixels = ((frames_B_3_H_W.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        pixels = self.processor(images=list(pixels.cpu().numpy()), return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2].float().cpu()

def read_manifest(path) -> list[dict]:
    """JSON lines {"video": path (relative to the manifest's folder), "prompt": str, "key": optional str}."""
    path = Path(path)
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            entry = {"video": str(path.parent / e["video"]), "prompt": str(e["prompt"])}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PreprocessError(f"{path}:{n}: expected {{\"video\": ..., \"prompt\": ...}} ({err})") from None
        if "key" in e:
            entry["key"] = str(e["key"])
        entries.append(entry)
    return entries


def claim_output(out_dir: Path, settings: dict) -> None:
    """Record the run's settings; a rerun into the same folder must use the same ones (it resumes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "preprocess.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old != settings:
            changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
            raise PreprocessError(f"{out_dir} holds a run with other settings ({changed}); resume with the same "
                                  f"inputs and settings, or write to a new folder")
    else:
        tmp = record.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
        tmp.replace(record)


def entries_digest(entries: list[dict]) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def my_shards(num_entries: int, samples_per_shard: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, -(-num_entries // samples_per_shard), world_size))


def preprocess_videos(entries: list[dict], out_dir, vae: WanVAE, prompt_encoder: PromptEncoder, *,
                      num_frames: int, height: int, width: int, batch_size: int = 4, samples_per_shard: int = 256,
                      dtype: torch.dtype = torch.bfloat16, rank: int = 0, world_size: int = 1,
                      on_error: str = "raise", progress: bool = True, i2v: bool = False,
                      image_encoder: ClipImageEncoder | None = None) -> dict:
    """Write shards `shard-{k:06d}.tar` for this rank; returns {"written", "skipped_shards", "failed"}.
    i2v: also the first frame's conditioning latent; image_encoder: also its CLIP tokens (Wan2.1 I2V)."""
    check_video_size(num_frames, height, width, vae.spatial_stride)
    if image_encoder is not None and not i2v:
        raise PreprocessError("CLIP image tokens are for image-to-video data: add --i2v")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; choose 'raise' or 'skip'")
    out_dir = Path(out_dir)
    if rank == 0:
        claim_output(out_dir, {"kind": "videos", "entries": entries_digest(entries), "num_entries": len(entries),
                               "num_frames": num_frames, "height": height, "width": width,
                               "samples_per_shard": samples_per_shard, "dtype": str(dtype),
                               "text_len": prompt_encoder.text_len, "i2v": i2v, "clip": image_encoder is not None})
    shards = my_shards(len(entries), samples_per_shard, rank, world_size)
    todo = [k for k in shards if not index_path(out_dir / f"shard-{k:06d}.tar").exists()]
    stats = {"written": 0, "skipped_shards": len(shards) - len(todo), "failed": []}
    total = sum(len(range(k * samples_per_shard, min(len(entries), (k + 1) * samples_per_shard))) for k in todo)
    bar = tqdm(total=total, desc=f"preprocess rank {rank}", unit="video", disable=not progress)
    for k in todo:
        ids = range(k * samples_per_shard, min(len(entries), (k + 1) * samples_per_shard))
        with ShardWriter(out_dir / f"shard-{k:06d}.tar") as writer:
            for start in range(0, len(ids), batch_size):
                batch = []
                for i in ids[start:start + batch_size]:
                    try:
                        batch.append((i, read_video(entries[i]["video"], num_frames, height, width)))
                    except PreprocessError as err:
                        if on_error == "raise":
                            raise
                        log.warning("skipping entry %d: %s", i, err)
                        stats["failed"].append(i)
                if batch:
                    videos = torch.stack([v for _, v in batch])
                    latents = vae.encode(videos)
                    contexts = prompt_encoder([entries[i]["prompt"] for i, _ in batch])
                    extra = {}
                    if i2v:
                        extra["cond"] = vae.encode_first_frame(videos)
                    if image_encoder is not None:
                        extra["clip"] = image_encoder(videos[:, :, 0])
                    for j, ((i, _), lat, ctx) in enumerate(zip(batch, latents, contexts)):
                        e = entries[i]
                        writer.add(e.get("key", f"{i:09d}"), lat.to(dtype), ctx.to(dtype), e["prompt"],
                                   {"source": "video", "video": Path(e["video"]).name, "entry": i},
                                   **{k: v[j].to(dtype) for k, v in extra.items()})
                        stats["written"] += 1
                bar.update(len(ids[start:start + batch_size]))
    bar.close()
    return stats
