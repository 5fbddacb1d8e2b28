"""Table 7 defaults per model size, config validation, and the FD-JVP benchmark script (smoke)."""
import pytest

from algo_helpers import single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms import DMD2vConfig, GeneralConfig, KDConfig, TMMFConfig
from tmd_megatron.algorithms.bench_jvp import main as bench_main
from tmd_megatron.models.student import StudentConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_table7_values_for_both_model_sizes():
    small, large = TMMFConfig.for_model("wan2.1-t2v-1.3b"), TMMFConfig.for_model("wan2.1-t2v-14b")
    assert (small.cfg_scale, small.inner_shift, small.s_shift) == (3.0, 10.0, 3.0)
    assert (small.fd_delta, small.cond_dropout, small.jvp) == (5e-3, 0.1, "fd")
    assert (small.norm_const_per_dim, small.lr, small.max_iters) == (1.0, 3e-5, 3000)
    assert (large.norm_const_per_dim, large.lr, large.max_iters) == (1e-5, 1e-5, 3000)
    assert (small.s_min, small.s_max, small.r_equals_s) == (0.001, 0.999, 0.75)
    d_small, d_large = DMD2vConfig.for_model("1.3b"), DMD2vConfig.for_model("14b")
    assert d_small.disc_layers == (15, 22, 29) and d_large.disc_layers == (19, 29, 39)
    assert (d_small.cfg_scale, d_small.gan_weight, d_small.t_shift, d_small.student_every) == (5.0, 0.03, 5.0, 5)
    assert (d_small.lr_student, d_small.lr_disc, d_small.lr_fake) == (1e-5, 1e-5, 1e-5)
    assert (d_small.t_min, d_small.t_max_dmd, d_small.outer_shift) == (0.001, 0.999, 10.0)
    assert d_small.max_iters == 4000 and d_small.replace(outer_steps=1).max_iters == 12000
    assert d_large.max_iters == 1000 and d_large.replace(outer_steps=1).max_iters == 5000
    assert d_small.replace(outer_steps=1).use_kd_warmup and not d_small.use_kd_warmup
    kd_small, kd_large = KDConfig.for_model("1.3b"), KDConfig.for_model("14b")
    assert (kd_small.num_trajectories, kd_small.cfg_scale) == (10_000, 5.0)
    assert (kd_small.skip_layers, kd_small.lr) == ((10,), 7e-5)
    assert (kd_small.max_iters, kd_large.max_iters) == (10_000, 5_000)
    general = GeneralConfig.for_model("14b")
    assert general.betas == (0.9, 0.99) and general.weight_decay == 0.01 and general.adam_eps == 1e-8
    assert general.global_batch == 64 and general.latent_shape == (16, 21, 60, 104) and general.parallelism == "fsdp"
    student = StudentConfig()
    assert (student.fusion, student.flow_head_blocks, student.target) == ("gated", 5, "dtm")


def test_invalid_configs_name_the_fix():
    with pytest.raises(ValueError, match="no paper defaults"):
        TMMFConfig.for_model("wan2.2")
    with pytest.raises(ValueError, match="cond_dropout"):
        TMMFConfig(cond_dropout=1.5)
    with pytest.raises(ValueError, match="choose 'fd' or 'exact'"):
        TMMFConfig(jvp="autograd")
    with pytest.raises(ValueError, match="s_min"):
        TMMFConfig(s_min=0.9, s_max=0.5)
    with pytest.raises(ValueError, match="vsd_norm"):
        DMD2vConfig(vsd_norm="l2")
    with pytest.raises(ValueError, match="choose 'conv3d' or 'multiscale'"):
        DMD2vConfig(disc_arch="mlp")


def test_benchmark_script_prints_both_tables(capsys):
    bench_main(["--quick"])
    out = capsys.readouterr().out
    assert out.count("relative L2 error") == 2 and "TM-MF step fwd+bwd, jvp=exact" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("1e-03 |")]
    assert len(rows) == 2 and all(float(r[2]) < 0.2 for r in rows)
