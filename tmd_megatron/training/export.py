"""Exports of a trained model: a Wan checkpoint (teacher, DMD2-v and KD students; loadable by diffusers and
the original code) or a TMD student (its Wan weights in the original format plus `student.json` and
`extras.safetensors` for the fusion and the extra time embeddings)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tmd_megatron.models.student import StudentConfig
from tmd_megatron.models.wan import WanConfig, WanModel
from tmd_megatron.models.wan.checkpoint import WanCheckpoint
from tmd_megatron.models.wan.saving import (CheckpointError, atomic_replace_dir, is_replaceable, make_group_readable,
                                            save_wan)

from .config import RecipeError
from .views import Prefixed

STUDENT_JSON = "student.json"
EXTRAS = "extras.safetensors"


def _wan_from_state(cfg: WanConfig, state: Mapping) -> WanModel:
    with torch.device("meta"):
        model = WanModel(cfg)
    model.load_state_dict({k: state[k].detach().cpu().contiguous() for k in model.state_dict()}, assign=True)
    return model


def write_export(out: Path, wan_cfg: WanConfig, state: Mapping, student_cfg: StudentConfig | None,
                 fmt: str = "original") -> None:
    """state: the full single-device state (Wan keys, or `wan.*` keys plus extras for a TMD student)."""
    out = Path(out)
    if student_cfg is None:
        save_wan(_wan_from_state(wan_cfg, state), out, format=fmt)
        return
    if not is_replaceable(out):
        raise CheckpointError(f"{out} exists and holds files that are not an export's: refusing to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    wan_state = {k[4:]: v for k, v in state.items() if k.startswith("wan.")}
    save_wan(_wan_from_state(wan_cfg, wan_state), tmp / "wan", format=fmt)
    extras = {k: v.detach().cpu().contiguous() for k, v in state.items() if not k.startswith("wan.")}
    save_file(extras, tmp / EXTRAS)
    (tmp / STUDENT_JSON).write_text(json.dumps(dataclasses.asdict(student_cfg), indent=2))
    make_group_readable(tmp)
    atomic_replace_dir(tmp, out)


def read_student_export(path, wan_cfg: WanConfig, student_cfg: StudentConfig) -> Mapping:
    """A TMD student export as a mapping `wan.*` -> lazily read tensors, plus the extras."""
    path = Path(path)
    if not (path / STUDENT_JSON).exists():
        raise RecipeError(f"{path} is not a TMD student export (no {STUDENT_JSON}); model.init must point at the "
                          "stage-1 run's export directory (<out_dir>/export)")
    saved = StudentConfig(**json.loads((path / STUDENT_JSON).read_text()))
    if saved != student_cfg:
        raise RecipeError(f"the student export {path} was trained with {saved}, the recipe asks for {student_cfg}: "
                          "use the same distill.head_blocks and method.student settings as stage 1")
    wan = WanCheckpoint(path / "wan", WanModel)
    if wan.config != wan_cfg:
        raise RecipeError(f"the student export {path} holds a {wan.config} model, the recipe asks for {wan_cfg}")
    return Prefixed(wan, "wan.", load_file(path / EXTRAS))


def load_student(path, device="cpu"):
    """A single-device DecoupledStudent from an export (for sampling and evaluation)."""
    from tmd_megatron.models.student import DecoupledStudent

    path = Path(path)
    cfg = StudentConfig(**json.loads((path / STUDENT_JSON).read_text()))
    wan = WanModel.from_pretrained(path / "wan", device=device)
    student = DecoupledStudent(wan, cfg)
    student.load_state_dict({**{f"wan.{k}": v for k, v in wan.state_dict().items()},
                             **load_file(path / EXTRAS, device=str(device))})
    return student.to(device)  # the extras are created on the default device
