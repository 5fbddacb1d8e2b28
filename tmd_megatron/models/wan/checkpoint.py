"""Load and save Wan DiT checkpoints in the original and diffusers formats (WAN_SPEC §3, docs/wan_family.md).

Loading reads every header first, checks names and shapes against the model the config describes, and
only then reads tensors, so a bad checkpoint raises `CheckpointError` naming the problem and never leaves a
half-loaded model. Writing is in saving.py.

This module never imports the model: the model class is passed in (`WanModel.from_pretrained` passes itself),
so model.py can import it and the two do not import each other.

Two-expert (Wan2.2 A14B) checkpoints: the original release holds `high_noise_model/` and `low_noise_model/`
(wan/configs/wan_t2v_A14B.py), a diffusers pipeline `transformer/` (high noise) and `transformer_2/` (low noise)
with `boundary_ratio` in model_index.json (diffusers scripts/convert_wan_to_diffusers.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from .config import I2V_MASK_CHANNELS, WanConfig
from .keys import detect_format, diffusers_to_original, strip_prefix
from .saving import ORIGINAL_CONFIG_FIELDS, CheckpointError  # noqa: F401  (re-exported: readers and writers)

EXPERTS = ("high", "low")
ORIGINAL_EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
DIFFUSERS_EXPERT_DIRS = {"high": "transformer", "low": "transformer_2"}
# Wan2.2's boundaries by task when a checkpoint does not record one (the original release keeps them in code).
DEFAULT_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}
# Every released Wan DiT on 48 latent channels (the Wan2.2 VAE) is TI2V-5B; diffusers' transformer config has no
# task field (its pipeline marks TI2V with expand_timesteps=True in model_index.json).
TI2V_CHANNELS = 48



# ---- reading ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def expert_dirs(path) -> dict[str, Path] | None:
    """{"high": dir, "low": dir} for a two-expert (A14B) checkpoint directory, else None."""
    path = Path(path)
    for names in (ORIGINAL_EXPERT_DIRS, DIFFUSERS_EXPERT_DIRS):
        dirs = {e: path / d for e, d in names.items()}
        if all((d / "config.json").exists() for d in dirs.values()):
            return dirs
    return None


def expert_boundary(path, model_type: str) -> float:
    """The A14B switch point t (in [0, 1]): diffusers' boundary_ratio, else Wan2.2's value for the task."""
    ratio = _read_json(Path(path) / "model_index.json").get("boundary_ratio")
    if ratio is not None:
        return float(ratio)
    if model_type not in DEFAULT_BOUNDARY:
        raise CheckpointError(f"{path}: a two-expert {model_type} checkpoint without a boundary_ratio; Wan2.2 has "
                              f"two-expert models for {sorted(DEFAULT_BOUNDARY)} only")
    return DEFAULT_BOUNDARY[model_type]


def _resolve_dir(path: Path, expert: str | None = None) -> Path:
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    experts = expert_dirs(path)
    if experts is not None:
        if expert not in EXPERTS:
            raise CheckpointError(f"{path} holds two experts (Wan2.2 A14B): load one with expert='high' or 'low', or "
                                  "both with WanExperts.from_pretrained")
        return experts[expert]
    if expert is not None:
        raise CheckpointError(f"{path} is not a two-expert (A14B) checkpoint; load it without expert=")
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


def _model_type(cfg_json: dict, fields: dict, pipeline: dict) -> str:
    """The task: declared by the original config.json (and our diffusers writer), else read from the structure."""
    declared = cfg_json.get("model_type")
    if declared is not None:
        if declared not in ("t2v", "i2v", "ti2v"):
            raise CheckpointError(f"model_type {declared!r} is not supported; supported Wan DiTs are t2v, i2v and "
                                  "ti2v (docs/wan_family.md)")
        return declared
    if fields["in_dim"] == 2 * fields["out_dim"] + I2V_MASK_CHANNELS or fields.get("image_dim"):
        return "i2v"
    if pipeline.get("expand_timesteps") or fields["in_dim"] == fields["out_dim"] == TI2V_CHANNELS:
        return "ti2v"
    return "t2v"


def _infer_config(cfg_json: dict, fmt: str, shapes: dict[str, tuple], pipeline: dict | None = None) -> WanConfig:
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
    if "img_emb.emb_pos" in shapes or cfg_json.get("pos_embed_seq_len") is not None:
        raise CheckpointError("this is a first-last-frame (FLF2V) Wan checkpoint; it is not supported "
                              "(docs/wan_family.md lists the supported variants)")
    if "img_emb.proj.0.weight" in shapes:
        fields["image_dim"] = shape("img_emb.proj.0.weight")[0]
    if fmt == "diffusers":
        added = cfg_json.get("added_kv_proj_dim")
        if added is not None and added != dim:
            raise CheckpointError(f"added_kv_proj_dim={added} differs from the model width {dim}: not a Wan I2V "
                                  "checkpoint this loader knows")
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
            image_dim=cfg_json.get("image_dim"),
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
    fields["model_type"] = _model_type(cfg_json, fields, pipeline or {})
    if cfg_json.get("image_len") is not None:
        fields["image_len"] = cfg_json["image_len"]
    try:
        return WanConfig(**fields)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


class WanCheckpoint:
    """A validated checkpoint directory read lazily: `config`, and a mapping of original-format keys to
    tensors that reads one tensor at a time (so each pipeline/tensor-parallel rank reads only its share).

    Every header is checked on opening: names and shapes against `model_cls` (WanModel) built for the config the
    files describe. expert: 'high' or 'low' to open one expert of a two-expert (A14B) directory.
    """

    def __init__(self, path, model_cls, backend="torch", check_finite: bool = True, expert: str | None = None):
        path = Path(path)
        self.dir = ckpt_dir = _resolve_dir(path, expert)
        cfg_json = _read_json(ckpt_dir / "config.json")
        pipeline = _read_json(ckpt_dir.parent / "model_index.json") if ckpt_dir != path else {}
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
        self.config = _infer_config(cfg_json, fmt, {k: v[2] for k, v in self.where.items()}, pipeline)

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in model_cls(self.config, backend=backend).state_dict().items()}
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


def load_wan(model_cls, path, dtype: torch.dtype | None = torch.float32, device="cpu", backend="torch",
             check_finite=True, expert: str | None = None):
    """A `model_cls` (WanModel) from a directory in either format, single-file or sharded; the format is detected.

    dtype=None keeps the stored dtype; the default fp32 matches the original's master weights. Every tensor is
    read and checked before the model is filled, so a bad file never leaves a half-loaded model.
    """
    ckpt = WanCheckpoint(path, model_cls, backend=backend, check_finite=check_finite, expert=expert)
    state = {k: t.to(device=device, dtype=dtype or t.dtype) for k, t in ckpt.read(list(ckpt.keys())).items()}
    with torch.device("meta"):
        model = model_cls(ckpt.config, backend=backend)
    model.load_state_dict(state, strict=True, assign=True)
    return model
