"""The step-time parts of `make bench` (bench/perf.py): the step-time model's prediction against the real trainer
(`--only time`) and compiled blocks against eager (`--only compile`), each layout in its own launch, retaken
while other jobs load the machine."""
from __future__ import annotations

import statistics
import time

from .launch import run_cases


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


TIME_MODEL = {"dim": 256, "ffn_dim": 1024, "num_heads": 4, "num_layers": 4}
TIME_LAYOUTS = {"single": (1, []), "TP2 + SP": (2, ["parallel.tp=2"]), "CP2 ring": (2, ["parallel.cp=2"]),
                "PP2 (m = 4)": (2, ["parallel.pp=2"]), "TP2 x CP2 x PP2 (m = 4)": (8, ["parallel.tp=2", "parallel.cp=2",
                                                                                    "parallel.pp=2"])}
TIME_STAGES = {"stage 1 (TM-MF)": ["method=tm_mf"], "stage 2 (TMD)": []}


def _time_recipe(extra: list[str], smoke: bool) -> list[str]:
    over = ["experiment=tiny_smoke", "data.global_batch=8", "parallel.microbatches=4", "data.synthetic.num_samples=64",
            "run.max_steps=100", *extra]
    if not smoke:
        over += [f"++model.overrides.{k}={v}" for k, v in TIME_MODEL.items()]
        over += ["++data.synthetic.size=32", "data.latent=[16,3,16,16]"]
    return over


def _time_cases(smoke: bool):
    layouts = dict(list(TIME_LAYOUTS.items())[:2]) if smoke else TIME_LAYOUTS
    stages = dict(list(TIME_STAGES.items())[1:]) if smoke else TIME_STAGES
    return [((lay, stage), world, ("step_time", {"overrides": _time_recipe(extra + s_extra, smoke),
                                                 "steps": 2 if smoke else 4}))
            for lay, (world, extra) in layouts.items() for stage, s_extra in stages.items()]


QUIET_CORES = 0.3  # other jobs' CPU use (cores) above which a timing is retaken


def _quiet_run(case, world: int, tries: int = 3) -> list[dict]:
    """The case's per-rank results from the launch with the least CPU use by other jobs (up to `tries` launches,
    stopping at the first under QUIET_CORES; a wait of a minute between tries)."""
    best = None
    for attempt in range(tries):
        got = run_cases([case], world, timeout=1800)[0]
        if best is None or got[0]["other_cores"] < best[0]["other_cores"]:
            best = got
        if best[0]["other_cores"] <= QUIET_CORES:
            break
        time.sleep(60)
    return best


def time_table(results: dict, smoke: bool, profile) -> str:
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.timing import StepModel

    out = [f"Real trainer steps (dim {TIME_MODEL['dim']}, FFN {TIME_MODEL['ffn_dim']}, {TIME_MODEL['num_heads']} heads, "
           f"{TIME_MODEL['num_layers']} blocks, 192 video tokens, 64 text tokens; 8 samples per step in 4 microbatches; "
           "fp32, one thread per rank on this machine's cores), each layout its own launch; measured = median wall "
           "time of a step on rank 0 after 2 warm-up steps (stage 2: generator and critic-only steps apart). "
           "Predicted = `tmd-plan --time --cluster cpu` (training/timing.py) with the `cpu` profile measured by "
           "`python -m tmd_megatron.bench.calibrate`: "
           f"GEMM {profile.gemm_tflops * 1e3:.1f} GFLOP/s + {profile.gemm_call_us:.1f} µs per call, attention "
           f"{profile.attn_fwd_tflops * 1e3:.1f} / {profile.attn_bwd_tflops * 1e3:.1f} GFLOP/s, elementwise "
           f"{profile.mem_gbps:.2f} GB/s + {profile.op_us:.1f} µs per op, gloo {profile.intra_gbps:.2f} GB/s + "
           f"{profile.intra_latency_us:.0f} µs per collective, {profile.cores:g} cores shared by the ranks (each "
           "rate the median of three interleaved measurements). The speed column: a fixed GEMM loop "
           "(`calibrate.speed_probe`) at each launch against the calibration, for reading the drift of this VM; "
           "the prediction does not use it (scaling by it made the predictions worse: a narrow probe does not "
           "track a training step).", "",
           "| layout | stage | step | ranks | measured | predicted | predicted / measured | model GFLOP/s per rank "
           "(measured) | MFU (measured) | machine speed vs calibration | other jobs (cores) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (lay, stage), per_rank in results.items():
        world, extra = TIME_LAYOUTS[lay]
        res = resolve(compose(_time_recipe(extra + TIME_STAGES[stage], smoke)))
        r0 = per_rank[0]
        speed = r0["probe"] / profile.probe_gflops if profile.probe_gflops else 1.0
        model = StepModel(res, world, profile, latent=r0["latent"])
        from tmd_megatron.models.flops import total
        from tmd_megatron.training.flops import step_flops

        for generator in sorted({s["generator"] for s in r0["steps"]}, reverse=True):
            walls = [s["wall"] for s in r0["steps"] if s["generator"] == generator]
            measured = statistics.median(walls)
            predicted = model.step(generator)[0]
            kind = "every step" if res.dmd2v is None else ("generator" if generator else "critic only")
            flops = total(step_flops(res, generator, latent=r0["latent"]).values()).model
            tflops = flops / measured / world / 1e12
            out.append(f"| {lay} | {stage} | {kind} | {world} | {_ms(measured)} | {_ms(predicted)} | "
                       f"**{predicted / measured:.2f}** | {tflops * 1e3:.2f} | {tflops / profile.peak_tflops:.1%} | "
                       f"{speed:.2f} | {r0['other_cores']:.2f} |")
    return "\n".join(out)


COMPILE_LAYOUTS = {"single": TIME_LAYOUTS["single"], "TP2 + SP, AC": (2, ["parallel.tp=2",
                                                                          "parallel.activation_checkpointing=true"])}


def _compile_cases(smoke: bool):
    layouts = dict(list(COMPILE_LAYOUTS.items())[:1]) if smoke else COMPILE_LAYOUTS
    stages = dict(list(TIME_STAGES.items())[1:]) if smoke else TIME_STAGES
    return [((lay, stage, compiled), world,
             ("step_time", {"overrides": _time_recipe([*extra, *s_extra, f"model.compile={str(compiled).lower()}"],
                                                      smoke), "warmup": 2, "steps": 2 if smoke else 4}))
            for lay, (world, extra) in layouts.items() for stage, s_extra in stages.items()
            for compiled in (False, True)]


def _predicted_speedup(lay: str, stage: str, smoke: bool, profile, latent) -> float:
    """Eager over compiled iteration time by the step-time model (a compiled block's elementwise ops fused:
    timing.block_traffic(fused=True))."""
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.timing import predict

    world, extra = COMPILE_LAYOUTS[lay]
    secs = [predict(resolve(compose(_time_recipe([*extra, *TIME_STAGES[stage], f"model.compile={c}"], smoke))),
                    world, profile, latent=latent).seconds for c in ("false", "true")]
    return secs[0] / secs[1]


def compile_table(results: dict, smoke: bool, profile) -> str:
    out = [f"Real trainer steps with `model.compile=true` (each DiT block and the fusion block compiled on its own by "
           f"inductor; collectives eager) against eager, same recipe and seed (dim {TIME_MODEL['dim']}, "
           f"{TIME_MODEL['num_layers']} blocks, 192 video tokens, 8 samples in 4 microbatches, fp32, one thread per "
           "rank). Step time: mean of the steps after two warm-up steps (stage 2: generator and critic-only steps "
           "alike, as the model's iteration averages them); the warm-up steps hold the compilation. Predicted: "
           "`tmd-plan --time --cluster cpu` with model.compile false and true, whose only difference is the "
           "elementwise term: every run of elementwise ops between two products or attention calls becomes one "
           "kernel reading its inputs once and writing what leaves it (models.flops.elementwise_traffic(fused=True)); "
           "it does not count graph breaks at the eager collectives or guard checks. Numerics: tests/test_compile.py "
           "and the compiled layouts of tests/test_parallel_2rank.py.", "",
           "| layout | stage | eager step | compiled step | **speedup** | predicted speedup | first two steps, "
           "compiled | other jobs (cores) |", "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys(k[:2] for k in results))
    for lay, stage in keys:
        eager, comp = results[(lay, stage, False)][0], results[(lay, stage, True)][0]
        te = statistics.mean(s["wall"] for s in eager["steps"])
        tc = statistics.mean(s["wall"] for s in comp["steps"])
        pred = _predicted_speedup(lay, stage, smoke, profile, eager["latent"])
        out.append(f"| {lay} | {stage} | {_ms(te)} | {_ms(tc)} | **{te / tc:.2f}** | {pred:.2f} | "
                   f"{sum(comp['warmup']):.1f} s | {max(eager['other_cores'], comp['other_cores']):.2f} |")
    return "\n".join(out)
