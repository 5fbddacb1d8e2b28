"""One configuration dataclass per algorithm with every Table 7 knob at its paper default.

`Config.for_model(preset)` returns the defaults of Wan2.1 1.3B or 14B (they differ in the loss constant c,
learning rates, iteration counts and discriminator layers). Values that Table 7 does not give carry a comment
saying where they come from. docs/algorithms.md lists Table 7 against these fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The paper has Table 7 values for Wan2.1 T2V 1.3B and 14B. The other 14B-class DiTs (40 blocks of width 5120) take
# the 14B column; TI2V-5B (30 blocks like the 1.3B, so the same discriminator layers) takes the 1.3B column: our
# choice, not the paper's (docs/wan_family.md).
MODEL_SIZES = {"wan2.1-t2v-1.3b": "1.3b", "wan2.1-t2v-14b": "14b", "1.3b": "1.3b", "14b": "14b",
               "wan2.1-i2v-14b": "14b", "wan2.2-t2v-a14b": "14b", "wan2.2-i2v-a14b": "14b", "wan2.2-ti2v-5b": "1.3b"}


def _size(preset: str) -> str:
    try:
        return MODEL_SIZES[preset]
    except KeyError:
        raise ValueError(f"no paper defaults for {preset!r}; choose one of {sorted(MODEL_SIZES)}") from None


def _check_unit(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} must lie in [{lo}, {hi}]")


def _check_positive(cfg, *names: str) -> None:
    """Time shifts γ and learning rates: γ <= 0 is no shift at all (t = γt'/((γ−1)t'+1) leaves [0, 1])."""
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be positive")


def _check_non_negative(cfg, *names: str) -> None:
    """Guidance scales and loss weights: a negative value inverts the term (0 switches it off)."""
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 0 (0 switches it off)")


@dataclass(frozen=True)
class GeneralConfig:
    """Table 7 "General settings" (shared by all stages)."""

    resolution: tuple[int, int] = (480, 832)  # pixels (H, W)
    frames: int = 81  # 5 s
    latent_shape: tuple[int, int, int, int] = (16, 21, 60, 104)  # C, T, H, W
    dataset_size: int = 500_000  # 479k after filtering; prompts: VidProM + Qwen2.5-7B, videos: Wan2.1 14B
    global_batch: int = 64
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    outer_shift: float = 10.0  # γ for t_student
    sampling: str = "deterministic"  # multi-step sampling (App. A.3)
    precision: str = "bf16"  # time t in fp64 (algorithms.timesteps.T_DTYPE)
    parallelism: str = "ddp"  # 1.3B: DDP on A100; 14B: FSDP on H100

    @classmethod
    def for_model(cls, preset: str) -> "GeneralConfig":
        return cls(parallelism="fsdp") if _size(preset) == "14b" else cls()


@dataclass(frozen=True)
class TMMFConfig:
    """Stage 1, transition matching MeanFlow (Sec. 3.1, App. A.2, Algorithm 2)."""

    outer_steps: int = 2  # M (experiment setting; the paper reports M = 1, 2)
    inner_steps: int = 4  # N (experiment setting; N4H5 is reported for both sizes)
    outer_shift: float = 10.0  # γ for t_student
    inner_shift: float = 10.0  # γ for s_student
    t_max: float = 0.999  # t_M = s_N
    s_shift: float = 3.0  # γ for s_mf
    s_min: float = 0.001
    s_max: float = 0.999
    r_equals_s: float = 0.75  # fraction of samples trained with r = s (flow matching)
    cfg_scale: float = 3.0
    cfg_source: str = "student"  # unconditional velocity: the student itself at r = s (MeanFlow) or "teacher"
    cond_dropout: float = 0.1  # replaced by the negative prompt
    jvp: str = "fd"  # "fd" (paper) | "exact" (torch.func.jvp reference)
    fd_delta: float = 5e-3
    # Precision of the two finite-difference flow-head passes under bf16 training: "fp32" runs them with autocast
    # off (NVlabs/FastGen's Wan MeanFlow does, precision_amp_jvp=float32), "compute" in the training autocast.
    # bf16 rounding over 2δ = 1e-2 swamps the derivative at 1.3B width (docs/algorithms.md, FD-JVP precision).
    fd_dtype: str = "fp32"
    norm_const_per_dim: float = 1.0  # c = norm_const_per_dim · d; Table 7: c = d (1.3B), 1e-5·d (14B)
    # Linear warm-up of the JVP term over this many updates (tm_mf.jvp_warmup_weight); 0 = off (the paper says
    # nothing). FastGen's Wan MeanFlow uses 2000 (configs/experiments/WanT2V/config_mf.py, tangent_warmup_steps).
    jvp_warmup_iters: int = 0
    lr: float = 3e-5
    max_iters: int = 3000

    def __post_init__(self):
        if self.outer_steps < 1 or self.inner_steps < 1:
            raise ValueError(f"outer_steps={self.outer_steps} and inner_steps={self.inner_steps} must be >= 1")
        for name in ("t_max", "s_min", "s_max", "r_equals_s", "cond_dropout"):
            _check_unit(name, getattr(self, name))
        if self.s_min >= self.s_max:
            raise ValueError(f"s_min={self.s_min} must be below s_max={self.s_max}")
        if self.cfg_source not in ("student", "teacher"):
            raise ValueError(f"cfg_source={self.cfg_source!r}; choose 'student' or 'teacher'")
        if self.jvp not in ("fd", "exact"):
            raise ValueError(f"jvp={self.jvp!r}; choose 'fd' or 'exact'")
        if self.fd_dtype not in ("fp32", "compute"):
            raise ValueError(f"fd_dtype={self.fd_dtype!r}; choose 'fp32' or 'compute'")
        if self.jvp_warmup_iters < 0:
            raise ValueError(f"jvp_warmup_iters={self.jvp_warmup_iters} must be >= 0 (0 switches the warm-up off)")
        if self.fd_delta <= 0 or self.norm_const_per_dim < 0:
            raise ValueError("fd_delta must be positive and norm_const_per_dim non-negative")
        _check_positive(self, "outer_shift", "inner_shift", "s_shift", "lr")
        _check_non_negative(self, "cfg_scale")

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "TMMFConfig":
        paper = {"1.3b": dict(norm_const_per_dim=1.0, lr=3e-5), "14b": dict(norm_const_per_dim=1e-5, lr=1e-5)}
        return cls(**{**paper[_size(preset)], **overrides})

    def replace(self, **changes) -> "TMMFConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DMD2vConfig:
    """Stage 2 / the DMD2-v baseline (Sec. 3.2, App. A.3); TMD uses it unchanged with a decoupled student."""

    outer_steps: int = 2  # M
    inner_steps: int = 4  # N (TMD only)
    outer_shift: float = 10.0  # γ for t_student (App. B.6: 5 for M = 4)
    inner_shift: float = 10.0  # γ for s_student (TMD)
    t_max: float = 0.999
    cfg_scale: float = 5.0
    fake_score_arch: str = "teacher"  # "same as teacher", initialised from it
    # "conv3d": ours, sized by disc_width; "multiscale": FastGen's multiscale_down_mlp_large structure, sized by
    # the features alone (1.3B: 67.9M = Table 7's 68M; 14B: 707.9M, not 172M; docs/algorithms.md)
    disc_arch: str = "conv3d"
    disc_layers: tuple[int, ...] = (15, 22, 29)
    disc_width: int = 384  # conv3d only; ours: sized so the heads total ≈ Table 7's 68M (1.3B) / 172M (14B)
    disc_features: str = "unpatchify"  # App. A.3 "unpatchified teacher features"; "grid" = [B, D, F', H', W']
    gan_weight: float = 0.03  # λ
    gan_same_noise: bool = True  # real data noised with the fake sample's (t, noise)
    lr_student: float = 1e-5
    lr_disc: float = 1e-5
    lr_fake: float = 1e-5
    t_shift: float = 5.0  # γ for t_dmd
    t_min: float = 0.001
    t_max_dmd: float = 0.999
    student_every: int = 5  # student updated every 5th iteration
    max_iters_multi: int = 4000  # M >= 2
    max_iters_one: int = 12000  # M = 1
    # "dmd": 1/(mean|x̂ − g_teacher| + 1e-6) as the authors' FastGen does (fastgen/methods/common_loss.py:89-90);
    # "teacher_fake": ||g_fake − g_teacher||_1 as App. A.3 prints it (our default before issue 14).
    vsd_norm: str = "dmd"
    fake_target: str = "x0"  # DSM on g_fake = x_t − t·v (A.3 "analogous to Eq. 17"); "flow": on v
    rollout_form: str = "outer"  # transition.rollout_output
    # TMD: differentiate through "all" N inner steps of the flow-head rollout (Sec. 3.2), or the "last" one only
    # (the earlier steps detached: the no-rollout ablation of Fig. 7)
    rollout_grad: str = "all"
    kd_warmup: bool | None = None  # None: only for one-step plain DMD2-v (Sec. 3.2)

    def __post_init__(self):
        if self.outer_steps < 1 or self.inner_steps < 1 or self.student_every < 1:
            raise ValueError("outer_steps, inner_steps and student_every must be >= 1")
        for name in ("t_max", "t_min", "t_max_dmd"):
            _check_unit(name, getattr(self, name))
        if self.vsd_norm not in ("teacher_fake", "dmd"):
            raise ValueError(f"vsd_norm={self.vsd_norm!r}; choose 'teacher_fake' or 'dmd'")
        if self.rollout_grad not in ("all", "last"):
            raise ValueError(f"rollout_grad={self.rollout_grad!r}; choose 'all' or 'last'")
        if self.fake_target not in ("x0", "flow"):
            raise ValueError(f"fake_target={self.fake_target!r}; choose 'x0' or 'flow'")
        if self.disc_arch not in ("conv3d", "multiscale"):
            raise ValueError(f"disc_arch={self.disc_arch!r}; choose 'conv3d' or 'multiscale'")
        if self.disc_features not in ("unpatchify", "grid"):
            raise ValueError(f"disc_features={self.disc_features!r}; choose 'unpatchify' or 'grid'")
        _check_positive(self, "outer_shift", "inner_shift", "t_shift", "lr_student", "lr_disc", "lr_fake",
                        "disc_width")
        _check_non_negative(self, "cfg_scale", "gan_weight")

    @property
    def max_iters(self) -> int:
        return self.max_iters_one if self.outer_steps == 1 else self.max_iters_multi

    @property
    def use_kd_warmup(self) -> bool:
        return self.outer_steps == 1 if self.kd_warmup is None else self.kd_warmup

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "DMD2vConfig":
        paper = {
            "1.3b": dict(disc_layers=(15, 22, 29), disc_width=384, max_iters_multi=4000, max_iters_one=12000),
            "14b": dict(disc_layers=(19, 29, 39), disc_width=512, max_iters_multi=1000, max_iters_one=5000),
        }
        return cls(**{**paper[_size(preset)], **overrides})

    def replace(self, **changes) -> "DMD2vConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class KDConfig:
    """KD warm-up of one-step students (Table 7 "Baselines: KD")."""

    num_trajectories: int = 10_000
    cfg_scale: float = 5.0
    skip_layers: tuple[int, ...] = (10,)  # skipped in the unconditional teacher pass
    lr: float = 7e-5
    max_iters: int = 10_000
    teacher_steps: int = 50  # ours: Wan's default sampler length (not in Table 7)
    teacher_shift: float = 5.0  # ours: Wan's default sample_shift (not in Table 7)
    t_max: float = 0.999  # the one-step student's input time

    def __post_init__(self):
        if self.num_trajectories < 1 or self.teacher_steps < 1:
            raise ValueError("num_trajectories and teacher_steps must be >= 1")
        _check_unit("t_max", self.t_max)
        _check_positive(self, "teacher_shift", "lr")
        _check_non_negative(self, "cfg_scale")

    @classmethod
    def for_model(cls, preset: str, **overrides) -> "KDConfig":
        paper = {"1.3b": dict(max_iters=10_000), "14b": dict(max_iters=5_000)}
        return cls(**{**paper[_size(preset)], **overrides})
