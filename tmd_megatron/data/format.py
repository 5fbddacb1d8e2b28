"""Sample shards: webdataset-style tar files plus a JSON index per shard (docs/data.md describes the bytes).

A shard `NAME.tar` holds, per sample with key K, the members `K.latent.npy`, `K.context.npy`, `K.txt` (prompt),
`K.json` (context length and metadata) and optionally `K.noise.npy` (KD pairs), `K.cond.npy` (the I2V
conditioning latent: the VAE latent of the first frame followed by zero frames) and `K.clip.npy` (CLIP image tokens
of the first frame, Wan2.1 I2V). Its index `NAME.tar.idx.json`
records where each member's bytes sit, their CRC-32 and the array shapes, and is written only after the tar is
complete: a shard with an index is finished, one without is not. Readers seek to members through the index and
check every byte they use, so a truncated or corrupted shard raises `ShardError` naming it and is never misread.
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_NAME = "tmd-shard"
FORMAT_VERSION = 1
INDEX_SUFFIX = ".idx.json"
ARRAY_MEMBERS = ("latent.npy", "context.npy", "noise.npy", "cond.npy", "clip.npy")
OPTIONAL_ARRAYS = ("noise", "cond", "clip")  # stored in the latent's dtype
REQUIRED_MEMBERS = ("latent.npy", "context.npy", "txt", "json")
# bfloat16 has no numpy dtype: its bit patterns are stored as little-endian uint16 ("<u2"); the format never
# stores genuine uint16 data, so "<u2" always means bfloat16.
NPY_DTYPES = {"<f4": "float32", "<u2": "bfloat16"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,200}")


class ShardError(ValueError):
    """A shard or sample that cannot be read as written; the message names the file and the problem."""


def index_path(tar_path: Path | str) -> Path:
    return Path(str(tar_path) + INDEX_SUFFIX)


# ---- arrays <-> npy bytes ------------------------------------------------------------------------------------
def encode_array(t: torch.Tensor) -> bytes:
    """npy v1.0 bytes of a CPU float32 or bfloat16 tensor (bfloat16 as its uint16 bit patterns)."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.float32:
        arr = t.numpy()
    elif t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy().view("<u2")
    else:
        raise ShardError(f"arrays are stored as float32 or bfloat16, got {t.dtype}; cast with .float() first")
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def parse_npy(data: bytes | memoryview, where: str) -> tuple[np.ndarray, str]:
    """(array view of `data`, stored dtype name); raises ShardError for anything but a C-order f4/u2 npy."""
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    except ValueError as err:
        raise ShardError(f"{where}: not a valid npy array ({err})") from None
    name = NPY_DTYPES.get(dtype.str)
    if name is None or fortran:
        raise ShardError(f"{where}: npy dtype {dtype.str} fortran_order={fortran}; expected C-order <f4 or <u2")
    count = math.prod(shape)
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ShardError(f"{where}: npy payload holds {len(data) - offset} bytes, shape {shape} needs "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape), name


def all_finite(arr: np.ndarray, dtype_name: str) -> bool:
    if dtype_name == "bfloat16":  # exponent bits all ones = inf or nan
        return not bool(np.any((arr & 0x7F80) == 0x7F80))
    return bool(np.isfinite(arr).all())


def to_tensor(arr: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A tensor sharing the array's memory (read_members returns writable buffers, so no copy is needed)."""
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


# ---- writing -------------------------------------------------------------------------------------------------
def _check_array(name: str, t: torch.Tensor, ndim: int, key: str) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        raise ShardError(f"sample {key!r}: {name} must be a {ndim}-d tensor, got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    if t.dtype not in (torch.float32, torch.bfloat16):
        raise ShardError(f"sample {key!r}: {name} dtype {t.dtype}; store float32 or bfloat16")
    if not torch.isfinite(t).all():
        raise ShardError(f"sample {key!r}: {name} has non-finite values; refusing to write it")


class ShardWriter:
    """Writes one shard: `with ShardWriter(path) as w: w.add(...)`; the tar and its index appear on success."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.name.endswith(".tar"):
            raise ShardError(f"shard file names end in .tar, got {self.path.name}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._samples: list[dict] = []
        self._keys: set[str] = set()

    def add(self, key: str, latent: torch.Tensor, context: torch.Tensor, prompt: str, meta: dict | None = None,
            noise: torch.Tensor | None = None, cond: torch.Tensor | None = None,
            clip: torch.Tensor | None = None) -> None:
        """latent [C, F, H, W]; context [context_len, text_dim] (unpadded rows, EOS included); noise and cond like
        latent; clip [image tokens, width]."""
        if not KEY_PATTERN.fullmatch(key):
            raise ShardError(f"sample key {key!r} must match {KEY_PATTERN.pattern} (no dots: they split members)")
        if key in self._keys:
            raise ShardError(f"sample key {key!r} appears twice in {self.path.name}")
        _check_array("latent", latent, 4, key)
        _check_array("context", context, 2, key)
        if context.shape[0] < 1:
            raise ShardError(f"sample {key!r}: context has no rows; a prompt encodes to at least its EOS token")
        extra = {"noise": noise, "cond": cond, "clip": clip}
        for name, t in extra.items():
            if t is None:
                continue
            _check_array(name, t, 2 if name == "clip" else 4, key)
            if (name != "clip" and t.shape != latent.shape) or t.dtype != latent.dtype:
                raise ShardError(f"sample {key!r}: {name} {tuple(t.shape)} {t.dtype} must match latent "
                                 f"{tuple(latent.shape) if name != 'clip' else ''} {latent.dtype}")
        payload = {"latent.npy": encode_array(latent), "context.npy": encode_array(context)}
        payload.update({f"{name}.npy": encode_array(t) for name, t in extra.items() if t is not None})
        payload["txt"] = prompt.encode("utf-8")
        payload["json"] = json.dumps({"context_len": int(context.shape[0]), "meta": meta or {}},
                                     sort_keys=True).encode("utf-8")
        members = {}
        for ext, data in payload.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            # tarfile pads each member's data to 512 bytes, so the data started this far before the cursor.
            start = self._tar.offset - tarfile.BLOCKSIZE * math.ceil(len(data) / tarfile.BLOCKSIZE)
            members[ext] = [start, len(data), zlib.crc32(data)]
        self._keys.add(key)
        self._samples.append({
            "key": key, "members": members,
            "latent_shape": list(latent.shape), "latent_dtype": str(latent.dtype).removeprefix("torch."),
            "context_len": int(context.shape[0]), "text_dim": int(context.shape[1]),
            "context_dtype": str(context.dtype).removeprefix("torch."),
            **({"clip_shape": list(clip.shape)} if clip is not None else {}),
        })

    def close(self) -> None:
        self._tar.close()
        os.replace(self._tmp, self.path)
        write_index(self.path, self._samples)

    def abort(self) -> None:
        self._tar.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


def write_index(tar_path: Path, samples: list[dict]) -> None:
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shard": tar_path.name,
             "tar_bytes": tar_path.stat().st_size, "samples": samples}
    final = index_path(tar_path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(tmp, final)


def build_index(tar_path: Path | str) -> int:
    """Index a tar written by another tool (same member names); every sample is decoded and checked first."""
    tar_path = Path(tar_path)
    groups: dict[str, dict[str, list[int]]] = {}
    with open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rpartition("/")[2].partition(".")
            f.seek(info.offset_data)
            data = f.read(info.size)
            groups.setdefault(key, {})[ext] = [info.offset_data, info.size, zlib.crc32(data)]
    samples = []
    with open(tar_path, "rb") as f:
        for key, members in groups.items():
            missing = [m for m in REQUIRED_MEMBERS if m not in members]
            if missing:
                raise ShardError(f"{tar_path.name}: sample {key!r} lacks members {missing}")
            entry = {"key": key, "members": members}
            sample = read_sample(f, tar_path.name, entry, describe_only=True)
            entry.update(sample)
            samples.append(entry)
    write_index(tar_path, samples)
    return len(samples)


# ---- reading ------------------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    path: Path
    samples: list[dict]


def open_shard(tar_path: Path | str) -> ShardInfo:
    """Read and check a shard's index against the tar on disk (existence, size, format version)."""
    tar_path = Path(tar_path)
    idx = index_path(tar_path)
    if not tar_path.exists():
        raise ShardError(f"shard {tar_path} does not exist")
    if not idx.exists():
        raise ShardError(f"shard {tar_path.name} has no index {idx.name}: it was not finished, or was written by "
                         f"another tool (create the index with `tmd-preprocess index {tar_path}`)")
    try:
        index = json.loads(idx.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"index {idx} is not valid JSON ({err})") from None
    if not isinstance(index, dict):
        raise ShardError(f"index {idx} is not a shard index (a JSON object)")
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ShardError(f"index {idx.name}: format {index.get('format')!r} v{index.get('version')}, this reader "
                         f"reads {FORMAT_NAME!r} v{FORMAT_VERSION}")
    size = tar_path.stat().st_size
    if size != index.get("tar_bytes"):
        raise ShardError(f"shard {tar_path.name} is {size} bytes, its index says {index.get('tar_bytes')}: "
                         f"truncated or rewritten")
    _check_entries(index.get("samples"), size, idx)
    return ShardInfo(tar_path, index["samples"])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entries(samples, tar_bytes: int, idx: Path) -> None:
    """Every number a reader will use, checked before any is used: member extents inside the tar (a reader
    allocates `size` bytes before the CRC can say anything) and the described shapes."""
    fix = f"rebuild it with `tmd-preprocess index {str(idx)[: -len(INDEX_SUFFIX)]}`"
    if not isinstance(samples, list):
        raise ShardError(f"index {idx.name} has no sample list: {fix}")
    for n, e in enumerate(samples):
        ok = isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("members"), dict)
        ok = ok and all(m in e["members"] for m in REQUIRED_MEMBERS)
        ok = ok and isinstance(e.get("latent_shape"), list) and len(e["latent_shape"]) == 4 and all(
            _is_int(d) and d > 0 for d in e["latent_shape"])
        ok = ok and all(_is_int(e.get(k)) and e[k] > 0 for k in ("context_len", "text_dim"))
        ok = ok and e.get("latent_dtype") in TORCH_DTYPES and e.get("context_dtype") in TORCH_DTYPES
        if not ok:
            raise ShardError(f"index {idx.name}: sample {n} is not a valid entry: {fix}")
        for ext, where in e["members"].items():
            if not (isinstance(where, list) and len(where) == 3 and all(_is_int(v) and v >= 0 for v in where)
                    and where[0] + where[1] <= tar_bytes):
                raise ShardError(f"index {idx.name}: sample {e['key']!r} member {ext} {where} lies outside the "
                                 f"{tar_bytes}-byte tar: {fix}")


def read_members(f, shard_name: str, entry: dict) -> dict[str, bytes]:
    out = {}
    for ext, (offset, size, crc) in entry["members"].items():
        f.seek(offset)
        data = bytearray(size)  # writable, so arrays parsed from it can become tensors without a copy
        if f.readinto(data) != size or zlib.crc32(data) != crc:
            raise ShardError(f"{shard_name}: sample {entry['key']!r} member {ext} is corrupt (CRC-32 or length "
                             f"mismatch)")
        out[ext] = data
    return out


def read_sample(f, shard_name: str, entry: dict, describe_only: bool = False) -> dict:
    """Read, check and parse one sample's members: arrays as numpy views (dtype name beside), prompt, meta."""
    where = f"{shard_name}: sample {entry['key']!r}"
    raw = read_members(f, shard_name, entry)
    try:
        prompt = raw["txt"].decode("utf-8")
        info = json.loads(raw["json"])
        context_len = int(info["context_len"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{where}: unreadable txt/json member ({err})") from None
    arrays = {ext.removesuffix(".npy"): parse_npy(raw[ext], f"{where} {ext}") for ext in ARRAY_MEMBERS if ext in raw}
    latent, latent_dtype = arrays["latent"]
    context, context_dtype = arrays["context"]
    if latent.ndim != 4 or context.ndim != 2 or context.shape[0] != context_len or context_len < 1:
        raise ShardError(f"{where}: latent {latent.shape} / context {context.shape} (context_len {context_len}); "
                         f"expected a 4-d latent and context_len rows of text embedding")
    for name in ("noise", "cond"):
        if name in arrays and arrays[name][0].shape != latent.shape:
            raise ShardError(f"{where}: {name} {arrays[name][0].shape} differs from latent {latent.shape}")
    described = {"latent_shape": list(latent.shape), "latent_dtype": latent_dtype, "context_len": context_len,
                 "text_dim": int(context.shape[1]), "context_dtype": context_dtype}
    if "clip" in arrays:
        if arrays["clip"][0].ndim != 2:
            raise ShardError(f"{where}: clip {arrays['clip'][0].shape}; expected [image tokens, width]")
        described["clip_shape"] = list(arrays["clip"][0].shape)
    if not describe_only:
        expected = {k: entry[k] for k in described}
        if described != expected:
            raise ShardError(f"{where}: arrays {described} disagree with the index {expected}")
    for name, (arr, dtype_name) in arrays.items():
        if not all_finite(arr, dtype_name):
            raise ShardError(f"{where}: {name} has non-finite values")
    if describe_only:
        return described
    return {"arrays": arrays, "raw": raw, "prompt": prompt, "meta": info.get("meta", {}), "key": entry["key"]}


def shard_paths(spec) -> list[Path]:
    """Sorted shard list from a directory, a glob pattern, one path or a list of these (order never from the OS)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: set[Path] = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.update(p.glob("*.tar"))
        elif glob.has_magic(str(item)):
            found.update(Path(x) for x in glob.glob(str(item)) if x.endswith(".tar"))
        else:
            found.add(p)
    if not found:
        raise ShardError(f"no .tar shards found in {spec}")
    return sorted(found, key=lambda q: (q.name, str(q)))
