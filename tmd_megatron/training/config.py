"""The training recipe schema (hydra structured config) and its resolution into typed configs.

recipes/train.yaml composes model/, parallel/, method/, data/ and experiment/ groups onto this schema; every
field can be overridden on the command line (`tmd-train parallel.tp=4 run.max_steps=10`). Algorithm knobs
live in tmd_megatron.algorithms.config (Table 7 defaults per model size); the recipe's method.* dicts are
overrides applied on top, so there is one source of truth for each paper value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf

from tmd_megatron.algorithms.config import MODEL_SIZES, DMD2vConfig, KDConfig, TMMFConfig
from tmd_megatron.models.student import StudentConfig
from tmd_megatron.models.wan import EXPERT_BOUNDARY, WanConfig

METHODS = ("flow_matching", "kd", "tm_mf", "dmd2v", "tmd")


@dataclass
class RunSection:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    max_steps: Optional[int] = None  # None: the method's Table 7 iteration count
    log_every: int = 1
    ckpt_every: int = 50  # steps between checkpoints (0: only at the end and on preemption)
    keep_last: int = 3
    sample_every: int = 0  # steps between preview samples (0: never)
    num_samples: int = 2
    device: str = "auto"  # auto | cpu | cuda
    resume: str = "auto"  # auto (from latest if present) | never | a step number | a checkpoint path
    max_skipped_steps: int = 10  # NaN/Inf steps tolerated before the run stops
    # A file whose appearance asks for "checkpoint and exit 75", like SIGUSR1 (launch/lib.sh writes it): a
    # file cannot kill a rank that is still starting, a signal can (docs/operations.md).
    stop_file: Optional[str] = None
    # A step that takes longer writes every thread's Python stack of each rank to stderr (the job log; a timer
    # thread, training/hang.py), before
    # the 1800 s collective timeout aborts the job with NCCL's flight-recorder dump (launch/env.sh). 0: never.
    hang_dump_s: float = 1500.0
    tensorboard: bool = True
    wandb_project: Optional[str] = None


@dataclass
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # WanConfig fields on top of the preset
    teacher: Optional[str] = None  # teacher checkpoint dir (either format); "random:<seed>" for smoke runs
    init: Optional[str] = None  # initial weights of the trained model (e.g. the stage-1 export); "teacher"
    backend: str = "torch"  # torch | te
    compute_dtype: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights)
    teacher_dtype: str = "fp32"  # frozen teacher weights: bf16 halves its memory on GPU
    # Two-expert presets (Wan2.2 A14B): t at and above which the high-noise expert runs (None: the preset's, 0.875
    # T2V / 0.9 I2V), and the expert the student starts from (docs/wan_family.md, "A14B student").
    boundary: Optional[float] = None
    student_expert: str = "high"  # high | low
    # Regional torch.compile of every DiT block (and the student's fusion block) of every role; transfers stay
    # eager (parallel/comm.py). The first steps pay the compilation.
    compile: bool = False


@dataclass
class ParallelSection:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    cp_comm: str = "ring"  # ring | ulysses
    attention: str = "sdpa"  # sdpa | flash
    schedule: str = "1f1b"  # 1f1b | gpipe
    microbatches: int = 1  # per optimizer step and DP rank (gradient accumulation / pipeline depth)
    micro_batch_size: Optional[int] = None  # if set: microbatches = per-rank batch / this (any world size)
    zero1: bool = True
    activation_checkpointing: bool = False


@dataclass
class DistillSection:
    outer_steps: int = 2  # M
    inner_steps: int = 4  # N (TMD)
    head_blocks: int = 5  # H (TMD)


def _overrides_of(cls) -> type:
    """A schema with every field of `cls` optional (None = the paper's value for the model size), so each knob
    can be set from the command line without `+` and a misspelt one is refused by hydra."""
    fields = [(f.name, Optional[Any], dataclasses.field(default=None)) for f in dataclasses.fields(cls)]
    return dataclasses.make_dataclass(f"{cls.__name__}Overrides", fields)


@dataclass
class FlowMatchingConfig:
    """Teacher pretraining by flow matching (tiny CPU teachers; not part of the paper)."""

    t_shift: float = 3.0  # γ of the shifted-uniform training time
    cond_dropout: float = 0.1  # prompt replaced by the negative prompt, so the teacher supports CFG


StudentOverrides = _overrides_of(StudentConfig)
TMMFOverrides = _overrides_of(TMMFConfig)
DMD2vOverrides = _overrides_of(DMD2vConfig)
KDOverrides = _overrides_of(KDConfig)


@dataclass
class MethodSection:
    name: str = "tmd"
    student: StudentOverrides = field(default_factory=StudentOverrides)
    tm_mf: TMMFOverrides = field(default_factory=TMMFOverrides)
    dmd2v: DMD2vOverrides = field(default_factory=DMD2vOverrides)
    kd: KDOverrides = field(default_factory=KDOverrides)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)


@dataclass
class DataSection:
    source: str = "synthetic"  # synthetic | shards
    shards: Any = field(default_factory=list)  # a directory, glob or .tar path, or a list of them
    loader: str = "torch"  # torch | dali
    global_batch: int = 8
    on_corrupt: str = "raise"  # raise | skip
    negative: str = "zeros"  # zeros | path to a .pt tensor [T, C] (the umT5 embedding of Table 8's prompt)
    latent: list = field(default_factory=lambda: [16, 3, 8, 8])  # C, F, H, W (for the planner)
    # TI2V models: condition every sample on its first latent frame (I2V models always are; T2V never)
    image_condition: bool = True
    synthetic: dict = field(default_factory=lambda: {"num_samples": 256, "seed": 0})


@dataclass
class OptimSection:
    lr: Optional[float] = None  # None: the method's Table 7 value
    lr_fake: Optional[float] = None
    lr_disc: Optional[float] = None
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    warmup_steps: int = 0
    schedule: str = "constant"
    ema_decay: float = 0.0  # 0 disables the student EMA


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    distill: DistillSection = field(default_factory=DistillSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    meta: dict = field(default_factory=dict)  # free-form, e.g. the experiment's paper reference


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


class RecipeError(ValueError):
    """A recipe value that cannot work; the message names the fix."""


@dataclass(frozen=True)
class Resolved:
    """A recipe turned into the typed configs the trainer builds from."""

    raw: TrainConfig
    wan: WanConfig
    student: StudentConfig | None
    tm_mf: TMMFConfig | None
    dmd2v: DMD2vConfig | None
    kd: KDConfig | None
    boundary: float | None  # two-expert (A14B) teacher and fake score: the switch point t; None for one model
    lr: float
    lr_fake: float
    lr_disc: float
    max_steps: int

    @property
    def method(self) -> str:
        return self.raw.method.name


def _algo(cls, preset: str, overrides: dict, where: str):
    try:
        if preset in MODEL_SIZES:
            return cls.for_model(preset, **overrides)
        return cls(**overrides)
    except TypeError as err:
        names = sorted(f.name for f in dataclasses.fields(cls))
        raise RecipeError(f"{where}: {err}; known fields: {names}") from None
    except ValueError as err:
        raise RecipeError(f"{where}: {err}") from None


def _plain(d) -> dict:
    """Set knobs only (None = the default), lists as tuples."""
    if OmegaConf.is_config(d):
        d = OmegaConf.to_container(d, resolve=True)
    elif dataclasses.is_dataclass(d):
        d = dataclasses.asdict(d)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d).items() if v is not None}


# Free-form dicts of the schema: any key is meaningful there (checked later against WanConfig or the task).
FREE_FORM = ("meta", "model.overrides", "data.synthetic")


def unknown_keys(cfg: dict, cls=None, prefix: str = "") -> list[str]:
    """Recipe keys the schema does not have. Hydra lets `+key=value` (and a key in an experiment yaml) add them,
    and they would be dropped without a word."""
    import typing

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if k not in hints:
            out.append(path)
        elif isinstance(v, dict) and dataclasses.is_dataclass(hints[k]) and path not in FREE_FORM:
            out += unknown_keys(v, hints[k], path + ".")
    return out


def to_schema(cfg: Any) -> TrainConfig:
    """A composed DictConfig (or a TrainConfig) as a TrainConfig object, with interpolations resolved."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if OmegaConf.is_config(cfg):
        plain = OmegaConf.to_container(cfg, resolve=False)
        unknown = unknown_keys({k: v for k, v in plain.items() if k != "hydra"})
        if unknown:
            raise RecipeError(f"unknown recipe keys {unknown}: check the spelling against recipes/train.yaml and "
                              "training/config.py (keys added with + are not read by anything)")
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)


def resolve(cfg: Any) -> Resolved:
    raw = to_schema(cfg)
    m = raw.method
    if m.name not in METHODS:
        raise RecipeError(f"method.name={m.name!r} is unknown; choose one of {METHODS}")
    try:
        wan = WanConfig.preset(raw.model.preset).replace(**_plain(raw.model.overrides))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"model: {err}") from None
    preset, d = raw.model.preset, raw.distill
    boundary = EXPERT_BOUNDARY.get(preset) if raw.model.boundary is None else raw.model.boundary
    if raw.model.boundary is not None and preset not in EXPERT_BOUNDARY:
        raise RecipeError(f"model.boundary is for two-expert presets {sorted(EXPERT_BOUNDARY)}; "
                          f"{preset!r} is one model: remove model.boundary")
    if boundary is not None and not 0.0 < boundary < 1.0:
        raise RecipeError(f"model.boundary={boundary} must lie in (0, 1) (Wan2.2: 0.875 T2V, 0.9 I2V)")
    if raw.model.student_expert not in ("high", "low"):
        raise RecipeError(f"model.student_expert={raw.model.student_expert!r}; choose 'high' or 'low'")
    student = None
    if m.name in ("tm_mf", "tmd"):
        try:
            student = StudentConfig(**{"flow_head_blocks": d.head_blocks, **_plain(m.student)})
        except (TypeError, ValueError) as err:
            raise RecipeError(f"method.student: {err}") from None
    steps = {"outer_steps": d.outer_steps, "inner_steps": d.inner_steps}
    tm_mf = _algo(TMMFConfig, preset, {**steps, **_plain(m.tm_mf)}, "method.tm_mf") if m.name == "tm_mf" else None
    dmd2v = None
    if m.name in ("dmd2v", "tmd"):
        dmd2v = _algo(DMD2vConfig, preset, {**steps, **_plain(m.dmd2v)}, "method.dmd2v")
    kd = _algo(KDConfig, preset, _plain(m.kd), "method.kd") if m.name == "kd" else None
    o = raw.optim
    default_lr = {"tm_mf": tm_mf and tm_mf.lr, "kd": kd and kd.lr, "flow_matching": 1e-4}.get(m.name)
    if dmd2v is not None:
        default_lr = dmd2v.lr_student
    lr = o.lr if o.lr is not None else default_lr
    lr_fake = o.lr_fake if o.lr_fake is not None else (dmd2v.lr_fake if dmd2v else lr)
    lr_disc = o.lr_disc if o.lr_disc is not None else (dmd2v.lr_disc if dmd2v else lr)
    max_steps = raw.run.max_steps
    if max_steps is None:
        paper = {"tm_mf": tm_mf and tm_mf.max_iters, "kd": kd and kd.max_iters}.get(m.name)
        max_steps = dmd2v.max_iters if dmd2v is not None else paper
        if max_steps is None:
            raise RecipeError(f"run.max_steps is not set and method {m.name!r} has no paper default; set run.max_steps")
    return Resolved(raw, wan, student, tm_mf, dmd2v, kd, boundary, lr, lr_fake, lr_disc, max_steps)


def recipe_dir():
    """$TMD_RECIPES, else recipes/ of the source checkout this package runs from (editable installs), else the
    copy shipped inside the package (tmd_megatron/recipes/, what a wheel or a non-editable install has)."""
    import os
    from pathlib import Path

    if os.environ.get("TMD_RECIPES"):
        return Path(os.environ["TMD_RECIPES"])
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "recipes"
    return checkout if (checkout / "train.yaml").exists() else package / "recipes"


def compose(overrides=(), config_name: str = "train"):
    """The composed recipe for command-line style overrides, without running a hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(recipe_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)


def num_microbatches(res: "Resolved", dp: int) -> int:
    """Microbatches per step on each DP rank: from parallel.micro_batch_size when set, else parallel.microbatches."""
    p = res.raw.parallel
    local = res.raw.data.global_batch // dp if dp and res.raw.data.global_batch % dp == 0 else res.raw.data.global_batch
    if p.micro_batch_size:
        return max(1, local // p.micro_batch_size)
    return p.microbatches


def describe_error(err: BaseException) -> str:
    """An error's text for the operator. Hydra's answer to a misspelt key suggests adding it with `+`, which
    would only add a key nothing reads (refused by `to_schema`): name the spelling instead."""
    import re

    text = str(err)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and "+" in text:
        return (f"{m.group(1)} is not a recipe key: check its spelling (the keys are in training/config.py; "
                "`tmd-plan <recipe> --world N` shows whether a recipe composes)")
    return text
