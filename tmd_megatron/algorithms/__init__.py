"""The paper's equations as functions of tensors and modules; no process groups anywhere in here.

Two levels: pure per-equation functions (timesteps, transition, guidance, jvp, and the loss functions in
tm_mf / dmd2v / kd) that a pipelined trainer can call stage by stage, and single-device steps
(`tm_mf_loss`, `dmd2v_generator_loss`, `fake_score_loss`, `discriminator_loss`, `kd_loss`) composing them.
"""
from .common import Batch
from .config import DMD2vConfig, GeneralConfig, KDConfig, TMMFConfig
from .dmd2v import dmd2v_generator_loss, discriminator_loss, fake_score_loss, generate, student_sample
from .kd import kd_loss, teacher_ode_pairs
from .sampling import BlockCounter, dmd2v_sample, effective_nfe, teacher_euler_sample, tmd_sample
from .tm_mf import tm_mf_loss

__all__ = [
    "Batch",
    "BlockCounter",
    "DMD2vConfig",
    "GeneralConfig",
    "KDConfig",
    "TMMFConfig",
    "discriminator_loss",
    "dmd2v_generator_loss",
    "dmd2v_sample",
    "effective_nfe",
    "fake_score_loss",
    "generate",
    "kd_loss",
    "student_sample",
    "teacher_euler_sample",
    "teacher_ode_pairs",
    "tm_mf_loss",
    "tmd_sample",
]
