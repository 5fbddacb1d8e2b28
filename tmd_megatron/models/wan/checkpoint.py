"""Load and save Wan2.1 DiT checkpoints in the original and diffusers formats (WAN_SPEC §3).

Loading reads every header first, checks names and shapes against the model the config describes, and
only then reads tensors, so a bad checkpoint raises `CheckpointError` naming the problem and never leaves a
half-loaded model. Saving writes into a temporary sibling directory and swaps it into place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import WanConfig
from .keys import detect_format, diffusers_to_original, key_maps, strip_prefix
from .model import WanModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
ORIGINAL_CONFIG_FIELDS = ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers", "eps")


class CheckpointError(ValueError):
    pass


# ---- reading ----------------------------------------------------------------------------------------------
def _resolve_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"  # a diffusers pipeline root
    return path


def _weight_files(ckpt_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    indexes = sorted(ckpt_dir.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{ckpt_dir} holds several index files {[p.name for p in indexes]}; keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"index {indexes[0]} is not a valid safetensors index ({err})") from err
        outside = sorted({f for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f or f in ("", "..")})
        if outside:
            raise CheckpointError(f"index {indexes[0].name} names shard files outside {ckpt_dir}: {outside[:3]}; a "
                                  "checkpoint's shards sit next to its index")
        shards = sorted({ckpt_dir / f for f in weight_map.values()})
        missing = [p.name for p in shards if not p.exists()]
        if missing:
            raise CheckpointError(f"index {indexes[0].name} names shard files that are missing: {missing}")
        return shards, weight_map
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights found in {ckpt_dir}")
    if len(files) > 1:
        raise CheckpointError(
            f"{ckpt_dir} holds {len(files)} safetensors files but no *.safetensors.index.json to say how they fit"
        )
    return files, None


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[Path, tuple]]:
    """{key: (file, shape)} from headers alone; raises on unreadable files and index mismatches."""
    where: dict[str, tuple[Path, tuple]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    if k in where:
                        raise CheckpointError(f"tensor {k!r} appears in both {where[k][0].name} and {f.name}")
                    where[k] = (f, tuple(h.get_slice(k).get_shape()))
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"cannot read {f}: the file is truncated or corrupt ({err})") from err
    if weight_map is not None:
        wrong = sorted(k for k, name in weight_map.items() if k not in where or where[k][0].name != name)
        if wrong:
            raise CheckpointError(f"the index disagrees with the shard contents for {len(wrong)} keys, e.g. {wrong[:5]}")
    return where


def _infer_config(cfg_json: dict, fmt: str, shapes: dict[str, tuple]) -> WanConfig:
    """WanConfig from config.json plus what tensor shapes say (original configs omit several fields)."""
    def shape(key):
        if key not in shapes:
            raise CheckpointError(f"checkpoint lacks tensor {key!r}, needed to read the model's size")
        return shapes[key]

    pe = shape("patch_embedding.weight")
    patch = tuple(pe[2:])
    dim = pe[0]
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    fields = dict(
        dim=dim,
        in_dim=pe[1],
        patch_size=patch,
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1],
        out_dim=shape("head.head.weight")[0] // math.prod(patch),
        num_layers=max(blocks) + 1 if blocks else 0,
        ffn_dim=shape("blocks.0.ffn.0.weight")[0] if blocks else dim,
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes,
    )
    if fmt == "diffusers":
        if cfg_json.get("image_dim") is not None or cfg_json.get("added_kv_proj_dim") is not None:
            raise CheckpointError("this is an image-to-video Wan checkpoint (image_dim set); only T2V is supported")
        declared = dict(
            num_heads=cfg_json.get("num_attention_heads"),
            eps=cfg_json.get("eps"),
            num_layers=cfg_json.get("num_layers"),
            ffn_dim=cfg_json.get("ffn_dim"),
            text_dim=cfg_json.get("text_dim"),
            freq_dim=cfg_json.get("freq_dim"),
            in_dim=cfg_json.get("in_channels"),
            out_dim=cfg_json.get("out_channels"),
            rope_max_positions=cfg_json.get("rope_max_seq_len"),
            text_len=cfg_json.get("text_len"),
        )
        if cfg_json.get("attention_head_dim") and cfg_json.get("num_attention_heads"):
            declared["dim"] = cfg_json["attention_head_dim"] * cfg_json["num_attention_heads"]
    else:
        declared = {k: cfg_json.get(k) for k in ORIGINAL_CONFIG_FIELDS}
    declared = {k: v for k, v in declared.items() if v is not None}
    clash = {k: (v, fields[k]) for k, v in declared.items() if k in fields and fields[k] != v}
    if clash:
        detail = ", ".join(f"{k}: config.json says {a}, tensors say {b}" for k, (a, b) in clash.items())
        raise CheckpointError(f"config.json disagrees with the tensor shapes ({detail})")
    if "num_heads" not in declared:
        raise CheckpointError("config.json does not give the number of attention heads (num_heads)")
    fields.update(declared)
    try:
        return WanConfig(**fields)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


class WanCheckpoint:
    """A validated checkpoint directory read lazily: `config`, and a mapping of original-format keys to
    tensors that reads one tensor at a time (so each pipeline/tensor-parallel rank reads only its share).

    Every header is checked on opening: names and shapes against the config the files describe.
    """

    def __init__(self, path, backend="torch", check_finite: bool = True):
        self.dir = ckpt_dir = _resolve_dir(Path(path))
        cfg_path = ckpt_dir / "config.json"
        try:
            cfg_json = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({err})") from err
        files, weight_map = _weight_files(ckpt_dir)
        where = _read_headers(files, weight_map)
        self.prefix = strip_prefix(list(where))
        where = {k[len(self.prefix):]: v for k, v in where.items()}
        fmt = {"WanModel": "original", "WanTransformer3DModel": "diffusers"}.get(cfg_json.get("_class_name"))
        self.format = fmt = fmt or detect_format(where)
        self.check_finite = check_finite

        if fmt == "diffusers":
            self.where = {}
            for k, (f, shape) in where.items():
                try:
                    self.where[diffusers_to_original(k)] = (k, f, shape)
                except KeyError:
                    self.where[k] = (k, f, shape)  # reported as unexpected below
        else:
            self.where = {k: (k, f, shape) for k, (f, shape) in where.items()}
        self.config = _infer_config(cfg_json, fmt, {k: v[2] for k, v in self.where.items()})

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in WanModel(self.config, backend=backend).state_dict().items()}
        missing = sorted(set(expected) - set(self.where))
        unexpected = sorted(self.where[k][0] for k in set(self.where) - set(expected))
        wrong = sorted(
            f"{self.where[k][0]} {self.where[k][2]} (expected {expected[k]})"
            for k in set(expected) & set(self.where) if self.where[k][2] != expected[k]
        )
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if unexpected:
                parts.append(f"unexpected tensors {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
            if wrong:
                parts.append(f"mis-shaped tensors {wrong[:10]}")
            raise CheckpointError(f"{ckpt_dir} ({fmt} format) does not match the Wan config it describes: " + "; ".join(parts))

    def keys(self):
        return self.where.keys()

    def __contains__(self, key) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read([key])[key]

    def read(self, keys) -> dict[str, torch.Tensor]:
        """Tensors for original-format keys, grouped by file; NaN/Inf payloads are refused."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k][1], []).append(k)
        out = {}
        for f, names in by_file.items():
            try:
                with safe_open(f, framework="pt", device="cpu") as h:
                    for k in names:
                        t = h.get_tensor(self.prefix + self.where[k][0])
                        if self.check_finite and t.is_floating_point() and not torch.isfinite(t).all():
                            raise CheckpointError(f"tensor {self.where[k][0]!r} in {f.name} holds NaN or Inf: corrupt file")
                        out[k] = t
            except CheckpointError:
                raise
            except Exception as err:
                raise CheckpointError(f"cannot read tensors from {f}: the file is truncated or corrupt ({err})") from err
        return out


def load_wan(path, dtype: torch.dtype | None = torch.float32, device="cpu", backend="torch", check_finite=True) -> WanModel:
    """A WanModel from a directory in either format, single-file or sharded; the format is detected.

    dtype=None keeps the stored dtype; the default fp32 matches the original's master weights. Every tensor is
    read and checked before the model is filled, so a bad file never leaves a half-loaded model.
    """
    ckpt = WanCheckpoint(path, backend=backend, check_finite=check_finite)
    state = {k: t.to(device=device, dtype=dtype or t.dtype) for k, t in ckpt.read(list(ckpt.keys())).items()}
    with torch.device("meta"):
        model = WanModel(ckpt.config, backend=backend)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# ---- writing ----------------------------------------------------------------------------------------------
def config_json(cfg: WanConfig, fmt: str) -> dict:
    if fmt == "original":
        out = {"_class_name": "WanModel", "model_type": "t2v"}
        out.update({k: getattr(cfg, k) for k in ORIGINAL_CONFIG_FIELDS})
        return out
    if fmt == "diffusers":
        # diffusers pads text in its pipeline (to 512) and has no text_len; record ours only when it differs.
        extra = {} if cfg.text_len == 512 else {"text_len": cfg.text_len}
        return extra | {
            "_class_name": "WanTransformer3DModel",
            "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_dim,
            "out_channels": cfg.out_dim,
            "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim,
            "ffn_dim": cfg.ffn_dim,
            "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None,
            "eps": cfg.eps,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": cfg.rope_max_positions,
            "pos_embed_seq_len": None,
        }
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose 'original' or 'diffusers'")


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_shard_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += n
    shards.append(current)
    return shards


# What a checkpoint or export directory written by us holds; a directory holding anything else is not replaced.
WRITTEN_NAMES = ("config.json", "student.json", "sampler.json", "extras.safetensors", "wan")


def is_replaceable(final: Path) -> bool:
    """True if `final` is missing, empty, or holds only what a Wan checkpoint / TMD export holds (our writers'
    file names), so replacing it cannot delete anything else."""
    if not final.exists():
        return True
    if not final.is_dir() or final.is_symlink():
        return False
    for entry in final.iterdir():
        name = entry.name
        ours = name in WRITTEN_NAMES or (name.startswith("diffusion_pytorch_model") and name.endswith(
            (".safetensors", ".safetensors.index.json")))
        if not ours or (entry.is_dir() and not (name == "wan" and is_replaceable(entry))):
            return False
    return True


def make_group_readable(root: Path) -> None:
    """Give written files the modes the umask allows (safetensors creates 0600 files), so a group can read exports."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished directory in place; the old one is removed only after the new one is there."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_wan(model: WanModel, path, format: str = "original", max_shard_bytes: int | None = None, dtype=None) -> None:
    cfg_dict = config_json(model.config, format)
    final = Path(path)
    if not is_replaceable(final):
        raise CheckpointError(f"{final} exists and holds files that are not a checkpoint's: refusing to replace it "
                              "(nothing was written); choose a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if format == "diffusers":
        fwd, _ = key_maps(state.keys())
        state = {fwd[k]: v for k, v in state.items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    make_group_readable(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    atomic_replace_dir(tmp, final)
