"""Step-time model: one iteration's time from the FLOPs of each pass, the device's throughput, the bytes each
process group moves at its link's bandwidth, the pipeline schedule and the optimizer (`tmd-plan --time`).

Per pass and pipeline stage, one microbatch's forward (and backward) costs
  GEMM FLOPs / GEMM rate + calls x per-call time      (training/flops.py; rate and call time from the profile)
  + attention FLOPs / attention rate (+ per call)
  + elementwise bytes / memory bandwidth + ops x per-op overhead   (each block's norms, RoPE, activations, adds:
    counted on the meta device, models.flops.elementwise_traffic; the GEMMs outside blocks carry no such term;
    model.compile=true counts them fused, one kernel per run of elementwise ops, which over-predicts the measured
    speedup on a CPU: graph breaks and recompiled regions are not counted, docs/benchmarks.md)
  + communication that is not overlapped: TP/SP collectives, Ulysses all-to-alls and the model-output merges in
    full; ring attention's K/V rotation overlapped with the chunk computation (only what exceeds it shows), its
    dK/dV hops in full (parallel/comm_model.py gives the bytes; a group is intra-node when its ranks share a node).
The stages' ops are then run through the schedule (parallel.pipeline.simulate_pipeline: 1F1B or GPipe order,
the boundary transfer between stages, and, on a CPU, the cores shared by every busy rank), pass after pass. After
the passes: the stage-2 transfers of samples between the last and first stage, gradient reduction (TP all-reduce,
reduce-scatter over DP x CP), the AdamW step on the shard and the all-gather, all not overlapped (as ZeroAdamW
runs them). Stage-2 iterations are averaged over the generator period.

Profiles: `h100-ib`, `h200-ib`, `a100-ib` from public figures (PROFILE_SOURCES); `cpu` measured on this machine by
`python -m tmd_megatron.bench.calibrate`. Predicted against the measured real trainer in `make bench`
(docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tmd_megatron.models import flops as F
from tmd_megatron.parallel import Topology
from tmd_megatron.parallel.comm_model import pipeline_comm, zero_comm
from tmd_megatron.parallel.pipeline import simulate_pipeline

from . import flops as TF
from .plan import stage_parameters


@dataclass(frozen=True)
class Profile:
    name: str
    peak_tflops: float  # dense peak of the compute dtype (MFU's denominator)
    gemm_tflops: float  # sustained GEMM rate
    attn_fwd_tflops: float  # fused attention forward, executed FLOPs per second
    attn_bwd_tflops: float  # its backward (executed FLOPs: the 2.5x of the forward that re-computes the scores)
    mem_gbps: float  # elementwise ops and the optimizer step
    intra_gbps: float  # collective bus bandwidth between ranks of one node
    inter_gbps: float  # ... across nodes, per rank
    intra_latency_us: float
    inter_latency_us: float
    ranks_per_node: int = 8
    cores: float = math.inf  # ranks computing at full speed at once (a CPU's cores; one GPU per rank)
    gemm_call_us: float = 0.0  # fixed time per kernel call beyond its FLOPs
    attn_call_us: float = 0.0
    op_us: float = 0.0  # per elementwise op (CPU dispatch; GPU launches overlap with the device)
    memory_gib: float = 80.0
    dtype: str = "bf16"
    # GPUs: NCCL's transfers run beside the kernels, so ring attention's K/V rotation hides behind the chunk it
    # serves. CPUs: gloo's threads and the loopback copies need the same cores the ranks compute on, so nothing
    # overlaps (measured: bench/calibrate.py)
    overlap_comm: bool = True
    probe_gflops: float = 0.0  # cpu: bench.calibrate.speed_probe at calibration (the machine's speed then)

    def group_link(self, ranks) -> tuple[float, float]:
        """(latency s, bandwidth B/s) of a group of world ranks."""
        intra = len({r // self.ranks_per_node for r in ranks}) == 1
        if intra:
            return self.intra_latency_us * 1e-6, self.intra_gbps * 1e9
        return self.inter_latency_us * 1e-6, self.inter_gbps * 1e9


PROFILE_SOURCES = {
    "peak": "NVIDIA H100/H200 SXM datasheets: 989.4 TFLOP/s bf16 dense; A100: 312; HBM 3.35 TB/s (H100), "
            "4.8 TB/s (H200), 2.04 TB/s (A100 80GB)",
    "gemm": "stas00/ml-engineering compute/accelerator/README.md, 'Maximum Achievable Matmul FLOPS' (mamf-finder.py): "
            "H100 SXM 792.1, A100 SXM 267.9 TFLOP/s bf16 (H200 and H100 share the tensor cores)",
    "attention": "FlashAttention-3 paper (arXiv 2407.08608) Fig. 'Attention forward/backward speed, head dim 128 "
                 "(H100 80GB SXM5)', cuDNN (the kernel Transformer Engine calls) at 8k-16k tokens: ~600 forward, "
                 "~516 backward TFLOP/s; FlashAttention-2 paper (arXiv 2307.08691): 50-73 % of A100's peak",
    "nvlink": "nccl-tests all_reduce bus bandwidth at large sizes, 8x H100 SXM NVLink-4: 460-480 GB/s; 8x A100 SXM "
              "NVLink-3: 230-250 GB/s (docs.alayanew.com, 'NCCL-tests in practice', 2026-05-06)",
    "infiniband": "one 400 Gb/s NDR InfiniBand NIC per H100/H200 (DGX H100), 200 Gb/s HDR per A100 (DGX A100) "
                  "line rate; we assume 80 % of it as NCCL's bus bandwidth across nodes",
}

# mem_gbps: 80 % of the HBM datasheet bandwidth (what copy/STREAM-like kernels reach); latencies: a few
# microseconds per NVLink hop and ~10 us across InfiniBand (NCCL's small-message regime), assumptions.
PROFILES = {
    "h100-ib": Profile("h100-ib", 989.4, 792.1, 600.0, 516.0, 2680.0, 460.0, 40.0, 5.0, 12.0, memory_gib=80.0),
    "h200-ib": Profile("h200-ib", 989.4, 794.5, 600.0, 516.0, 3840.0, 460.0, 40.0, 5.0, 12.0, memory_gib=141.0),
    "a100-ib": Profile("a100-ib", 312.0, 267.9, 190.0, 160.0, 1630.0, 230.0, 20.0, 6.0, 15.0, memory_gib=80.0),
}


def cpu_profile_path() -> Path:
    return Path(os.environ.get("TMD_CPU_PROFILE", Path.home() / ".cache" / "tmd_megatron" / "cpu_profile.json"))


def load_profile(name: str) -> Profile:
    """A built-in profile, `cpu` (measured on this machine; `python -m tmd_megatron.bench.calibrate`), or a JSON
    file of Profile fields."""
    if name in PROFILES:
        return PROFILES[name]
    path = cpu_profile_path() if name == "cpu" else Path(name)
    if not path.is_file():
        hint = "python -m tmd_megatron.bench.calibrate" if name == "cpu" else "a JSON file of Profile fields"
        raise ValueError(f"no profile {name!r} ({path} does not exist): choose one of {sorted(PROFILES)}, 'cpu' "
                         f"after `{hint}`, or a profile file")
    fields = json.loads(path.read_text())
    return Profile(**{k: v for k, v in fields.items() if k in Profile.__dataclass_fields__})


def save_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=2))


# ---- elementwise traffic of a block -------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def block_traffic(cfg, tokens: int, batch: int, fused: bool = False) -> tuple[float, int, float, int]:
    """(bytes, ops) of one Wan block's forward and of its backward on `batch` samples of `tokens` tokens, fp32,
    counted on fake tensors (shapes only; attention replaced by a kernel stand-in: its traffic is inside it).
    fused: as a compiled block runs them (model.compile; `elementwise_traffic(fused=True)`), the attention
    stand-in ending a fused run as the real attention call does."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tmd_megatron.models.wan.block import WanBlock
    from tmd_megatron.models.wan.layers import TorchLayers

    class _Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.shapes = (q, k, v)
            return q.new_empty(q.shape)

        @staticmethod
        def backward(ctx, grad):
            return tuple(t.new_empty(t.shape) for t in ctx.shapes)

    class _Attention(torch.nn.Module):
        def forward(self, q, k, v, real_keys=None):
            return _Kernel.apply(q, k, v)

    class _Layers(TorchLayers):
        def self_attention(self):
            return _Attention()

        def cross_attention(self):
            return _Attention()

    with FakeTensorMode():
        block = WanBlock(cfg, _Layers())
        x = torch.empty(batch, tokens, cfg.dim, requires_grad=True)
        ctx = torch.empty(batch, cfg.context_len, cfg.dim, requires_grad=True)
        e0 = torch.empty(batch, 6, cfg.dim, requires_grad=True)
        cos = sin = torch.empty(tokens, cfg.head_dim // 2)
        out = []
        kernel_ops = {torch.ops.aten.new_empty}  # what the stand-in runs
        fwd = F.elementwise_traffic(lambda: out.append(block(x, ctx, e0, cos, sin)), fused, kernel_ops)
        bwd = F.elementwise_traffic(lambda: out[0].backward(torch.empty_like(out[0])), fused, kernel_ops)
    return fwd[0], fwd[1], bwd[0], bwd[1]


# ---- the model ---------------------------------------------------------------------------------------------------
EXPOSED = "  of which TP/CP collectives, not overlapped"
@dataclass
class Prediction:
    seconds: float  # one iteration (stage 2: averaged over the generator period)
    parts: dict = field(default_factory=dict)  # seconds per iteration by kind (overlapping kinds excluded)
    idle: float = 0.0  # pipeline idle fraction of the passes (their bubble)
    model_tflops: float = 0.0  # model FLOPs per iteration / 1e12 (the whole job)
    tflops_per_device: float = 0.0
    mfu: float = 0.0
    per_step: dict = field(default_factory=dict)  # generator step? -> seconds

    def table(self) -> list[tuple[str, float]]:
        return sorted(self.parts.items(), key=lambda kv: -kv[1])


class StepModel:
    """The time of one step of `res` on `world` ranks under `profile` (the recipe's layout)."""

    def __init__(self, res, world: int, profile: Profile, latent=None):
        from .plan import layout_of

        self.res, self.world, self.prof = res, world, profile
        self.lay = layout_of(res, world)
        lay = self.lay
        self.st = TF.Setting(lay.tp, lay.cp, lay.sequence_parallel, lay.pp, lay.micro_batch,
                             lay.activation_checkpointing, None if latent is None else tuple(latent))
        self.e = 2 if res.raw.model.compute_dtype == "bf16" else 4
        self.topo0 = Topology.virtual(lay.tp, lay.cp, lay.pp, lay.dp, 0)
        per_node = min(world, profile.ranks_per_node) if math.isfinite(profile.cores) else world
        self.share = min(1.0, profile.cores / per_node) if math.isfinite(profile.cores) else 1.0
        self.latent_fhw = self.st.latent or tuple(res.raw.data.latent)[1:]

    # ---- communication --------------------------------------------------------------------------------
    def _collective(self, op: str, group: str, calls: float, nbytes: float, stage: int = 0) -> float:
        """Seconds of `calls` collectives moving `nbytes` in total (comm_model's logical volumes) on `group`."""
        topo = Topology.virtual(self.lay.tp, self.lay.cp, self.lay.pp, self.lay.dp,
                                stage * self.lay.tp * self.lay.cp * self.lay.dp)
        g = getattr(topo, group)
        n = g.size
        if n == 1 or not calls:
            return 0.0
        alpha, bw = self.prof.group_link(g.ranks)
        if op in ("send", "recv"):
            return calls * alpha + nbytes / bw
        hops = n - 1
        factor = 2 * hops / n if op == "all_reduce" else hops / n
        return calls * hops * alpha * (2 if op == "all_reduce" else 1) + factor * nbytes / bw

    def _block_comm(self, b: int, stage: int) -> tuple[float, float, float, float]:
        """(exposed forward, exposed backward, ring K/V forward, ring K/V backward) seconds of one block on b
        samples: TP/SP and Ulysses collectives and ring dK/dV exposed, ring K/V apart (it overlaps)."""
        lay, cfg = self.lay, self.res.wan
        # a first stage of two (not the last, no input gradient): the block's own collectives, without the
        # output merge a last stage adds; its stage-boundary transfers (group "pp") are left out below
        common = dict(tp=lay.tp, cp=lay.cp, pp=2, pp_rank=0, blocks=[0], sp=lay.sequence_parallel,
                      cp_comm=lay.cp_mode, e=self.e, x_grad=False)
        fwd = pipeline_comm(cfg, self.latent_fhw, b, 1, backward=False, **common)
        both = pipeline_comm(cfg, self.latent_fhw, b, 1, **common)
        out = [0.0, 0.0, 0.0, 0.0]
        for key, (calls, nbytes) in both.items():
            f_calls, f_bytes = fwd.get(key, (0, 0))
            for i, (c, nb) in enumerate(((f_calls, f_bytes), (calls - f_calls, nbytes - f_bytes))):
                if key[0] != "recv" and c and key != ("send", "cp") and key[1] != "pp":  # a recv runs beside its send
                    out[i] += self._collective(key[0], key[1], c, nb, stage)
        if lay.cp > 1 and lay.cp_mode == "ring":  # K/V hops overlap with the chunks; the dK/dV hops do not
            lc = F.Shard(lay.tp, lay.cp, lay.sequence_parallel).tokens(F.grid_tokens(cfg, self.latent_fhw))[1]
            chunk = b * lc * cfg.dim // lay.tp
            hops = 2 * (lay.cp - 1)
            kv = self._collective("send", "cp", hops, hops * chunk * self.e, stage)
            out[1] += self._collective("send", "cp", hops, hops * chunk * max(self.e, 4), stage)
            out[2] = out[3] = kv
        return tuple(out)

    # ---- one pass on one stage --------------------------------------------------------------------------------
    def _compute(self, f: F.Flops, backward: bool, b: int, stage: int, ring: float) -> float:
        p = self.prof
        lc = F.Shard(self.lay.tp, self.lay.cp, self.lay.sequence_parallel).tokens(
            F.grid_tokens(self.res.wan, self.latent_fhw))[1]
        fb, fo, bb, bo = block_traffic(self.res.wan, lc, b, fused=self.res.raw.model.compile)
        tp = self.lay.tp
        elem = (f.block_fwd * (fb / tp / (p.mem_gbps * 1e9) + fo * p.op_us * 1e-6)
                + f.block_bwd * (bb / tp / (p.mem_gbps * 1e9) + bo * p.op_us * 1e-6))
        attn_rate = (p.attn_bwd_tflops if backward else p.attn_fwd_tflops) * 1e12
        gemm = f.gemm / (p.gemm_tflops * 1e12) + f.gemm_calls * p.gemm_call_us * 1e-6
        attn = f.attn / attn_rate + f.attn_calls * p.attn_call_us * 1e-6
        # ring K/V rotation hides behind the attention of the block it serves (where transfers overlap)
        blocks = f.block_bwd if backward else f.block_fwd
        shown = max(0.0, ring * blocks - attn) if p.overlap_comm else ring * blocks
        return gemm + attn + elem, shown

    def op_costs(self, ps, stage: int) -> tuple[float, float, float, float]:
        """(forward compute, backward compute, forward collectives, backward collectives) seconds of one
        microbatch of pass `ps` on `stage`; the collectives are the exposed ones. A forward-only pass whose forward
        runs a backward of its own (the discriminator's step inside the teacher's forward) counts it in the
        forward op."""
        comm_f, comm_b, ring_f, ring_b = self._block_comm(ps.batch, stage)
        fwd, bwd = ps.forward, ps.backward
        head = self._merges(ps, stage)
        cf, shown_f = self._compute(fwd, False, ps.batch, stage, ring_f)
        xf = comm_f * fwd.block_fwd + head + shown_f
        cb = xb = 0.0
        if bwd.total:
            cb, shown_b = self._compute(bwd, True, ps.batch, stage, ring_b)
            xb = comm_b * bwd.block_bwd + comm_f * bwd.block_fwd + shown_b  # checkpointing re-runs the forward's
        if ps.forward_only:
            cf, cb, xf, xb = cf + cb, 0.0, xf + xb, 0.0
        return cf, cb, xf, xb

    def transfer(self, batch: int) -> float:
        """Seconds for one microbatch's activations to reach the next stage."""
        lay, cfg = self.lay, self.res.wan
        if lay.pp == 1:
            return 0.0
        local = F.Shard(lay.tp, lay.cp, lay.sequence_parallel).tokens(F.grid_tokens(cfg, self.latent_fhw))[2]
        nbytes = batch * local * cfg.dim * 4 + batch * cfg.context_len * cfg.dim * self.e + 7 * batch * cfg.dim * 4
        return self._collective("send", "pp", 4, nbytes)

    def _merges(self, ps, stage: int) -> float:
        """Model-output (and captured hidden state) merges over the token group on the last stage."""
        lay, cfg = self.lay, self.res.wan
        shards = lay.cp * (lay.tp if lay.sequence_parallel and lay.tp > 1 else 1)
        if shards == 1 or stage != lay.pp - 1:
            return 0.0
        group = "tp_cp" if lay.sequence_parallel and lay.tp > 1 else "cp"
        lp = F.Shard(lay.tp, lay.cp, lay.sequence_parallel).tokens(F.grid_tokens(cfg, self.latent_fhw))[0]
        nbytes = ps.batch * lp * cfg.out_dim * cfg.patch_volume * 4
        return self._collective("all_gather", group, 1, nbytes, stage)

    # ---- a whole step -------------------------------------------------------------------------------------
    def step(self, generator: bool) -> tuple[float, dict, float]:
        """(seconds, parts, busy fraction of the passes) of one step."""
        lay, m = self.lay, self.lay.microbatches
        by_stage = [TF.stage_passes(self.res, self.st, s, generator) for s in range(lay.pp)]
        total, parts, busy_sum, wall_sum = 0.0, {}, 0.0, 0.0
        share = self.share
        ranks = lay.tp * lay.cp * lay.dp
        for run in sorted({ps.run for ps in by_stage[0]}):
            idx = [i for i, ps in enumerate(by_stage[0]) if ps.run == run]
            idx.sort(key=lambda i: not by_stage[0][i].forward_only)  # forward-only parts stream through first
            leading = m * sum(by_stage[0][i].forward_only for i in idx)
            tables = [[], [], [], []]  # per stage and microbatch: forward, backward compute; their collectives
            for stage, passes in enumerate(by_stage):
                costs = [self.op_costs(passes[i], stage) for i in idx]
                for k, table in enumerate(tables):
                    table.append([c[k] for c in costs for _ in range(m)])
                exposed = sum(c[2] + c[3] for c in costs) * m
                parts[EXPOSED] = parts.get(EXPOSED, 0.0) + exposed / lay.pp
                busy_sum += exposed  # a stage in a collective is not in the bubble
            n = m * len(idx)
            schedule = "forward" if leading == n else self.res.raw.parallel.schedule
            transfer = max(self.transfer(by_stage[0][i].batch) for i in idx)
            # a rank in a collective takes no core but waits for peers that share the cores (on a CPU): the
            # simulator stretches the wait with the sharing without counting it as compute
            wall, busy = simulate_pipeline(tables[0], tables[1], n, schedule, transfer, ranks, self.prof.cores,
                                           forward_only=0 if leading == n else leading, f_comm=tables[2],
                                           b_comm=tables[3])
            total += wall
            wall_sum += wall * lay.pp
            busy_sum += sum(busy)
            parts["passes (compute, exposed communication, bubble)"] = \
                parts.get("passes (compute, exposed communication, bubble)", 0.0) + wall
        if lay.pp > 1 and self.res.dmd2v is not None:  # samples and GAN gradients between first and last stage
            cfg = self.res.wan
            nbytes = lay.micro_batch * cfg.out_dim * math.prod(self.latent_fhw) * 4
            moves = (3 if generator else 1) + (1 if self.res.dmd2v.gan_weight > 0 else 0)
            t = moves * m * self._collective("send", "pp", 1, nbytes) / share
            total += t
            parts["stage-to-stage sample transfers"] = t
        compute, collectives = self._optimizer(generator)
        opt = (compute + collectives) / share
        total += opt
        parts["gradient reduction + optimizer"] = opt
        return total, parts, (busy_sum / wall_sum if wall_sum else 1.0)

    def _optimizer(self, generator: bool) -> tuple[float, float]:
        """(compute, collectives) seconds of gradient reduction and the optimizer step, on the slowest stage."""
        lay, p = self.lay, self.prof
        shard = lay.dp * lay.cp
        roles = ["student", "fake", "disc"] if self.res.dmd2v is not None else ["student"]
        if self.res.dmd2v is not None and not generator:
            roles = roles[1:]
        worst = (0.0, 0.0)
        for stage in range(lay.pp):
            counts = stage_parameters(self.res, lay.tp, lay.pp, stage)[0]
            compute = collectives = 0.0
            for role in roles:
                n = counts.get(role, 0)
                if not n:
                    continue
                red, step = zero_comm([n], tp=lay.tp, dp_cp=shard, tp_partial_numel=0)
                for table in (red, step):
                    for (op, group), (calls, nbytes) in table.items():
                        collectives += self._collective(op, group, calls, nbytes, stage)
                # flatten grads and copy weights back (24 B per local parameter), the AdamW step on the shard
                # (~20 passes of 4 B over master, grad and moments), the grad-norm sum (8 B)
                compute += (n * 24 + n / shard * (80 + 8)) / (p.mem_gbps * 1e9)
            worst = max(worst, (compute, collectives), key=sum)
        return worst[0], worst[1] + 4 * self._collective("all_reduce", "world", 1, 64)  # metrics, norms, stops

    def predict(self) -> Prediction:
        gen, gen_parts, gen_busy = self.step(True)
        every = self.res.dmd2v.student_every if self.res.dmd2v is not None else 1
        if every > 1:
            critic, critic_parts, critic_busy = self.step(False)
        else:
            critic, critic_parts, critic_busy = gen, gen_parts, gen_busy
        w = 1.0 / every
        seconds = w * gen + (1 - w) * critic
        parts = {k: w * gen_parts.get(k, 0.0) + (1 - w) * critic_parts.get(k, 0.0)
                 for k in set(gen_parts) | set(critic_parts)}
        model = TF.iteration_flops(self.res, latent=self.st.latent).model
        tflops = model / seconds / self.world / 1e12
        return Prediction(seconds, parts, 1 - (w * gen_busy + (1 - w) * critic_busy), model / 1e12, tflops,
                          tflops / self.prof.peak_tflops, {True: gen, False: critic})


def predict(res, world: int, profile: Profile | str, latent=None) -> Prediction:
    prof = load_profile(profile) if isinstance(profile, str) else profile
    return StepModel(res, world, prof, latent).predict()
