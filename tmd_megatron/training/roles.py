"""The models one rank holds for a recipe on a topology: the trained model, the frozen teacher, the critics.

Each role has its own pipeline stage split, balanced by the FLOPs that role runs (training/partition.py); the
student's keeps the whole flow head on the last stage (its inner loop then never crosses ranks), the
discriminator heads sit with the teacher blocks they read. Under pipeline parallelism the student's last stage
also holds a copy of the patch embedding (the flow head embeds y_s with it), tied to the first stage's by summing
gradients.
Every role is built from full (single-device) state dicts that are read lazily and sliced per rank, and
every freshly initialised tensor is drawn on one device from the run seed, so all layouts start equal.

Two-expert (Wan2.2 A14B) presets: the teacher and the fake score are WanExperts (both experts resident, each
sample on the expert its timestep selects); the student starts from one expert, model.student_expert (high by
default: every outer time of the paper's student grids lies above the boundary; docs/wan_family.md).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tmd_megatron.models.discriminator import Discriminator
from tmd_megatron.models.student import DecoupledStudent
from tmd_megatron.models.wan import WanConfig, WanExperts, WanModel
from tmd_megatron.models.wan.checkpoint import WanCheckpoint, expert_dirs
from tmd_megatron.parallel import Topology, build_stage_model
from tmd_megatron.parallel.sharding import load_full_state

from .config import RecipeError, Resolved
from .export import read_student_export
from .partition import role_ranges
from .views import Prefixed

FP32_MODULES = ("time_embedding", "time_projection", "head")  # the original runs these in fp32 (WAN_SPEC §2.7)


def stage_ranges(res: Resolved, pp: int) -> list[tuple[int, int]]:
    """The trained model's stage split (each role has its own: training/partition.py)."""
    return role_ranges(res, pp)["student"]


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen matmul weights (and their biases) in `dtype`, whatever layer class holds them (nn.Linear, our
    column/row-parallel linears, Transformer Engine's); the fp32 regions (time embedding/projection, head),
    norm gains and modulation tables stay fp32, as in the original's bf16 inference."""
    if dtype == torch.float32:
        return
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim not in (2, 5) or name.startswith(FP32_MODULES):
            continue
        for p in (weight, getattr(mod, "bias", None)):
            if isinstance(p, nn.Parameter):
                p.data = p.data.to(dtype)


@dataclass
class ExpertStates:
    """The full weights of the two experts of an A14B model, each a lazy mapping of Wan keys."""

    high: Mapping
    low: Mapping

    def expert(self, name: str) -> Mapping:
        return self.high if name == "high" else self.low


@dataclass
class Roles:
    topo: Topology
    ranges: dict[str, list[tuple[int, int]]]  # role -> stage split (training/partition.py)
    student: nn.Module  # WanModel stage, or DecoupledStudent around one
    teacher: WanModel | WanExperts | None
    fake: WanModel | WanExperts | None
    disc: Discriminator | None  # heads for the discriminator layers on this stage
    disc_layers: tuple[int, ...]  # all of them (the GAN losses average over every head)

    def trainable(self) -> dict[str, nn.Module]:
        out = {"student": self.student}
        if self.fake is not None:
            out["fake"] = self.fake
        if self.disc is not None:
            out["disc"] = self.disc
        return out


def teacher_state(res: Resolved):
    """The teacher's full weights as a lazy mapping (ExpertStates for a two-expert preset); its config must match
    the recipe's model."""
    path = res.raw.model.teacher
    if path is None:
        return None
    if str(path).startswith("random:"):  # smoke runs: a seeded random teacher made on the spot
        seed = int(str(path).split(":", 1)[1])
        if res.boundary is not None:
            return ExpertStates(fresh_wan_state(res.wan, seed, zero_head=False),
                                fresh_wan_state(res.wan, seed + 1, zero_head=False))
        return fresh_wan_state(res.wan, seed, zero_head=False)
    two = expert_dirs(path) is not None
    if two != (res.boundary is not None):
        want = "a two-expert (A14B) preset" if two else "a single-model preset"
        raise RecipeError(f"the teacher checkpoint {path} holds {'two experts' if two else 'one model'}: use {want} "
                          f"for model.preset (now {res.raw.model.preset!r})")
    ckpts = [WanCheckpoint(path, WanModel, expert=e) for e in ("high", "low")] if two else [WanCheckpoint(path, WanModel)]
    for ckpt in ckpts:
        if ckpt.config != res.wan:
            diff = {f: (getattr(ckpt.config, f), getattr(res.wan, f)) for f in ckpt.config.__dataclass_fields__
                    if getattr(ckpt.config, f) != getattr(res.wan, f)}
            raise RecipeError(f"the teacher checkpoint {ckpt.dir} does not match model.preset="
                              f"{res.raw.model.preset!r}: {diff} (checkpoint, recipe); fix model.preset/"
                              "model.overrides or model.teacher")
    return ExpertStates(*ckpts) if two else ckpts[0]


def fresh_wan_state(cfg: WanConfig, seed: int, zero_head: bool = True) -> dict[str, torch.Tensor]:
    """A randomly initialised Wan (the original init scheme), drawn on CPU from `seed`.

    zero_head=False gives the output head small random weights, so a random *teacher* is not constant zero.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanModel(cfg)
        model.init_weights()
        if not zero_head:
            torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.state_dict()


def student_extras(cfg: WanConfig, student_cfg, seed: int) -> dict[str, torch.Tensor]:
    """The decoupled student's new tensors (fusion, s and s−r time embeddings), drawn on CPU from `seed`."""
    with torch.device("meta"):
        wan = WanModel(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = DecoupledStudent(wan, student_cfg)
    return {k: v for k, v in student.state_dict().items() if not k.startswith("wan.")}


def read_student_init(path, res: Resolved) -> Mapping:
    """model.init: a Wan checkpoint, or a TMD student export (Wan weights + extras) for a decoupled student."""
    if res.student is not None:
        return read_student_export(path, res.wan, res.student)
    return WanCheckpoint(path, WanModel)


def _backend(res: Resolved, full: Mapping | None) -> str:
    """The recipe's backend; shapes-only (planner) builds use torch's layers, whose names and shard shapes TE's
    equal (tests/test_te_backend.py), so a TE recipe plans on a machine without Transformer Engine."""
    return res.raw.model.backend if full is not None else "torch"


def _build_wan(cfg: WanConfig, topo: Topology, res: Resolved, ranges, full, frozen_dtype=None):
    """A Wan stage filled from `full`; full=None leaves it on the meta device (shapes only, for the planner).
    For a two-expert preset (full: ExpertStates, or None) both experts as one WanExperts."""
    if res.boundary is not None:
        high, low = (_build_one_wan(cfg, topo, res, ranges, None if full is None else full.expert(e), frozen_dtype)
                     for e in ("high", "low"))
        return WanExperts(high, low, res.boundary)
    return _build_one_wan(cfg, topo, res, ranges, full, frozen_dtype)


def _build_one_wan(cfg: WanConfig, topo: Topology, res: Resolved, ranges, full: Mapping | None, frozen_dtype=None):
    p = res.raw.parallel
    model = build_stage_model(cfg, topo, sequence_parallel=p.sequence_parallel, cp_comm=p.cp_comm,
                              attention=p.attention, backend=_backend(res, full), stage_ranges=ranges)
    if full is None:
        return model
    model.to_empty(device=topo.device)
    load_full_state(model, full, topo)
    model.activation_checkpointing = p.activation_checkpointing
    if frozen_dtype is not None:
        model.requires_grad_(False)
        cast_frozen(model, frozen_dtype)
    if res.raw.model.compile:
        model.compile_blocks()
    return model


def _build_student(res: Resolved, topo: Topology, ranges, full: Mapping | None) -> DecoupledStudent:
    """full: the student's single-device state (`wan.*` keys plus the extras); None: meta device only."""
    p = res.raw.parallel
    wan = build_stage_model(res.wan, topo, sequence_parallel=p.sequence_parallel, cp_comm=p.cp_comm,
                            attention=p.attention, backend=_backend(res, full), stage_ranges=ranges)
    tied = {}
    with torch.device("meta"):
        student = DecoupledStudent(wan, res.student)
        span = wan.stage
        if not span.first:
            student.delta_time_embedding = None
            if res.student.head_time == "outer":
                student.inner_time_embedding = None
        if not span.last:
            student.fusion = None
        elif not span.first:
            cfg = res.wan
            student.head_patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
            tied = {f"head_patch_embedding.{k}": full[f"wan.patch_embedding.{k}"] for k in ("weight", "bias")} \
                if full is not None else {}
    if full is None:
        return student
    student.to_empty(device=topo.device)
    load_full_state(student, Prefixed(full, "", tied), topo)
    wan.activation_checkpointing = p.activation_checkpointing
    if res.raw.model.compile:
        student.compile_blocks()
    return student


def build_roles(res: Resolved, topo: Topology, teacher_full: Mapping | None = None,
                student_full: Mapping | None = None) -> Roles:
    """teacher_full / student_full override model.teacher / model.init (tests pass in-memory state dicts)."""
    method, seed = res.method, res.raw.run.seed
    split = role_ranges(res, topo.pp.size)
    ranges = split["student"]
    if teacher_full is None:
        teacher_full = teacher_state(res)
    if method != "flow_matching" and teacher_full is None:
        raise RecipeError(f"method {method!r} needs a teacher: set model.teacher=<Wan checkpoint dir>")
    init_expert = teacher_full
    if isinstance(teacher_full, ExpertStates):  # A14B: the student starts from one expert
        init_expert = teacher_full.expert(res.raw.model.student_expert)
    if student_full is None and res.raw.model.init == "teacher":  # smoke runs: skip stage 1
        student_full = init_expert if res.student is None else Prefixed(
            init_expert, "wan.", student_extras(res.wan, res.student, seed))
    elif student_full is None and res.raw.model.init is not None:
        student_full = read_student_init(res.raw.model.init, res)
    if method == "tmd" and student_full is None:
        raise RecipeError("TMD stage 2 starts from the stage-1 student: run method=tm_mf first and set "
                          "model.init=<its out_dir>/export")

    frozen = {"bf16": torch.bfloat16, "fp32": torch.float32}[res.raw.model.teacher_dtype]
    teacher = _build_wan(res.wan, topo, res, split["teacher"], teacher_full, frozen) if teacher_full is not None \
        else None

    if res.student is not None:
        if student_full is None:  # stage 1 starts from the teacher plus fresh extras
            student_full = Prefixed(init_expert, "wan.", student_extras(res.wan, res.student, seed))
        student = _build_student(res, topo, ranges, student_full)
    else:
        source = student_full if student_full is not None else (
            init_expert if method != "flow_matching" else fresh_wan_state(res.wan, seed))
        student = _build_one_wan(res.wan, topo, res, ranges, source)

    fake = disc = None
    layers: tuple[int, ...] = ()
    if method in ("dmd2v", "tmd"):
        fake = _build_wan(res.wan, topo, res, split["fake"], teacher_full)
        cfg = res.dmd2v
        layers = tuple(cfg.disc_layers)
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                full_disc = _discriminator(res, layers)
            start, end = split["teacher"][topo.pp.rank]  # the heads sit with the teacher blocks they read
            local = tuple(i for i in layers if start <= i < end)
            if local:
                disc = _discriminator(res, local)
                disc.load_state_dict({k: v for k, v in full_disc.state_dict().items()
                                      if k.split(".")[1] in {str(i) for i in local}})
                disc.to(topo.device)
    return Roles(topo, split, student, teacher, fake, disc, layers)


def _discriminator(res: Resolved, layers: tuple[int, ...]) -> Discriminator:
    cfg = res.dmd2v
    return Discriminator(res.wan.dim, layers, cfg.disc_width, res.wan.patch_size, cfg.disc_features, cfg.disc_arch)


def meta_roles(res: Resolved, topo: Topology) -> dict[str, nn.Module]:
    """The modules `build_roles` would give this (possibly virtual) rank, on the meta device: exact shapes."""
    split = role_ranges(res, topo.pp.size)
    ranges = split["student"]
    out = {"teacher": _build_wan(res.wan, topo, res, split["teacher"], None)} if res.method != "flow_matching" else {}
    out["student"] = (_build_student(res, topo, ranges, None) if res.student is not None
                      else _build_one_wan(res.wan, topo, res, ranges, None))
    if res.method in ("dmd2v", "tmd"):
        out["fake"] = _build_wan(res.wan, topo, res, split["fake"], None)
        cfg = res.dmd2v
        start, end = split["teacher"][topo.pp.rank]
        local = tuple(i for i in cfg.disc_layers if start <= i < end)
        if cfg.gan_weight > 0 and local:
            with torch.device("meta"):
                out["disc"] = _discriminator(res, local)
    return out
