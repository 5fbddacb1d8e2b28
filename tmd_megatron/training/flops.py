"""Exact FLOPs of a training step of every method, per pass, role and pipeline stage (analytic).

The passes mirror training/programs.py (the step programs) call by call, built from the model-level counts of
tmd_megatron/models/flops.py; tests/test_flops.py holds every method's step against torch's FlopCounterMode within
1 %. Used by the trainer (model TFLOP/s per device and MFU in the logs), the step-time model (training/timing.py:
the forward and backward work of each pass on each stage) and `tmd-plan --time`.

A pass is one pipelined run over the m microbatches of a DP rank; `stage_passes` gives its work per microbatch on
one rank of one stage, `step_flops` the model FLOPs of a whole step of the job (unsharded: what MFU divides). A
two-expert (A14B) teacher or fake score counts one expert per microbatch (a microbatch whose samples straddle the
boundary runs both; the paper's one-sample microbatches never do).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tmd_megatron.models import flops as F
from tmd_megatron.models.flops import Call, Flops, Shard

ROLES = ("student", "teacher", "fake", "disc")


@dataclass
class PassCost:
    """One pipelined pass on one stage, per microbatch: forward and backward work by role."""

    name: str
    fwd: dict = field(default_factory=dict)  # role -> Flops
    bwd: dict = field(default_factory=dict)
    forward_only: bool = True
    batch: int = 1  # samples per microbatch of this pass (the discriminator pass doubles it)
    run: int = 0  # passes with the same run go through the pipeline together (Passes.run_parts)

    def add(self, role: str, fwd: Flops, bwd: Flops | None = None) -> None:
        self.fwd[role] = self.fwd.get(role, Flops()) + fwd
        if bwd is not None:
            self.bwd[role] = self.bwd.get(role, Flops()) + bwd
            self.forward_only = False

    @property
    def forward(self) -> Flops:
        return F.total(self.fwd.values())

    @property
    def backward(self) -> Flops:
        return F.total(self.bwd.values())


@dataclass(frozen=True)
class Setting:
    """What the counts depend on, read from a resolved recipe (or given by the planner's search)."""

    tp: int = 1
    cp: int = 1
    sp: bool = True
    pp: int = 1
    micro_batch: int = 1
    ac: bool = False
    latent: tuple[int, int, int] | None = None  # (F, H, W) of the latents; None: the recipe's data.latent


def setting_of(res, tp=None, cp=None, pp=None, micro_batch=1, latent=None) -> Setting:
    p = res.raw.parallel
    return Setting(tp or p.tp, cp or p.cp, p.sequence_parallel, pp or p.pp, micro_batch, p.activation_checkpointing,
                   None if latent is None else tuple(latent))


class _Stage:
    """The calls of one stage: which blocks each role holds there, whether it embeds and/or runs the head."""

    def __init__(self, res, st: Setting, stage: int):
        from .partition import role_ranges
        from .plan import per_token_timesteps

        self.res, self.st, self.cfg = res, st, res.wan
        self.latent = st.latent or tuple(res.raw.data.latent)[1:]
        first, last = stage == 0, stage == st.pp - 1
        self.spans = {role: (*r[stage], first, last) for role, r in role_ranges(res, st.pp).items()}
        self.span = self.spans["student"]
        self.shard = Shard(st.tp, st.cp, st.sp)
        self.per_token = per_token_timesteps(res)
        self.ac = st.ac

    def tokens(self) -> int:
        return self.shard.tokens(F.grid_tokens(self.cfg, self.latent))[2]

    def wan(self, b: int, x_grad: bool = False, role: str = "student") -> Call:
        return F.wan_call(self.cfg, self.latent, b, self.shard, self.spans[role], self.per_token, x_grad)

    def train(self, call: Call) -> tuple[Flops, Flops]:
        """Forward and backward of a call whose weights all train and whose inputs need no gradient."""
        return call.forward(), F.backward_of(call, weights=True, checkpointed=self.ac)

    # ---- the decoupled student --------------------------------------------------------------------------
    def student_first(self, b: int, points: int) -> Call:
        """The first stage's part of a student pass: embeddings and the flow head's conditioning for `points`."""
        cfg = self.cfg
        if not self.span[2]:
            return Call()
        c = F.wan_embeddings(cfg, self.latent, b, self.shard, self.per_token)
        return c + F.flow_head_times(cfg, b, points, self.tokens() if self.per_token else 1)

    def backbone(self, b: int) -> Call:
        start, end, _, _ = self.span
        split = self.cfg.num_layers - self.res.student.flow_head_blocks
        return F.wan_blocks(self.cfg, self.latent, b, range(start, min(end, split)), self.shard)

    def head(self, b: int, y_grad: bool = False) -> Call:
        if not self.span[3]:
            return Call()
        split = self.cfg.num_layers - self.res.student.flow_head_blocks
        return F.flow_head_call(self.cfg, self.latent, b, split, self.shard, self.res.student.fusion, y_grad)


def stage_passes(res, st: Setting, stage: int = 0, generator: bool = True) -> list[PassCost]:
    """The passes of one step on `stage`, per microbatch of st.micro_batch samples."""
    s, b = _Stage(res, st, stage), st.micro_batch
    method = res.method
    if method in ("flow_matching", "kd"):
        p = PassCost("student F+B", batch=b)
        p.add("student", *s.train(s.wan(b)))
        return [p]
    if method == "tm_mf":
        return _tm_mf(res, s, b)
    return _stage2(res, s, b, generator)


def _tm_mf(res, s: _Stage, b: int) -> list[PassCost]:
    cfg = res.tm_mf
    if cfg.jvp != "fd":
        raise ValueError("FLOPs are modelled for the finite-difference JVP (method.tm_mf.jvp=fd) only")
    out = []
    if cfg.cfg_scale != 1.0:
        p = PassCost("CFG: unconditional forward", batch=b)
        if cfg.cfg_source == "student":
            p.add("student", (s.student_first(b, 1) + s.backbone(b) + s.head(b)).forward())
        else:
            p.add("teacher", s.wan(b, role="teacher").forward())
        out.append(p)
    p = PassCost("student F+B (2 FD flow-head passes)", batch=b)
    graph = s.student_first(b, 3) + s.backbone(b) + s.head(b)
    fd = s.head(b).forward() * 2  # no_grad: neither checkpointed nor differentiated
    fwd, bwd = s.train(graph)
    p.add("student", fwd + fd, bwd)
    return out + [p]


def _student_rollout(res, s: _Stage, b: int) -> Call:
    n = res.dmd2v.inner_steps
    c = s.student_first(b, n) + s.backbone(b)
    for k in range(n):
        c = c + s.head(b, y_grad=k > 0)
    return c


def _stage2(res, s: _Stage, b: int, generator: bool) -> list[PassCost]:
    dmd, cfg = res.dmd2v, res.wan
    student = (lambda: _student_rollout(res, s, b)) if res.student is not None else (lambda: s.wan(b))
    out = []
    p = PassCost("student forward (sample x̂)", batch=b)
    p.add("student", student().forward())
    out.append(p)
    start, end, _, _ = s.spans["teacher"]
    local_heads = [i for i in dmd.disc_layers if start <= i < end]
    use_gan = dmd.gan_weight > 0
    if generator:  # run 1: every pass that needs only x̂, merged (programs.stage2_step)
        p = PassCost("fake score forward", batch=b, run=1)
        p.add("fake", s.wan(b, role="fake").forward())
        out.append(p)
        if dmd.cfg_scale != 1.0:
            p = PassCost("teacher forward (unconditional)", batch=b, run=1)
            p.add("teacher", s.wan(b, role="teacher").forward())
            out.append(p)
        p = PassCost("teacher forward" + (" + GAN heads, input gradient" if use_gan else " (conditional)"), batch=b,
                     run=1)
        if use_gan:
            call = s.wan(b, x_grad=True, role="teacher")
            p.add("teacher", call.forward(), F.backward_of(call, weights=False, streams=("x",),
                                                           until=max(dmd.disc_layers), checkpointed=s.ac))
            heads = F.disc_call(cfg, s.latent, b, len(local_heads), dmd.disc_width, dmd.disc_features,
                                input_grad=True, arch=dmd.disc_arch)
            p.add("disc", heads.forward(), F.backward_of(heads, weights=False, streams=("disc",)))
        else:
            p.add("teacher", s.wan(b, role="teacher").forward())
        out.append(p)
    p = PassCost("fake score F+B (DSM)", batch=b, run=1)
    p.add("fake", *s.train(s.wan(b, role="fake")))
    out.append(p)
    if use_gan:
        p = PassCost("teacher forward [fake; real] + discriminator F+B", batch=2 * b, run=1)
        p.add("teacher", s.wan(2 * b, role="teacher").forward())
        heads = F.disc_call(cfg, s.latent, 2 * b, len(local_heads), dmd.disc_width, dmd.disc_features,
                            arch=dmd.disc_arch)
        p.add("disc", heads.forward(), F.backward_of(heads, weights=True, streams=("disc",)))
        p.forward_only = True  # in the pipeline's terms: the heads' backward runs inside the forward op
        out.append(p)
    if generator:
        p = PassCost("student F+B (VSD + GAN gradient)", batch=b, run=2)
        p.add("student", *s.train(student()))
        out.append(p)
    return out


def per_rank_step(passes: list[PassCost], microbatches: int) -> Flops:
    """Executed (and model) FLOPs one rank of the stage runs in a step."""
    return F.total((p.forward + p.backward) * microbatches for p in passes)


def by_role(passes: list[PassCost], microbatches: int = 1) -> dict[str, Flops]:
    out: dict[str, Flops] = {}
    for p in passes:
        for table in (p.fwd, p.bwd):
            for role, f in table.items():
                out[role] = out.get(role, Flops()) + f * microbatches
    return out


def step_flops(res, generator: bool = True, global_batch: int | None = None, latent=None) -> dict[str, Flops]:
    """FLOPs of one step of the whole job by role: the unsharded model, one sample at a time, times the global
    batch (model FLOPs for MFU; executed FLOPs of one device add its shard's replicated embeddings)."""
    n = global_batch or res.raw.data.global_batch
    st = Setting(ac=res.raw.parallel.activation_checkpointing, latent=None if latent is None else tuple(latent))
    return by_role(stage_passes(res, st, 0, generator), n)


def iteration_flops(res, global_batch: int | None = None, latent=None) -> Flops:
    """Model FLOPs of one iteration averaged over the generator period (stage 2 updates the student on one
    iteration in `student_every`)."""
    gen = F.total(step_flops(res, True, global_batch, latent).values())
    if res.dmd2v is None:
        return gen
    every = res.dmd2v.student_every
    critic = F.total(step_flops(res, False, global_batch, latent).values())
    return (gen + critic * (every - 1)) * (1.0 / every)
