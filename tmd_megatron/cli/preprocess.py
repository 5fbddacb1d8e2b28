"""tmd-preprocess: build training shards (videos, teacher samples, KD pairs, the synthetic task), the negative-prompt
embedding every real recipe reads (data.negative), and check shards.

Multi-process runs (torchrun / srun) read RANK and WORLD_SIZE from the environment: each rank writes its own
shards, and a finished shard is never redone, so rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from tmd_megatron.data.preprocess import PreprocessError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _env(*names: str, default: int) -> int:
    """torchrun's variable, else SLURM's (plain `srun` without torchrun)."""
    return next((int(os.environ[n]) for n in names if n in os.environ), default)


def _ranks() -> tuple[int, int]:
    return _env("RANK", "SLURM_PROCID", default=0), _env("WORLD_SIZE", "SLURM_NTASKS", default=1)


def _device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PreprocessError("--device cuda but no CUDA device is visible; use --device cpu")
        return torch.device("cuda", _env("LOCAL_RANK", "SLURM_LOCALID", default=0))
    return torch.device(name)


def _prompt_encoder(args, text_len: int):
    from tmd_megatron.data.text import PromptEncoder

    return PromptEncoder.from_pretrained(args.text_encoder, args.tokenizer, text_len=text_len,
                                         device=_device(args.device), dtype=torch.float32)


def _read_prompts(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        return [str(json.loads(ln)["prompt"]) for ln in lines]
    return lines


def cmd_videos(args) -> int:
    from tmd_megatron.data.preprocess import ClipImageEncoder, WanVAE, preprocess_videos, read_manifest

    rank, world = _ranks()
    clip = ClipImageEncoder.from_pretrained(args.image_encoder, device=_device(args.device)) if args.image_encoder \
        else None
    stats = preprocess_videos(
        read_manifest(args.manifest), args.out, WanVAE.from_pretrained(args.vae, device=_device(args.device)),
        _prompt_encoder(args, args.text_len), num_frames=args.frames, height=args.height, width=args.width,
        batch_size=args.batch_size, samples_per_shard=args.samples_per_shard, dtype=DTYPES[args.dtype],
        rank=rank, world_size=world, on_error=args.on_error, progress=not args.no_progress, i2v=args.i2v,
        image_encoder=clip,
    )
    print(f"rank {rank}: wrote {stats['written']} samples, {stats['skipped_shards']} shards already finished, "
          f"{len(stats['failed'])} videos failed")
    return 0


def cmd_teacher(args) -> int:
    from tmd_megatron.data.synthetic import SyntheticTask
    from tmd_megatron.data.teacher_data import generate_teacher_data
    from tmd_megatron.data.text import NEGATIVE_PROMPTS
    from tmd_megatron.data.preprocess import PreprocessError
    from tmd_megatron.models.wan import WanExperts, WanModel
    from tmd_megatron.models.wan.checkpoint import expert_dirs

    rank, world = _ranks()
    device = _device(args.device)
    loader = WanExperts if expert_dirs(args.teacher) is not None else WanModel  # A14B: experts switch by t
    model = loader.from_pretrained(args.teacher).to(device).eval()
    if model.config.model_type == "i2v":
        raise PreprocessError("teacher data from an I2V model needs a first frame per prompt, which this command does "
                              "not take: preprocess videos with --i2v instead")
    if args.text_encoder == "synthetic":
        task = SyntheticTask(text_dim=model.config.text_dim)
        encode, negative = task.encode_prompts, args.negative_prompt or ""
    else:
        encode = _prompt_encoder(args, model.config.text_len)
        negative = NEGATIVE_PROMPTS[args.negative_language] if args.negative_prompt is None else args.negative_prompt
    try:
        shape = tuple(int(n) for n in args.latent_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise PreprocessError(f"--latent-shape {args.latent_shape}: give C,F,H,W, e.g. 16,21,60,104")
    if args.steps < 1 or args.guidance < 0 or args.shift <= 0:
        raise PreprocessError(f"--steps {args.steps} must be >= 1, --guidance {args.guidance} >= 0 and --shift "
                              f"{args.shift} positive")
    n = generate_teacher_data(
        model, _read_prompts(args.prompts), encode, encode([negative])[0], args.out, latent_shape=shape,
        steps=args.steps, guidance=args.guidance, shift=args.shift, seed=args.seed, batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard, save_noise=args.kd, dtype=DTYPES[args.dtype], rank=rank,
        world_size=world, prefix="kd" if args.kd else "teacher", progress=not args.no_progress,
        autocast=torch.bfloat16 if args.autocast == "bf16" else None,
    )
    print(f"rank {rank}: wrote {n} samples")
    return 0


def cmd_negative(args) -> int:
    """The umT5 embedding [L, 4096] of the negative prompt (the paper's Table 8 English text by default, Wan's
    Chinese original with --language zh) for CFG and condition dropout; the recipes read it through data.negative."""
    from tmd_megatron.data.text import NEGATIVE_PROMPTS

    if args.out.exists():
        raise PreprocessError(f"{args.out} exists: choose another file (or delete it first)")
    if args.text_len < 1:
        raise PreprocessError(f"--text-len {args.text_len} must be >= 1 (Wan: 512)")
    encoder = _prompt_encoder(args, args.text_len)
    text = NEGATIVE_PROMPTS[args.language] if args.prompt is None else args.prompt
    embedding = encoder([text])[0].float().cpu().contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    torch.save(embedding, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: negative-prompt embedding {list(embedding.shape)} (text rows x width); "
          f"use data.negative={args.out} (or TMD_NEGATIVE={args.out})")
    return 0


def cmd_synthetic(args) -> int:
    from tmd_megatron.data.synthetic import SyntheticTask

    if args.num_samples < 1 or args.samples_per_shard < 1:
        raise PreprocessError(f"--num-samples {args.num_samples} and --samples-per-shard {args.samples_per_shard} "
                              "must be >= 1")
    task = SyntheticTask(frames=args.frames, size=args.size, text_dim=args.text_dim, image_dim=args.image_dim,
                         image_len=args.image_len)
    paths = task.write_shards(args.out, args.num_samples, args.seed, args.samples_per_shard, DTYPES[args.dtype],
                              progress=not args.no_progress, image=args.image)
    print(f"{len(paths)} shards of latents {task.latent_shape} in {args.out}")
    return 0


def cmd_index(args) -> int:
    from tmd_megatron.data.format import build_index

    import tarfile

    for tar in args.tars:
        try:
            n = build_index(tar)
        except (tarfile.TarError, EOFError) as err:
            raise PreprocessError(f"{tar} is not a readable tar file ({err}): index only complete shard tars") from None
        print(f"{tar}: indexed {n} samples")
    return 0


def cmd_verify(args) -> int:
    from tmd_megatron.data.stream import ShardSet

    shards = ShardSet(args.shards, on_corrupt="skip")
    for i in range(len(shards)):
        try:
            shards.read(i)
        except ValueError as err:
            shards.report(err)
    shards.close()
    print(f"{len(shards.shards)} shards, {len(shards)} samples, {shards.describe}")
    for problem in shards.skipped:
        print(f"BAD: {problem}")
    return 1 if shards.skipped else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tmd-preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, dtype="bf16"):
        sp.add_argument("--samples-per-shard", type=int, default=256)
        sp.add_argument("--dtype", choices=sorted(DTYPES), default=dtype, help="stored latent/text dtype")
        sp.add_argument("--no-progress", action="store_true")

    def text(sp):
        sp.add_argument("--tokenizer", help="tokenizer folder (default: the text encoder's)")
        sp.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")

    v = sub.add_parser("videos", help="mp4 + prompt manifest -> Wan VAE latents + umT5 embeddings")
    v.add_argument("manifest", type=Path, help='JSON lines {"video": "a.mp4", "prompt": "..."}')
    v.add_argument("out", type=Path)
    v.add_argument("--vae", required=True, help="diffusers AutoencoderKLWan folder")
    v.add_argument("--text-encoder", required=True, help="transformers UMT5EncoderModel folder")
    v.add_argument("--frames", type=int, default=81)
    v.add_argument("--height", type=int, default=480)
    v.add_argument("--width", type=int, default=832)
    v.add_argument("--text-len", type=int, default=512)
    v.add_argument("--batch-size", type=int, default=4)
    v.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="for unreadable/short videos")
    v.add_argument("--i2v", action="store_true",
                   help="image-to-video data: also the first frame's conditioning latent (Wan2.1/2.2 I2V)")
    v.add_argument("--image-encoder", help="transformers CLIPVisionModel + CLIPImageProcessor folder: also the "
                   "first frame's CLIP tokens (Wan2.1 I2V; needs --i2v)")
    text(v)
    common(v)
    v.set_defaults(func=cmd_videos)

    t = sub.add_parser("teacher", help="prompts -> teacher latents (CFG Euler); --kd stores the noise too")
    t.add_argument("prompts", type=Path, help="one prompt per line, or .jsonl with a prompt field")
    t.add_argument("out", type=Path)
    t.add_argument("--teacher", required=True, help="Wan checkpoint folder (either format)")
    t.add_argument("--text-encoder", required=True, help="UMT5EncoderModel folder, or 'synthetic'")
    t.add_argument("--latent-shape", required=True, help="C,F,H,W, e.g. 16,21,60,104 for 81x480x832")
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--guidance", type=float, default=5.0)
    t.add_argument("--shift", type=float, default=5.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--negative-prompt", default=None,
                   help="text (default: the paper's Table 8 negative prompt, see --negative-language; '' if synthetic)")
    t.add_argument("--negative-language", choices=["en", "zh"], default="en",
                   help="en: Table 8's English text (FastGen's); zh: Wan2.1's Chinese original")
    t.add_argument("--kd", action="store_true", help="store each sample's starting noise (KD pairs)")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16: fp32 weights under bf16 autocast, as Wan's own inference (use on GPU)")
    text(t)
    common(t)
    t.set_defaults(func=cmd_teacher)

    n = sub.add_parser("negative", help="the umT5 embedding of the negative prompt, for data.negative / TMD_NEGATIVE")
    n.add_argument("text_encoder", help="transformers UMT5EncoderModel folder (Wan2.1's umT5-XXL)")
    n.add_argument("out", type=Path, help="file to write (must not exist), e.g. /data/tmd/negative_prompt.pt")
    n.add_argument("--text-len", type=int, default=512, help="the model's text_len (Wan: 512)")
    n.add_argument("--prompt", default=None, help="text (default: the negative prompt of --language)")
    n.add_argument("--language", choices=["en", "zh"], default="en",
                   help="en: the paper's Table 8 text (FastGen's); zh: Wan2.1's Chinese original")
    text(n)
    n.set_defaults(func=cmd_negative)

    s = sub.add_parser("synthetic", help="the synthetic text-to-video task as shards")
    s.add_argument("out", type=Path)
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=3)
    s.add_argument("--size", type=int, default=16)
    s.add_argument("--text-dim", type=int, default=32)
    s.add_argument("--image", action="store_true", help="image-conditioned mode: the first frame's conditioning "
                   "latent and image tokens too (for I2V models)")
    s.add_argument("--image-dim", type=int, default=None, help="width of the image tokens (with --image)")
    s.add_argument("--image-len", type=int, default=5, help="number of image tokens (with --image)")
    common(s, dtype="fp32")
    s.set_defaults(func=cmd_synthetic)

    i = sub.add_parser("index", help="write the index of tars made by another tool")
    i.add_argument("tars", nargs="+", type=Path)
    i.set_defaults(func=cmd_index)

    c = sub.add_parser("verify", help="read and check every sample; exit 1 naming any bad shard or sample")
    c.add_argument("shards", nargs="+", help="folders, globs or tar files")
    c.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    import tarfile

    from tmd_megatron.data.format import ShardError
    from tmd_megatron.models.wan.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    rank, world = _ranks()
    # A process group only to finish together; without a rendezvous address (plain srun) ranks run independently.
    distributed = (world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized()
                   and args.command in ("videos", "teacher"))
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        code = args.func(args)
        if distributed:
            torch.distributed.barrier()
    except (ShardError, PreprocessError, CheckpointError, tarfile.TarError, OSError, ValueError) as err:
        # OSError: a missing manifest, prompts file or output path; ValueError: an argument a builder refuses
        # (e.g. an odd synthetic --size)
        text = f"{err.strerror}: {err.filename}" if isinstance(err, OSError) and err.filename else str(err)
        print(f"tmd-preprocess: {text}", file=sys.stderr)
        code = 2
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
