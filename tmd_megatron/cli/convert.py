"""tmd-convert: rewrite a Wan DiT checkpoint between the original and diffusers formats (A14B: both experts, in
each format's two-expert layout)."""
from __future__ import annotations

import argparse
import re
import sys

import torch

from tmd_megatron.models.wan import WanExperts, WanModel
from tmd_megatron.models.wan.checkpoint import CheckpointError, expert_dirs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}[m.group(2)]
    return int(float(m.group(1)) * scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tmd-convert", description=__doc__)
    p.add_argument("src", help="checkpoint directory (either format; detected), or a diffusers pipeline root")
    p.add_argument("dst", help="output directory (replaced atomically)")
    p.add_argument("--to", choices=["original", "diffusers"], required=True, help="output key format")
    p.add_argument("--shard-size", type=parse_size, default=None, help="split into shards of at most this size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="tensor dtype to write")
    args = p.parse_args(argv)
    try:
        loader = WanExperts if expert_dirs(args.src) is not None else WanModel
        model = loader.from_pretrained(args.src, dtype=None)
        model.save_pretrained(args.dst, format=args.to, max_shard_bytes=args.shard_size, dtype=DTYPES[args.dtype])
    except CheckpointError as err:
        print(f"tmd-convert: {err}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    experts = " in two experts" if isinstance(model, WanExperts) else ""
    print(f"wrote {args.dst} ({args.to} format, {n:,} parameters{experts}, {model.config.num_layers} blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
