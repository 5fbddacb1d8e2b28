"""Benchmarks (tmd_megatron/bench): the score and communication formulas against independent references, and a
smoke run of each benchmark script so they cannot rot."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tmd_megatron.bench import comm_bound
from tmd_megatron.bench.scores import RealReference, Scores, frechet_distance, score_clips
from tmd_megatron.models.wan import WanConfig


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # Large samples of N(μ_a, diag a) and N(μ_b, diag b): FD → |μ_a − μ_b|² + Σ(√a − √b)².
    g = torch.Generator().manual_seed(0)
    a_var, b_var = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 1.0, 0.25])
    mu_a, mu_b = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([0.5, 1.0, 0.0])
    a = mu_a + a_var.sqrt() * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    b = mu_b + b_var.sqrt() * torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    expected = float((mu_a - mu_b).pow(2).sum() + (a_var.sqrt() - b_var.sqrt()).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)


def test_frechet_distance_matches_eigenvalues_of_the_covariance_product():
    # Independent route: tr (Σ_a Σ_b)^½ = Σ √λ_i(Σ_a Σ_b) (the product's eigenvalues are real and non-negative).
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 2
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    lam = torch.linalg.eigvals(ca @ cb).real.clamp_min(0)
    mu = a.mean(0) - b.mean(0)
    expected = float(mu @ mu + ca.trace() + cb.trace() - 2 * lam.sqrt().sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_scores_by_hand():
    s = Scores(quality=80.0, semantic=50.0, fd=1.0, per_attribute={})
    assert s.overall == pytest.approx((4 * 80 + 50) / 5)

    class Fixed(torch.nn.Module):  # "classifier" whose prediction and feature are read off the clip itself
        def predict(self, clips):
            return clips[:, 0, 0, 0, :4].long(), clips[:, 0, 0, 0, 4:].double()

    real = RealReference(torch.randn(64, 2, dtype=torch.float64), scale=2.0)
    clips = torch.zeros(64, 3, 2, 2, 6)
    clips[..., 4:] = real.feats.float()[:, None, None, None, :].clamp(-1, 1)  # the score clamps clips to [-1, 1]
    labels = torch.zeros(64, 4, dtype=torch.int64)
    labels[:16, 2] = 1  # motion wrong for a quarter of the clips
    s = score_clips(Fixed(), RealReference(clips[:, 0, 0, 0, 4:].double(), 2.0), clips, labels)
    assert s.per_attribute == {"shape": 100.0, "colour": 100.0, "motion": 75.0, "size": 100.0}
    assert s.semantic == pytest.approx(93.75)
    assert s.fd == pytest.approx(0.0, abs=1e-9) and s.quality == pytest.approx(100.0)
    assert score_clips(Fixed(), real, clips, labels).quality == pytest.approx(
        100 * math.exp(-frechet_distance(clips[:, 0, 0, 0, 4:].double(), real.feats) / 2.0))


def test_received_bytes_per_collective():
    table = [["all_gather", "tp", 3, 1200], ["reduce_scatter", "tp", 1, 400], ["all_reduce", "dp_cp", 1, 100],
             ["all_to_all", "cp", 2, 800], ["send", "cp", 1, 50], ["recv", "cp", 1, 50], ["all_reduce", "world", 1, 8]]
    got = comm_bound.received(table, {"tp": 4, "cp": 2, "dp_cp": 2, "world": 8})
    assert got[comm_bound.TP_SUBLAYERS] == pytest.approx(0.75 * 1600)
    assert got[comm_bound.GRAD_SYNC] == pytest.approx(100)
    assert got[comm_bound.CP_ULYSSES] == pytest.approx(400)
    assert got[comm_bound.CP_RING] == pytest.approx(50)
    assert got[comm_bound.SCALARS] == pytest.approx(2 * 7 / 8 * 8)


def test_tp_replicated_params_are_the_ones_tp_does_not_split():
    from tmd_megatron.parallel import Topology, build_stage_model
    from tmd_megatron.parallel.sharding import tp_split_dims

    cfg = WanConfig.preset("tiny")
    model = build_stage_model(cfg, Topology.virtual(tp=2))  # meta device: names and shard shapes only
    split = tp_split_dims(model)
    assert split  # the TP model does split something
    whole = sum(p.numel() for n, p in model.named_parameters() if n not in split)
    assert comm_bound.tp_replicated_params(cfg) == whole


def test_minimum_by_hand():
    cfg = WanConfig(dim=8, ffn_dim=16, num_heads=1, num_layers=1, text_dim=4, text_len=3, freq_dim=4)
    # latent 16 x 1 x 4 x 4 -> 4 tokens; batch 2; fp32
    got = comm_bound.minimum_received(cfg, (16, 1, 4, 4), 2, cp=2, cp_comm="ring", num_params=1000)
    chunk = 2 * 2 * 8 * 4  # b · L/cp · D · e
    assert got[comm_bound.CP_RING] == 4 * chunk  # K, V in; dK, dV partials in
    assert got[comm_bound.GRAD_SYNC] == 1000 * 4  # all-reduce 2(n−1)/n·N·e at n = 2
    uly = comm_bound.minimum_received(cfg, (16, 1, 4, 4), 2, cp=2, cp_comm="ulysses", num_params=1000)
    assert uly[comm_bound.CP_ULYSSES] == 2 * 0.5 * 4 * chunk
    tp = comm_bound.minimum_received(cfg, (16, 1, 4, 4), 2, tp=2, num_params=1000)
    act = 2 * 4 * 8 * 4  # b · L · D · e
    assert tp[comm_bound.TP_SUBLAYERS] == 2 * 6 * 0.5 * act  # fwd + bwd, 3 gathers + 3 scatters of half each
    norms = 2 * 2 * 0.5 * (3 * 2 * 4 + 2 * 3) * 4
    assert tp[comm_bound.TP_ALL_REDUCE] == norms + 2 * 0.5 * comm_bound.tp_replicated_params(cfg) * 4


@pytest.mark.slow
def test_perf_script_smoke(capsys):
    from tmd_megatron.bench import perf

    perf.main(["--smoke"])
    out = capsys.readouterr().out
    for title in perf.TITLES.values():
        assert title in out
    assert "| TP2 + SP | **step total**" in out


@pytest.mark.slow
def test_quality_script_smoke(tmp_path, capsys):
    from tmd_megatron.bench import quality

    quality.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("Teacher (Euler 2x2", "DMD2-v M=1 (KD warm-up)", "DMD2-v M=2", "TMD M=2 N=2"):
        assert f"| {name}" in out
    assert "| TMD M=2 N=2 − DMD2-v M=2 | 2 |" in out  # the paired row, against DMD2-v at the same M
    kd_row = next(line for line in out.splitlines() if line.startswith("| DMD2-v M=1 (KD warm-up) |"))
    assert "| 2 + 2 | 32 |" in kd_row  # KD: 8 pairs x 2 Euler steps x 2 (CFG) teacher evaluations, on top
    assert "| 0 + 2 | 0 |" in next(line for line in out.splitlines() if line.startswith("| DMD2-v M=2 |"))
    assert (tmp_path / "results.json").exists()
    first = json.loads((tmp_path / "results.json").read_text())["runs"]

    # a rerun takes every finished step from the cache
    quality.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "done " not in out and "cached teacher" in out and "cached TMD M=2 N=2 s1" in out.splitlines()
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == first

    # ablations on the same --out: the baseline arm is the main table's (cached); only the variants run
    quality.main(["--smoke", "--out", str(tmp_path), "--ablation", "vsd-norm"])
    out = capsys.readouterr().out
    assert "cached TMD M=2 N=2 s0" in out.splitlines() and "done TMD M=2 N=2 [vsd-printed] s0 stage1" in out
    assert "| TMD M=2 N=2 [vsd-printed] − TMD M=2 N=2 | 2 |" in out
    quality.main(["--smoke", "--out", str(tmp_path), "--ablation", "stage1"])
    out = capsys.readouterr().out
    assert "[no-stage1] s0 stage1" not in out and "done TMD M=2 N=2 [no-stage1] s0 (" in out
    assert "| 0 + 2 |" in next(line for line in out.splitlines() if line.startswith("| TMD M=2 N=2 [no-stage1] |"))
    # the ablations keep their own results: the main table's file (read by the figures and stage-1 scores) stays
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == first
    assert "TMD M=2 N=2 [no-stage1] s0" in json.loads((tmp_path / "results-stage1.json").read_text())["runs"]

    # stage 2 in two resumed segments, each scored: the end equals the one-run stage 2 (resumption is exact);
    # a stage-2 setting reruns stage 2 only
    quality.main(["--smoke", "--out", str(tmp_path), "--set", "curve_points=2"])
    out = capsys.readouterr().out
    assert "cached TMD M=2 N=2 s0 stage1" in out.splitlines() and "done TMD M=2 N=2 s0 @1 (" in out
    assert "| TMD M=2 N=2 | " in out.split("Score vs stage-2 iteration")[1]
    again = json.loads((tmp_path / "results.json").read_text())["runs"]
    for name, r in first.items():
        if not name.startswith("Teacher"):
            assert [r[k] for k in ("overall", "quality", "semantic")] == \
                [again[name][k] for k in ("overall", "quality", "semantic")], name
            assert [p["steps"] for p in again[name]["curve"]] == [1, 2]
    quality.main(["--smoke", "--out", str(tmp_path), "--set", "stage2_steps=3"])
    out = capsys.readouterr().out
    assert "cached TMD M=2 N=2 s0 stage1" in out.splitlines() and "done TMD M=2 N=2 s0 (" in out
    assert "| 2 + 3 |" in out

    from tmd_megatron.bench import quality_stage1

    quality_stage1.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("KD (stage 1 of DMD2-v M=1)", "TM-MF (stage 1 of TMD M=2 N=2)"):
        assert f"| {name} |" in out

    # the figures: three PNGs, the sample grid one row per generator (real, teacher, 3 arms) of 4 prompts
    from PIL import Image

    from tmd_megatron.bench import quality_figures

    quality_figures.main(["--smoke", "--out", str(tmp_path), "--dir", str(tmp_path / "figs")])
    out = capsys.readouterr().out
    for name in quality_figures.NAMES.values():
        assert f"wrote {tmp_path / 'figs' / name}" in out
        with Image.open(tmp_path / "figs" / name) as im:
            assert im.format == "PNG" and len(set(im.convert("L").getdata())) > 8  # drawn, not blank
    rows = quality_figures.sample_rows(quality.SMOKE, json.loads((tmp_path / "results.json").read_text()), 4)
    assert list(rows)[:2] == ["real", "teacher (2x2)"] and len(rows) == 2 + len(quality.SMOKE.methods)
    assert all(r.shape == (4, 3, 3, 16, 16) for r in rows.values())

    # a variation on the same teacher: changed fields apply, the teacher is not retrained
    teacher = tmp_path / "runs" / "teacher" / "export"
    quality.main(["--smoke", "--out", str(tmp_path / "variant"), "--teacher", str(teacher),
                  "--set", "stage1_steps=3", "--set", 'methods=[["tmd",2,2]]'])
    out = capsys.readouterr().out
    assert f"Teacher: reused from {teacher}" in out and "| 3 + 2 |" in out
    assert "| TMD M=2 N=2 |" in out and "| DMD2-v" not in out
    assert not (tmp_path / "variant" / "runs" / "teacher").exists()
    with pytest.raises(SystemExit, match="FIELD one of"):
        quality.main(["--smoke", "--out", str(tmp_path / "bad"), "--set", "stage_one=3"])


def test_doc_section_rewrites_only_between_its_markers(tmp_path):
    from tmd_megatron.bench.doc import markers, write_section

    doc = tmp_path / "b.md"
    begin, end = markers("perf")
    doc.write_text(f"intro\n{begin}\nold table\n{end}\nprose after\n")
    write_section("perf", "| new |", doc)
    assert doc.read_text() == f"intro\n{begin}\n| new |\n{end}\nprose after\n"
    with pytest.raises(ValueError, match="quality:begin"):
        write_section("quality", "x", doc)
    assert "| new |" in doc.read_text()  # a refused write loses nothing
    doc.write_text(f"{end}\n{begin}\n")  # markers out of order: nothing to replace, refused
    with pytest.raises(ValueError, match="found 0"):
        write_section("perf", "x", doc)


def test_t_quantiles_match_the_printed_table():
    """Student-t 97.5 % points as every statistics table prints them (df 1, 3, 10, 30)."""
    from tmd_megatron.bench.stats import t_quantile

    for df, printed in ((1, 12.706), (3, 3.182), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(printed, abs=5e-4)


def test_every_arm_has_its_own_run_directory():
    """Two arms in one directory would resume each other's checkpoints: the names of every main-table and
    ablation arm, both stages, are distinct."""
    from tmd_megatron.bench.quality import QualityConfig, run_name
    from tmd_megatron.bench.quality_ablations import ABLATIONS

    arms = {tuple(m) for m in QualityConfig().methods} | {tuple(m) for ms in ABLATIONS.values() for m in ms}
    names = [run_name(m, 0, stage) for m in arms for stage in (1, 2)]
    assert len(set(names)) == len(names) == 2 * len(arms)
    assert run_name(("dmd2v", 2, 1), 0, 2) != run_name(("dmd2v", 2, 0), 0, 2)


def test_figure_series_are_means_with_t_intervals():
    """The plotted points: mean over seeds and the 95 % half width t(0.975, n-1)·s/√n (4.303 for 3 seeds, the
    printed table value); curves per stage-2 segment; the teacher has no curve."""
    from tmd_megatron.bench.quality_figures import curve_series, nfe_series

    runs = {}
    for s, v in enumerate((80.0, 82.0, 84.0)):
        runs[f"Teacher (Euler 50x2, CFG 3) s{s}"] = {"overall": 90.0 + s, "nfe": 100}
        runs[f"TMD M=1 N=2 s{s}"] = {"overall": v, "nfe": 1.25, "curve": [{"steps": 100, "overall": v - 10},
                                                                           {"steps": 200, "overall": v}]}
    nfe = nfe_series({"runs": runs})
    assert nfe["TMD M=1 N=2"] == pytest.approx((1.25, 82.0, 4.303 * 2.0 / 3**0.5), abs=1e-3)
    assert nfe["Teacher (Euler 50x2, CFG 3)"][:2] == (100, 91.0)
    steps, mean, half = curve_series({"runs": runs})["TMD M=1 N=2"]
    assert steps == [100, 200] and mean == pytest.approx([72.0, 82.0]) and half[0] == pytest.approx(half[1])
    assert "Teacher (Euler 50x2, CFG 3)" not in curve_series({"runs": runs})


def test_paired_table_takes_differences_per_seed():
    """Two arms whose scores swing together over seeds: the paired interval is narrow and excludes 0 although
    the arms' own spreads overlap; each TMD arm is compared with DMD2-v at its own M, KD variant first."""
    from tmd_megatron.bench.quality_report import baseline_of, paired_table
    from tmd_megatron.bench.stats import paired_difference

    base, tmd = [60.0, 70.0, 80.0, 90.0], [61.0, 71.5, 80.5, 91.0]
    runs = {}
    for s, (b, t) in enumerate(zip(base, tmd)):
        runs[f"DMD2-v M=1 (KD warm-up) s{s}"] = {"overall": b, "quality": b, "semantic": b}
        runs[f"DMD2-v M=1 (no KD) s{s}"] = {"overall": b - 2, "quality": b, "semantic": b}
        runs[f"TMD M=1 N=2 s{s}"] = {"overall": t, "quality": t, "semantic": t}
    text = paired_table({"runs": runs})
    mean, lo, hi = paired_difference(tmd, base)
    assert mean == pytest.approx(1.0) and 0 < lo < 1 < hi < 2
    assert f"| TMD M=1 N=2 − DMD2-v M=1 (KD warm-up) | 4 | {mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" in text
    assert "| DMD2-v M=1 (no KD) − DMD2-v M=1 (KD warm-up) | 4 | -2.0 [-2.0, -2.0]" in text
    names = ["DMD2-v M=1 (KD warm-up)", "DMD2-v M=1 (no KD)", "DMD2-v M=2", "TMD M=2 N=4"]
    assert baseline_of("TMD M=2 N=4", names) == "DMD2-v M=2" and baseline_of("DMD2-v M=2", names) is None


@pytest.mark.parametrize("variant", sorted(__import__("tmd_megatron.bench.quality_ablations",
                                                      fromlist=["VARIANTS"]).VARIANTS))
def test_every_ablation_variant_is_a_valid_recipe_change(variant):
    """Each variant's overrides compose and resolve on a TMD recipe (a misspelt key or value is refused by hydra or
    the configs' checks) and change what they say they change."""
    from tmd_megatron.bench.quality_ablations import VARIANTS
    from tmd_megatron.training.config import compose, resolve

    v = VARIANTS[variant]
    checked = 0
    for stage, extra in (("tm_mf", v.stage1), ("tmd", v.stage2)):
        base = resolve(compose(["experiment=tiny_smoke", f"method={stage}"]))
        res = resolve(compose(["experiment=tiny_smoke", f"method={stage}", *extra]))
        for override in extra:
            path, _ = override.split("=")
            if not path.startswith("method."):
                continue
            _, section, field = path.split(".")
            got, ref = getattr(res, section), getattr(base, section)
            if got is not None:  # a section the stage reads (method=tm_mf has no dmd2v)
                assert getattr(got, field) != getattr(ref, field), (variant, stage, override)
                checked += 1
    assert checked or v.skip_stage1
