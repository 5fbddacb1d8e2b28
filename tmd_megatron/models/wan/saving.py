"""Write Wan DiT checkpoints in the original or diffusers format (WAN_SPEC §3): into a temporary sibling directory
that is swapped into place, so an interrupted save never leaves a half-written checkpoint where one was."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import WanConfig
from .keys import key_maps

class CheckpointError(ValueError):
    pass


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
ORIGINAL_CONFIG_FIELDS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads",
                          "num_layers", "eps")


def config_json(cfg: WanConfig, fmt: str) -> dict:
    # Neither format records the CLIP token count (the original splits the context at 512 text rows): ours is
    # written only when it is not CLIP's 257.
    image_len = {"image_len": cfg.image_len} if cfg.image_dim is not None and cfg.image_len != 257 else {}
    if fmt == "original":
        out = {"_class_name": "WanModel"}
        out.update({k: getattr(cfg, k) for k in ORIGINAL_CONFIG_FIELDS})
        return out | image_len
    if fmt == "diffusers":
        # diffusers pads text in its pipeline (to 512) and has no text_len; record ours only when it differs.
        # Its transformer config has no task either: TI2V is recorded so a reload keeps it (diffusers ignores it).
        extra = {} if cfg.text_len == 512 else {"text_len": cfg.text_len}
        if cfg.model_type == "ti2v":
            extra["model_type"] = "ti2v"
        return extra | image_len | {
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
            "image_dim": cfg.image_dim,
            "added_kv_proj_dim": cfg.dim if cfg.image_dim is not None else None,
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
WRITTEN_NAMES = ("config.json", "student.json", "sampler.json", "extras.safetensors", "model_index.json")
# Sub-directories we write: a TMD export's Wan weights, the two experts of an A14B checkpoint (both layouts).
WRITTEN_DIRS = ("wan", "high_noise_model", "low_noise_model", "transformer", "transformer_2")


def is_replaceable(final: Path) -> bool:
    """True if `final` is missing, empty, or holds only what a Wan checkpoint / TMD export holds (our writers'
    file names), so replacing it cannot delete anything else."""
    if not final.exists():
        return True
    if not final.is_dir() or final.is_symlink():
        return False
    for entry in final.iterdir():
        name = entry.name
        if entry.is_dir() and not entry.is_symlink():
            if name not in WRITTEN_DIRS or not is_replaceable(entry):
                return False
        elif not (name in WRITTEN_NAMES or (name.startswith("diffusion_pytorch_model") and name.endswith(
                (".safetensors", ".safetensors.index.json")))):
            return False
    return True


def refuse_unless_replaceable(final: Path) -> None:
    if not is_replaceable(final):
        raise CheckpointError(f"{final} exists and holds files that are not a checkpoint's: refusing to replace it "
                              "(nothing was written); choose a new directory")


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


def save_wan(model, path, format: str = "original", max_shard_bytes: int | None = None, dtype=None) -> None:
    cfg_dict = config_json(model.config, format)
    final = Path(path)
    refuse_unless_replaceable(final)
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


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
