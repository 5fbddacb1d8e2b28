"""tmd-sample: prompts -> latents -> videos with a trained model.

    tmd-sample runs/s2/export --prompts "a red circle moving left" --synthetic --out samples/
    tmd-sample /ckpt/tmd14b/export --prompts-file prompts.txt --umt5 /ckpt/umt5-xxl --tokenizer /ckpt/umt5 \\
               --vae /ckpt/Wan2.1-T2V-14B-Diffusers/vae --latent 16,21,60,104 --out samples/

The model directory is a TMD student export (student.json: Algorithm 1) or a Wan checkpoint (--sampler dmd2v for a
DMD2-v student, teacher for a teacher with 50-step CFG Euler; an A14B directory samples with both experts).
Latents are written as .pt; with --vae they are decoded by diffusers' Wan VAE to mp4 (PyAV); with --synthetic the
synthetic task's exact decoder gives a preview. Image-to-video models (I2V, TI2V) take the first frame with
--image (one image, or one per prompt): encoded by the synthetic task, or by --vae (and --image-encoder, the CLIP
model of Wan2.1 I2V).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch


def _write_mp4(path: Path, video_3_F_H_W: torch.Tensor, fps: int = 16) -> None:
    import av
    import numpy as np

    frames = ((video_3_F_H_W.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    scale = max(1, 256 // max(frames.shape[1:3]))  # tiny previews: upscale so players show them
    frames = np.repeat(np.repeat(frames, scale, 1), scale, 2)
    h, w = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _image_condition(a, p, cfg, task, latent, n: int):
    """The first frames' conditioning for the model, or None; bad combinations exit 2 naming the fix."""
    from tmd_megatron.data.preprocess import ClipImageEncoder, WanVAE, read_image
    from tmd_megatron.models.wan.conditioning import ImageCondition

    if not a.image:
        if cfg.model_type == "i2v":
            p.error("this is an image-to-video model: give the first frame with --image <file>")
        return None
    if cfg.model_type == "t2v":
        p.error("this is a text-to-video model: drop --image")
    if len(a.image) not in (1, n):
        p.error(f"give one --image for all prompts or one per prompt ({n}), not {len(a.image)}")
    paths = a.image * n if len(a.image) == 1 else a.image
    if task is not None:
        frames = torch.stack([read_image(q, task.size, task.size) for q in paths])
        parts = task.image_condition(frames)
        return ImageCondition.for_model(cfg, parts["cond"], parts.get("clip"))
    if not a.vae:
        p.error("encoding --image needs the VAE: add --vae <AutoencoderKLWan dir> (or --synthetic)")
    if cfg.image_dim is not None and not a.image_encoder:
        p.error("this Wan2.1 I2V model reads CLIP tokens of the image: add --image-encoder <CLIPVisionModel dir>")
    vae = WanVAE.from_pretrained(a.vae, device=a.device)
    _, f, h, w = latent
    frames = torch.stack([read_image(q, h * vae.spatial_stride, w * vae.spatial_stride) for q in paths])
    if cfg.model_type == "i2v":  # the first frame then zero frames, as many video frames as the latent holds
        video = torch.cat([frames[:, :, None], torch.zeros(n, 3, 4 * (f - 1), *frames.shape[-2:])], dim=2)
        cond_latent = vae.encode_first_frame(video)
    else:
        cond_latent = vae.encode(frames[:, :, None])
    clip = ClipImageEncoder.from_pretrained(a.image_encoder, device=a.device)(frames) if cfg.image_dim else None
    return ImageCondition.for_model(cfg, cond_latent, clip)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tmd-sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="TMD student export or Wan checkpoint directory")
    p.add_argument("--prompts", nargs="*", default=[])
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--sampler", choices=["tmd", "dmd2v", "teacher"], help="default: tmd for a student export, else dmd2v")
    p.add_argument("--outer-steps", type=int, help="M (default: what the student was distilled for)")
    p.add_argument("--inner-steps", type=int, help="N (default: what the student was distilled for)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--negative-language", choices=["en", "zh"], default="en",
                   help="negative prompt: en, the paper's Table 8 text (default); zh, Wan2.1's Chinese original")
    p.add_argument("--latent", default=None, help="C,F,H,W (default: the synthetic task's, 16,21,60,104, or "
                   "48,31,44,80 for a 48-channel model)")
    p.add_argument("--synthetic", action="store_true", help="encode prompts and decode latents with the synthetic task")
    p.add_argument("--umt5", help="umT5 encoder directory (transformers) for real prompts")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --umt5)")
    p.add_argument("--vae", help="diffusers AutoencoderKLWan directory: decode to mp4 (and encode --image)")
    p.add_argument("--image", nargs="*", default=[], help="first frame for an image-to-video model: one image file "
                   "for all prompts, or one per prompt")
    p.add_argument("--image-encoder", help="CLIPVisionModel directory for --image with a Wan2.1 I2V model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (Wan's inference precision) on the device")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        return _sample(p, a)
    except (ValueError, OSError) as err:  # CheckpointError and RecipeError are ValueErrors
        text = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err)
        print(f"tmd-sample: {text}", file=sys.stderr)
        return 2


# Wan's sampler runs on a 1000-step training schedule: more steps than that only repeat times.
MAX_TEACHER_STEPS = 1000
OUTPUT = re.compile(r"^\d{4}\.(pt|mp4)$")


def _latent(text: str | None, task, channels: int, patch) -> tuple:
    """--latent C,F,H,W checked against the model (C: its latent channels, out_dim; an I2V model's in_dim adds the
    conditioning). Default: Wan2.1's 81 frames at 832x480 (16 channels), Wan2.2 TI2V's 121 at 1280x704 (48)."""
    if text is None:
        return task.latent_shape if task else {48: (48, 31, 44, 80)}.get(channels, (16, 21, 60, 104))
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--latent {text}: give four positive sizes C,F,H,W, e.g. 16,21,60,104")
    if shape[0] != channels or any(n % k for n, k in zip(shape[1:], patch)):
        raise ValueError(f"--latent {text}: the model takes {channels} channels and F,H,W divisible by {tuple(patch)}")
    return shape


def _sample(p, a) -> int:
    from tmd_megatron.training.export import STUDENT_JSON, load_student
    from tmd_megatron.training.sampling import SAMPLER_JSON, SamplerConfig, sample

    for name in ("outer_steps", "inner_steps"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if not 1 <= a.teacher_steps <= MAX_TEACHER_STEPS:
        p.error(f"--teacher-steps {a.teacher_steps}: use 1..{MAX_TEACHER_STEPS} (Wan's default is 50)")
    if a.cfg_scale < 0:
        p.error(f"--cfg-scale {a.cfg_scale} must be >= 0")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible; use --device cpu")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(not OUTPUT.match(f.name) for f in out.iterdir())):
        p.error(f"--out {out} exists and holds other files than samples (NNNN.pt/.mp4): choose a new directory")
    if a.prompts_file and not Path(a.prompts_file).is_file():
        p.error(f"--prompts-file {a.prompts_file} does not exist")
    prompts = list(a.prompts) + (Path(a.prompts_file).read_text().splitlines() if a.prompts_file else [])
    prompts = [q for q in prompts if q.strip()]
    if not prompts:
        p.error("give --prompts or --prompts-file")
    if not (a.synthetic or a.umt5):
        p.error("choose a text encoder: --synthetic (the synthetic task) or --umt5 <dir>")
    model_dir = Path(a.model)
    if not model_dir.is_dir():
        p.error(f"{model_dir} does not exist: give a TMD student export (<run>/export) or a Wan checkpoint directory")
    is_student = (model_dir / STUDENT_JSON).exists()
    kind = a.sampler or ("tmd" if is_student else "dmd2v")
    if kind == "tmd" and not is_student:
        p.error(f"{model_dir} has no {STUDENT_JSON}: it is not a TMD student export (use --sampler dmd2v/teacher)")
    from tmd_megatron.models.wan import WanExperts, WanModel
    from tmd_megatron.models.wan.checkpoint import expert_dirs

    try:
        if is_student:
            model = load_student(model_dir, device=a.device)
        else:
            loader = WanExperts if expert_dirs(model_dir) is not None else WanModel  # A14B: experts switch by t
            model = loader.from_pretrained(model_dir, device=a.device)
    except (TypeError, KeyError, RuntimeError) as err:  # a student.json or extras of another version
        raise ValueError(f"{model_dir} is not a complete TMD student export ({type(err).__name__}: {err})") from None
    model.eval()
    wan_cfg = model.wan.config if is_student else model.config
    task = None
    if a.synthetic:
        from tmd_megatron.data.synthetic import SyntheticTask

        task = SyntheticTask(text_dim=wan_cfg.text_dim, image_dim=wan_cfg.image_dim, image_len=wan_cfg.image_len)
        contexts, negative = task.encode_prompts(prompts), task.encode_text("")
    else:
        from tmd_megatron.data.text import NEGATIVE_PROMPTS, PromptEncoder

        enc = PromptEncoder.from_pretrained(a.umt5, a.tokenizer or a.umt5)
        contexts, negative = enc(prompts), enc([NEGATIVE_PROMPTS[a.negative_language]])[0]
    width = max(c.shape[0] for c in contexts)
    ctx = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[0])) for c in contexts]).float().to(a.device)
    latent = _latent(a.latent, task, wan_cfg.out_dim, wan_cfg.patch_size)
    trained = model_dir / SAMPLER_JSON
    cfg = SamplerConfig(**json.loads(trained.read_text())) if trained.exists() else SamplerConfig()
    chosen = {"outer_steps": a.outer_steps, "inner_steps": a.inner_steps}
    cfg = dataclasses.replace(cfg, teacher_steps=a.teacher_steps, cfg_scale=a.cfg_scale,
                              **{k: v for k, v in chosen.items() if v is not None})
    cond = _image_condition(a, p, wan_cfg, task, latent, len(prompts))
    cond = None if cond is None else cond.to(a.device)
    evals = {"tmd": f"M={cfg.outer_steps}, N={cfg.inner_steps}", "dmd2v": f"M={cfg.outer_steps}",
             "teacher": f"{cfg.teacher_steps} CFG steps"}[kind]
    print(f"sampling {len(prompts)} prompt(s) with the {kind} sampler ({evals}) on {a.device}", flush=True)
    with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.bf16):
        x, nfe = sample(kind, model, ctx, negative.float().to(a.device), latent, cfg, a.seed, cond=cond)
    x = x.float()
    out.mkdir(parents=True, exist_ok=True)
    videos = None
    if a.vae:
        from tmd_megatron.data.preprocess import WanVAE

        videos = WanVAE.from_pretrained(a.vae, device=a.device).decode(x).cpu()
    elif task is not None:
        videos = task.decode_latent(x.cpu())
    for i, prompt in enumerate(prompts):
        torch.save({"latent": x[i].cpu().clone(), "prompt": prompt, "sampler": kind, "effective_nfe": nfe}, out / f"{i:04d}.pt")
        if videos is not None:
            _write_mp4(out / f"{i:04d}.mp4", videos[i])
    print(f"{len(prompts)} samples with the {kind} sampler (M={cfg.outer_steps}, N={cfg.inner_steps}), "
          f"effective NFE {nfe:.2f} (measured), written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
