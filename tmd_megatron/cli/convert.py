"""tmd-convert: rewrite a Wan DiT checkpoint between the original and diffusers formats (A14B: both experts, in
each format's two-expert layout).

The destination must not exist or be empty; --replace lets it replace an existing checkpoint directory (one that
holds only a checkpoint's files). Anything else there is never removed: the command refuses and writes nothing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from tmd_megatron.models.wan import WanExperts, WanModel
from tmd_megatron.models.wan.checkpoint import CheckpointError, expert_dirs
from tmd_megatron.models.wan.saving import is_replaceable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * scale)


def destination_problem(src: Path, dst: Path, replace: bool) -> str | None:
    """Why writing `dst` could destroy something (None if it cannot)."""
    a, b = src.resolve(), dst.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        return f"{dst} and {src} overlap: write the converted checkpoint to a separate new directory"
    if not dst.exists():
        return None
    if not dst.is_dir():
        return f"{dst} exists and is not a directory: choose a new directory"
    if not any(dst.iterdir()):
        return None
    if not replace:
        return f"{dst} exists and is not empty: choose a new directory (or pass --replace to replace a checkpoint)"
    if not is_replaceable(dst):
        return (f"{dst} holds files that are not a checkpoint's: --replace only replaces a checkpoint directory; "
                "choose a new directory")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tmd-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (either format; detected), or a diffusers pipeline root")
    p.add_argument("dst", help="output directory: new or empty (see --replace)")
    p.add_argument("--to", choices=["original", "diffusers"], required=True, help="output key format")
    p.add_argument("--shard-size", type=parse_size, default=None, help="split into shards of at most this size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="tensor dtype to write")
    p.add_argument("--replace", action="store_true", help="DST may be an existing checkpoint, replaced atomically")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    try:
        if (src / "student.json").exists():
            raise CheckpointError(f"{src} is a TMD student export, not a Wan checkpoint: its Wan weights are in "
                                  f"{src / 'wan'} (convert that; the flow-head extras stay with the export)")
        problem = destination_problem(src, dst, args.replace)
        if problem:
            raise CheckpointError(f"{problem}; nothing was written")
        loader = WanExperts if expert_dirs(args.src) is not None else WanModel
        model = loader.from_pretrained(args.src, dtype=None)
        model.save_pretrained(args.dst, format=args.to, max_shard_bytes=args.shard_size, dtype=DTYPES[args.dtype])
    except (CheckpointError, OSError) as err:
        print(f"tmd-convert: {err}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    experts = " in two experts" if isinstance(model, WanExperts) else ""
    print(f"wrote {args.dst} ({args.to} format, {n:,} parameters{experts}, {model.config.num_layers} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
