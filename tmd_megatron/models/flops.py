"""Exact FLOPs of one call of the Wan DiT, the TMD student's parts and the discriminator heads on one rank.

Counted: matrix products and convolutions, 2 FLOPs per multiply-accumulate, which is what
torch.utils.flop_counter.FlopCounterMode counts (elementwise work -- norms, RoPE, softmax, activations -- is left
out by both; tests/test_flops.py holds the two together within 1 %). A call is a list of `Op`s: each knows its
forward FLOPs, whether it is a GEMM or attention, which input stream it belongs to and in which block it sits, so
a pass can derive its backward from what needs a gradient (`backward_of`).

Shards: the video tokens L = F'·H'·W' are padded to L_p, a multiple of S = cp·(tp under SP); a rank's blocks see
its CP chunk L_c = L_p/cp (gathered over TP under SP) with D/tp columns of every TP-parallel linear, attention
over L_c queries and the L real keys with heads/tp (Ulysses: L_p queries and heads/(tp·cp), the same product),
and its residual shard L_p/S in the output head. Embeddings run replicated: the patch convolution on the whole
latent (patchify, then split), the text, time and image MLPs in full.

Two totals: executed FLOPs (what the device runs, what FlopCounterMode sees: activation checkpointing re-runs a
block's forward; the fused attention backward re-computes the scores, 5 products against the forward's 2) and
model FLOPs, the convention of MFU (PaLM, Megatron): each product once, attention backward 2x its forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .wan.config import WanConfig

# Fused attention kernels (flash, CPU flash, memory-efficient) recompute the score products in backward:
# torch.utils.flop_counter.sdpa_backward_flop_count counts 5 products, 2.5x the forward's 2.
FUSED_ATTN_BACKWARD = 2.5
MODEL_ATTN_BACKWARD = 2.0


@dataclass
class Flops:
    gemm: float = 0.0  # linear layers and convolutions
    attn: float = 0.0  # attention's score and value products
    remat: float = 0.0  # of gemm + attn: re-computation (checkpointed forwards, fused-backward scores)
    # for the step-time model: kernel calls, and block executions (forward ones include re-computation)
    gemm_calls: float = 0.0
    attn_calls: float = 0.0
    block_fwd: float = 0.0
    block_bwd: float = 0.0

    @property
    def total(self) -> float:
        """Executed FLOPs."""
        return self.gemm + self.attn

    @property
    def model(self) -> float:
        """Model FLOPs: executed less re-computation."""
        return self.total - self.remat

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(*(a + b for a, b in zip(self._values(), other._values())))

    def __mul__(self, k: float) -> "Flops":
        return Flops(*(a * k for a in self._values()))

    __rmul__ = __mul__

    def _values(self) -> tuple:
        return (self.gemm, self.attn, self.remat, self.gemm_calls, self.attn_calls, self.block_fwd, self.block_bwd)


def total(parts) -> Flops:
    out = Flops()
    for p in parts:
        out = out + p
    return out


@dataclass(frozen=True)
class Op:
    flops: float  # forward FLOPs on this rank
    kind: str = "gemm"  # gemm | attn
    stream: str = "x"  # x (video tokens), text, time, image, disc
    block: int = -1  # -1: before the blocks; num_layers: after them (head); a block index otherwise
    leaf: bool = False  # reads a pass input of its stream (no input gradient unless that input needs one)
    calls: int = 1  # kernel calls it stands for (q, k, v and o are four)


@dataclass(frozen=True)
class Shard:
    """What one rank computes of a call: tensor, context and sequence parallel sizes."""

    tp: int = 1
    cp: int = 1
    sp: bool = True

    def tokens(self, num_tokens: int) -> tuple[int, int, int]:
        """(L_p, L_c, local): padded length, CP chunk, residual shard."""
        shards = self.cp * (self.tp if self.sp and self.tp > 1 else 1)
        padded = -(-num_tokens // shards) * shards
        return padded, padded // self.cp, padded // shards


def grid_tokens(cfg: WanConfig, latent_fhw) -> int:
    return math.prod(n // p for n, p in zip(latent_fhw, cfg.patch_size))


@dataclass
class Call:
    """One model call on one rank: its ops, and the blocks it runs (for checkpointing and partial backward)."""

    ops: list[Op] = field(default_factory=list)
    blocks: tuple[int, ...] = ()

    def add(self, flops: float, **kw) -> None:
        if flops:
            self.ops.append(Op(float(flops), **kw))

    def __add__(self, other: "Call") -> "Call":
        return Call(self.ops + other.ops, self.blocks + other.blocks)

    def forward(self) -> Flops:
        out = total(_fwd(o) for o in self.ops)
        out.block_fwd = len(self.blocks)
        return out


def _fwd(o: Op, remat: bool = False) -> Flops:
    r = o.flops if remat else 0.0
    if o.kind == "gemm":
        return Flops(o.flops, 0.0, r, gemm_calls=o.calls)
    return Flops(0.0, o.flops, r, attn_calls=o.calls)


# ---- the Wan DiT --------------------------------------------------------------------------------------------
def wan_embeddings(cfg: WanConfig, latent_fhw, b: int, shard: Shard = Shard(), per_token: bool = False,
                   x_grad: bool = False) -> Call:
    """Patch, text, time (and CLIP image) embeddings of a first pipeline stage, for b samples. x_grad: the latent
    needs a gradient (the patch convolution then computes its input gradient)."""
    c = Call()
    L = grid_tokens(cfg, latent_fhw)
    d = cfg.dim
    c.add(2 * b * L * d * cfg.in_dim * cfg.patch_volume, stream="x", leaf=not x_grad)
    t = cfg.text_len
    c.add(2 * b * t * cfg.text_dim * d, stream="text", leaf=True)
    c.add(2 * b * t * d * d, stream="text")
    c = c + time_embedding(cfg, b, shard.tokens(L)[2] if per_token else 1, projection=True)
    if cfg.image_dim is not None:
        i, n = cfg.image_dim, cfg.image_len
        c.add(2 * b * n * i * i, stream="image", leaf=True)
        c.add(2 * b * n * i * d, stream="image")
    return c


def time_embedding(cfg: WanConfig, b: int, tokens: int = 1, projection: bool = True) -> Call:
    """A Wan time MLP (Linear(freq, D), SiLU, Linear(D, D)) on b samples x tokens, and the 6D projection."""
    c, d = Call(), cfg.dim
    c.add(2 * b * tokens * cfg.freq_dim * d, stream="time", leaf=True)
    c.add(2 * b * tokens * d * d, stream="time")
    if projection:
        c.add(2 * b * tokens * d * 6 * d, stream="time")
    return c


def wan_blocks(cfg: WanConfig, latent_fhw, b: int, blocks, shard: Shard = Shard()) -> Call:
    """Blocks `blocks` (an iterable of indices) on b samples."""
    c = Call(blocks=tuple(blocks))
    L = grid_tokens(cfg, latent_fhw)
    _, lc, _ = shard.tokens(L)
    d, f, t, tp = cfg.dim, cfg.ffn_dim, cfg.text_len, shard.tp
    n = cfg.image_len if cfg.image_dim is not None else 0
    for i in c.blocks:
        c.add(4 * 2 * b * lc * d * d / tp, block=i, calls=4)  # self q, k, v, o
        c.add(2 * 2 * b * lc * L * d / tp, kind="attn", block=i)  # L_c queries, L real keys
        c.add(2 * 2 * b * lc * d * d / tp, block=i, calls=2)  # cross q, o
        c.add(2 * 2 * b * t * d * d / tp, stream="text", block=i, calls=2)  # cross k, v on the text
        c.add(2 * 2 * b * lc * t * d / tp, kind="attn", block=i)
        if n:
            c.add(2 * 2 * b * n * d * d / tp, stream="image", block=i, calls=2)  # k_img, v_img
            c.add(2 * 2 * b * lc * n * d / tp, kind="attn", block=i)
        c.add(2 * 2 * b * lc * d * f / tp, block=i, calls=2)  # FFN in, out
    return c


def wan_head(cfg: WanConfig, latent_fhw, b: int, shard: Shard = Shard()) -> Call:
    c = Call()
    local = shard.tokens(grid_tokens(cfg, latent_fhw))[2]
    c.add(2 * b * local * cfg.dim * cfg.out_dim * cfg.patch_volume, block=cfg.num_layers)
    return c


def wan_call(cfg: WanConfig, latent_fhw, b: int, shard: Shard = Shard(), span=None, per_token: bool = False,
             x_grad: bool = False) -> Call:
    """A WanModel forward on this rank's pipeline stage span = (start, end, first, last) (whole model if None)."""
    start, end, first, last = span or (0, cfg.num_layers, True, True)
    c = wan_embeddings(cfg, latent_fhw, b, shard, per_token, x_grad) if first else Call()
    c = c + wan_blocks(cfg, latent_fhw, b, range(start, end), shard)
    return c + wan_head(cfg, latent_fhw, b, shard) if last else c


# ---- the TMD student's parts --------------------------------------------------------------------------------
def flow_head_times(cfg: WanConfig, b: int, points: int, tokens: int = 1) -> Call:
    """`DecoupledStudent.flow_head_time` for `points` (s, r) pairs: the s−r and s embeddings, the 6D projection
    (per token of the shard for per-token timesteps)."""
    c = Call()
    for _ in range(points):
        c = c + time_embedding(cfg, b, 1, projection=False)  # E_Δ(s − r)
        c = c + time_embedding(cfg, b, 1, projection=False)  # E_s(s) (head_time="outer") or Wan's emb(s)
        c.add(2 * b * tokens * cfg.dim * 6 * cfg.dim, stream="time")
    return c


def flow_head_call(cfg: WanConfig, latent_fhw, b: int, split: int, shard: Shard = Shard(), fusion: str = "gated",
                   y_grad: bool = False) -> Call:
    """One flow-head pass (fusion of the patch-embedded y_s, blocks[split:], output head) on the last stage.
    y_grad: y_s depends on trained weights (a rollout step after the first), so the patch convolution's input
    gradient is computed."""
    c = Call()
    L = grid_tokens(cfg, latent_fhw)
    _, lc, local = shard.tokens(L)
    d = cfg.dim
    c.add(2 * b * L * d * cfg.in_dim * cfg.patch_volume, stream="x", leaf=not y_grad)
    if fusion == "gated":
        c.add(2 * 2 * b * lc * d * cfg.ffn_dim / shard.tp, calls=2)
    else:  # ConcatFusion: one replicated Linear(2D, D) on the residual shard
        c.add(2 * b * local * 2 * d * d)
    c = c + wan_blocks(cfg, latent_fhw, b, range(split, cfg.num_layers), shard)
    return c + wan_head(cfg, latent_fhw, b, shard)


# ---- discriminator heads --------------------------------------------------------------------------------------
def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def disc_head_convs(cfg: WanConfig, latent_fhw, b: int, width: int, features: str = "unpatchify",
                    arch: str = "conv3d") -> list[tuple[float, bool]]:
    """(forward FLOPs, reads the head's input) of each product of one discriminator head (models/discriminator.py)
    on b samples: Conv3dHead's four convolutions, or MultiscaleHead's five branches (a 1x1x1 mix on the volume, a
    3x3x3 convolution on it pooled by the branch's scale) and its two-layer MLP."""
    grid = [n // p for n, p in zip(latent_fhw, cfg.patch_size)]
    if features == "unpatchify":
        size, cin = [g * p for g, p in zip(grid, cfg.patch_size)], cfg.dim // cfg.patch_volume
    else:
        size, cin = grid, cfg.dim
    out = []
    if arch == "multiscale":
        from .discriminator import MultiscaleHead

        for scale in MultiscaleHead.SCALES:
            pooled = [n // min(scale, n) for n in size]
            out.append((2 * b * math.prod(size) * cin * cin, True))
            out.append((2 * b * math.prod(pooled) * 27 * cin * cin, False))
        hidden = MultiscaleHead.MLP_HIDDEN
        out += [(2 * b * len(MultiscaleHead.SCALES) * cin * hidden, False), (2 * b * hidden, False)]
        return out
    layers = [((3, 4, 4), (1, 2, 2), 1, width), ((3, 4, 4), (2, 2, 2), 1, width), ((3, 3, 3), (2, 2, 2), 1, 2 * width),
              ((1, 1, 1), (1, 1, 1), 0, 1)]
    for j, (kernel, stride, pad, cout) in enumerate(layers):
        size = [_conv_out(n, k, s, pad) for n, k, s in zip(size, kernel, stride)]
        out.append((2 * b * math.prod(size) * math.prod(kernel) * cin * cout, j == 0))
        cin = cout
    return out


def disc_call(cfg: WanConfig, latent_fhw, b: int, heads: int, width: int, features: str = "unpatchify",
              input_grad: bool = False, arch: str = "conv3d") -> Call:
    """`heads` discriminator heads on b samples; input_grad: their input volumes need a gradient."""
    c = Call()
    for _ in range(heads):
        for f, reads_input in disc_head_convs(cfg, latent_fhw, b, width, features, arch):
            c.add(f, stream="disc", leaf=reads_input and not input_grad)
    return c


# ---- backward ---------------------------------------------------------------------------------------------------
def backward_of(call: Call, *, weights: bool, streams=("x", "text", "time", "image", "disc"), until: int | None = None,
                checkpointed: bool = False, attn_backward: float = FUSED_ATTN_BACKWARD) -> Flops:
    """Backward FLOPs of a call. weights: the parameters need gradients (dW of every op on a gradient stream);
    streams: the streams a gradient flows through; until: the last block the gradient reaches (the backward
    starts from a hidden state of that block: later blocks and the head get none); leaf ops compute an input
    gradient only when marked non-leaf. checkpointed: every block the backward reaches runs its forward again."""
    out = Flops()
    reached = set()
    for o in call.ops:
        if o.stream not in streams or (until is not None and o.block > until):
            continue
        if o.kind == "attn":
            out = out + Flops(0.0, attn_backward * o.flops, (attn_backward - MODEL_ATTN_BACKWARD) * o.flops,
                              attn_calls=o.calls)
        else:
            n = (1 if weights else 0) + (0 if o.leaf else 1)
            out = out + Flops(o.flops * n, gemm_calls=o.calls * n)
        if o.block in call.blocks:
            reached.add(o.block)
    runs = sum(1 for i in call.blocks if i in reached)  # a block index repeats for each flow-head pass
    out.block_bwd = runs
    if checkpointed:
        out = out + total(_fwd(o, remat=True) for o in call.ops if o.block in reached)
        out.block_fwd = runs
    return out


# ---- measuring ------------------------------------------------------------------------------------------------
def flop_counter():
    """torch's FlopCounterMode (its dispatch and formulas) that also counts torch's CPU flash attention (the kernel
    SDPA and our ring use on CPU, which torch's table lacks: its own SDPA formulas are applied) and counts the
    whole program only. Its per-module tracker is left out: it registers gradient hooks on module inputs, which
    fails on the finite-difference passes' no-grad views of tensors that require grad."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
           aten._scaled_dot_product_flash_attention_for_cpu_backward:
               lambda dout, q, k, v, *a, **kw: sdpa_backward_flop_count(dout, q, k, v)}

    class _WholeProgram:
        parents = ("Global",)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    counter = FlopCounterMode(display=False, custom_mapping=cpu)
    counter.mod_tracker = _WholeProgram()
    return counter


def elementwise_traffic(fn, fused: bool = False, breaks=()) -> tuple[float, int]:
    """(bytes read and written, number of ops) of everything fn runs besides products and attention: the
    elementwise and copy ops (norms, modulation, RoPE, activations, residual adds, casts), whose time is memory
    traffic and per-op overhead, not FLOPs. Views and allocations move nothing and are not counted as bytes. Runs
    on the meta device as well (shapes only), which is how the step-time model counts a 14B block.

    fused=True counts what a compiler that fuses every elementwise chain leaves (inductor on a compiled block,
    model.compile): each run of ops between two products, attention calls or ops in `breaks` is one kernel, which
    reads each tensor from outside the run once and writes what leaves it (used by a later run, or never used
    inside fn: returned or saved for the backward); what is made and used up inside the run stays in registers."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    skip = set(flop_registry) | {aten._scaled_dot_product_flash_attention_for_cpu,
                                 aten._scaled_dot_product_flash_attention_for_cpu_backward}
    free = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
    state = {"bytes": 0.0, "ops": 0, "region": 0, "open": False}
    events = []  # fused: (region, inputs, outputs) of each counted op; the tensors are kept alive, ids stay unique
    alias, kept = {}, []  # fused: id of a view -> id of its base tensor

    def root(t) -> int:
        k = id(t)
        while k in alias:
            k = alias[k]
        return k

    def tensors(tree):
        return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]

    class _Traffic(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = func._overloadpacket
            if packet in skip or packet in breaks:
                state["open"] = False
                return out
            if func.is_view and fused:  # a view reads and writes its base
                src = tensors((args, kwargs))
                if src:
                    for t in tensors(out):
                        alias[id(t)] = root(src[0])
                        kept.append(t)
            if func.is_view or func.namespace != "aten":  # prim.device & co. touch no data
                return out
            if not fused:
                state["ops"] += 1
                if packet not in free:
                    state["bytes"] += sum(t.numel() * t.element_size() for t in tensors((args, kwargs, out)))
                return out
            if packet in free:
                return out
            if not state["open"]:
                state["region"] += 1
                state["open"] = True
            events.append((state["region"], tensors((args, kwargs)), tensors(out)))
            return out

    with _Traffic():
        fn()
    if not fused:
        return state["bytes"], state["ops"]
    made, key = {}, root  # a tensor (its base, for views) -> the run that wrote it first
    for region, _, outs in events:
        for t in outs:
            made.setdefault(key(t), region)
    read_by = {}
    for region, ins, _ in events:
        for t in ins:
            read_by.setdefault(key(t), set()).add(region)
    total, seen = 0.0, set()
    for region, ins, outs in events:
        for t in ins:
            k = key(t)
            if made.get(k) != region and (region, k) not in seen:  # read once per kernel
                seen.add((region, k))
                total += t.numel() * t.element_size()
        for t in outs:
            k = key(t)
            readers = read_by.get(k, set())
            if (readers - {region} or not readers) and ("w", k) not in seen:
                seen.add(("w", k))
                total += t.numel() * t.element_size()
    return total, state["region"]
