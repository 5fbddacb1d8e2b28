"""Ablations of `make bench-quality` in the shape of the paper's Tables 3-6, 9, 10 and Figure 7: each a named set of
arms, a baseline arm of the main table and variants of it that change one thing.

    python -m tmd_megatron.bench.quality --ablation vsd-norm --teacher runs/bench_quality/runs/teacher/export

An arm is a main-table method with a variant name appended: ("tmd", M, N, variant) or ("dmd2v", M, kd, variant).
A variant adds recipe overrides to stage 1, to stage 2, or skips stage 1. The baseline arm has the same cache key
as the main table's, so an ablation after `make bench-quality` in the same --out runs only its variants.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    what: str
    stage1: tuple[str, ...] = ()
    stage2: tuple[str, ...] = ()
    skip_stage1: bool = False  # stage 2 straight from the teacher (model.init=teacher)


_BOTH = lambda *o: dict(stage1=o, stage2=o)  # noqa: E731 (the student's structure: both stages)

VARIANTS = {
    "no-stage1": Variant("TMD stage 2 straight from the teacher, no TM-MF", skip_stage1=True),
    "tm": Variant("stage 1 by transition matching alone: every sample at r = s, no MeanFlow term",
                  stage1=("method.tm_mf.r_equals_s=1.0",)),
    "head-time-inner": Variant("flow head modulated by the inner time s alone, the paper's literal reading",
                               **_BOTH("method.student.head_time=inner")),
    "no-rollout-grad": Variant("flow-head rollout differentiated through its last inner step only (Fig. 7)",
                               stage2=("method.dmd2v.rollout_grad=last",)),
    "vsd-printed": Variant("VSD normalised by ||g_fake - g_teacher||_1 as App. A.3 prints it",
                           stage2=("method.dmd2v.vsd_norm=teacher_fake",)),
    "gan-off": Variant("no GAN term (lambda = 0)", stage2=("method.dmd2v.gan_weight=0",)),
    "multiscale-head": Variant("FastGen's multiscale discriminator head instead of our Conv3D",
                               stage2=("method.dmd2v.disc_arch=multiscale",)),
    "exact-jvp": Variant("TM-MF with the exact JVP (torch.func) instead of the finite difference",
                         stage1=("method.tm_mf.jvp=exact",)),
    "concat-fusion": Variant("concatenation fusion instead of the gated one (App. B.3)",
                             **_BOTH("method.student.fusion=concat")),
    "x-target": Variant("the flow head predicts x instead of the DTM target x_1 - x (App. B.4)",
                        **_BOTH("method.student.target=x")),
    "no-shifts": Variant("t_student and t_dmd unshifted (gamma = 1)",
                         **_BOTH("method.tm_mf.outer_shift=1", "method.dmd2v.outer_shift=1",
                                 "method.dmd2v.t_shift=1")),
}

TMD = ("tmd", 2, 2)
ABLATIONS = {  # name -> arms; the first is the baseline
    "stage1": [TMD, TMD + ("no-stage1",)],
    "tm-vs-tm-mf": [TMD, TMD + ("tm",)],
    "rollout-grad": [TMD, TMD + ("no-rollout-grad",)],
    "head-time": [TMD, TMD + ("head-time-inner",)],
    "vsd-norm": [TMD, TMD + ("vsd-printed",)],
    "gan": [TMD, TMD + ("gan-off",)],
    "disc-head": [TMD, TMD + ("multiscale-head",)],
    "kd": [("dmd2v", 1, 1), ("dmd2v", 1, 0), ("dmd2v", 2, 1), ("dmd2v", 2, 0)],
    "shifts": [TMD, TMD + ("no-shifts",)],
    "fusion": [TMD, TMD + ("concat-fusion",)],
    "target": [TMD, TMD + ("x-target",)],
    "jvp": [TMD, TMD + ("exact-jvp",)],
}


def variant_of(method: tuple) -> Variant | None:
    name = method[3] if len(method) > 3 else None
    if name is None:
        return None
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r} in {list(method)}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]
