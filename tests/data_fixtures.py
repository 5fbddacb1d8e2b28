"""Small random shard sets for the data tests: every written tensor is kept so reads can be checked against it."""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from tmd_megatron.data import ShardWriter
from tmd_megatron.data.format import index_path


def write_random_shards(root: Path, num_shards=3, per_shard=5, dtype=torch.float32, latent=(16, 2, 4, 4),
                        text_dim=8, max_len=9, noise=False, seed=0, image=False) -> dict[str, dict]:
    """Shards root/part-{k}.tar; returns {key: {"latent", "context", "noise"?, "cond"?, "clip"?, "prompt", "meta"}}
    as written (image: an I2V conditioning latent and 3 CLIP-like tokens of width 5 per sample)."""
    g = torch.Generator().manual_seed(seed)
    written = {}
    n = 0
    for k in range(num_shards):
        with ShardWriter(root / f"part-{k:03d}.tar") as w:
            for _ in range(per_shard):
                key = f"s{n:05d}"
                length = int(torch.randint(1, max_len + 1, (1,), generator=g))
                item = {"latent": torch.randn(*latent, generator=g).to(dtype),
                        "context": torch.randn(length, text_dim, generator=g).to(dtype),
                        "prompt": f"prompt number {n} ünïcode", "meta": {"n": n, "tag": ["x", n]}}
                if noise:
                    item["noise"] = torch.randn(*latent, generator=g).to(dtype)
                if image:
                    item["cond"] = torch.randn(*latent, generator=g).to(dtype)
                    item["clip"] = torch.randn(3, 5, generator=g).to(dtype)
                w.add(key, item["latent"], item["context"], item["prompt"], item["meta"], noise=item.get("noise"),
                      cond=item.get("cond"), clip=item.get("clip"))
                written[key] = item
                n += 1
    return written


def member_span(tar_path: Path, name: str) -> tuple[int, int]:
    """(data offset, size) of a tar member, found by the standard library, not by our index."""
    with tarfile.open(tar_path) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def refresh_crc(tar_path: Path, key: str, ext: str) -> None:
    """Recompute one member's CRC in the index, so only the content checks can catch what was changed."""
    idx = json.loads(index_path(tar_path).read_text())
    entry = next(s for s in idx["samples"] if s["key"] == key)
    offset, size, _ = entry["members"][ext]
    with open(tar_path, "rb") as f:
        f.seek(offset)
        entry["members"][ext][2] = zlib.crc32(f.read(size))
    index_path(tar_path).write_text(json.dumps(idx))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
