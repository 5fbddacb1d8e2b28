"""Self-attention cores for context parallelism: ring (K/V rotation, online softmax) and Ulysses (all-to-all).

Both take this rank's contiguous chunk of the (padded) token sequence, [B, L_chunk, heads, d], and return
the attention output for it. `key_valid`, when given, is the mask of the whole padded sequence
[L_chunk * cp] (the layout pads at the end; padded keys are masked, padded queries are discarded later).
Optional flash-attn core for the non-CP path (CUDA only).
"""
from __future__ import annotations

import torch
from torch import nn

from tmd_megatron.models.wan.layers import SDPAttention

from . import comm
from .comm import CommGroup


# ---- ring attention --------------------------------------------------------------------------------------------
def _masked_scores(q, k, valid, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return s if valid is None else s.masked_fill(~valid, float("-inf"))


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """-inf (a row whose keys are all masked) -> 0, so exp(x - lse) gives 0 instead of nan."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


class _RingAttention(torch.autograd.Function):
    """Exact softmax attention over K/V chunks passed around the CP ring (math in fp32, fp64 for fp64 inputs).

    Forward keeps a running (output, log-sum-exp) and merges each chunk's partial result. Backward recomputes
    the probabilities chunk by chunk from the saved log-sum-exp (as flash attention does) and passes K/V around
    again rather than keeping the other chunks from the forward (their memory is what the ring saves). The dK/dV
    of a remote chunk travel one rank behind it, starting where it is first seen, and reach its owner after
    cp - 1 hops; the owner adds its own part last.
    """

    @staticmethod
    def forward(ctx, q, k, v, valid, group: CommGroup):
        n, r = group.size, group.rank
        nxt, prv = group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        scale = q.shape[-1] ** -0.5
        chunks = None if valid is None else valid.view(n, -1)
        acc = torch.promote_types(q.dtype, torch.float32)
        q32 = q.to(acc)
        out = torch.zeros_like(q32)
        lse = torch.full(q32.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        for step in range(n):
            if step < n - 1:
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                pending = comm.exchange(group, [(k_cur, nxt), (v_cur, nxt)], [(k_nxt, prv), (v_nxt, prv)], True)
            src = (r - step) % n
            s = _masked_scores(q32, k_cur.to(acc), None if chunks is None else chunks[src], scale)
            blk_lse = torch.logsumexp(s, dim=-1)
            blk_out = torch.matmul(torch.exp(s - _finite(blk_lse)[..., None]), v_cur.to(acc))
            new_lse = torch.logaddexp(lse, blk_lse)
            safe = _finite(new_lse)[..., None]
            out = out * torch.exp(lse[..., None] - safe) + blk_out * torch.exp(blk_lse[..., None] - safe)
            lse = new_lse
            if step < n - 1:
                pending.wait()
                k_cur, v_cur = k_nxt, v_nxt
        ctx.save_for_backward(q, k, v, out, lse, valid)
        ctx.group = group
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, valid = ctx.saved_tensors
        group = ctx.group
        n, r = group.size, group.rank
        nxt, prv = group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        scale = q.shape[-1] ** -0.5
        chunks = None if valid is None else valid.view(n, -1)
        acc = out.dtype
        q32, do32 = q.to(acc), dout.to(acc)
        delta = (do32 * out).sum(dim=-1, keepdim=True)
        dq = torch.zeros_like(q32)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        travelling = None  # (dK, dV) of the chunk this rank sees next, sent on by the previous rank
        for step in range(n):
            if step < n - 1:
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                pending = comm.exchange(group, [(k_cur, nxt), (v_cur, nxt)], [(k_nxt, prv), (v_nxt, prv)], True)
            src = (r - step) % n
            k32, v32 = k_cur.to(acc), v_cur.to(acc)
            s = _masked_scores(q32, k32, None if chunks is None else chunks[src], scale)
            p = torch.exp(s - lse[..., None])
            dv = torch.matmul(p.transpose(-1, -2), do32)
            ds = p * (torch.matmul(do32, v32.transpose(-1, -2)) - delta)
            dq = dq + torch.matmul(ds, k32) * scale
            dk = torch.matmul(ds.transpose(-1, -2), q32) * scale
            if step == 0:
                dk_own, dv_own = dk, dv
            else:  # chunk src's accumulator moves on to rank r + 1, which sees src next (its owner after the last)
                if travelling is not None:
                    dk, dv = dk + travelling[0], dv + travelling[1]
                dk_in, dv_in = torch.empty_like(dk), torch.empty_like(dv)
                comm.exchange(group, [(dk, nxt), (dv, nxt)], [(dk_in, prv), (dv_in, prv)])
                travelling = (dk_in, dv_in)
            if step < n - 1:
                pending.wait()
                k_cur, v_cur = k_nxt, v_nxt
        if travelling is not None:  # everyone else's part of this rank's dK/dV
            dk_own, dv_own = dk_own + travelling[0], dv_own + travelling[1]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None


class RingAttention(nn.Module):
    def __init__(self, group: CommGroup):
        super().__init__()
        self.group = group

    def forward(self, q, k, v, key_valid=None):
        q, k = q.to(v.dtype), k.to(v.dtype)
        # the chunk math accumulates in fp32 on purpose: autocast must not turn its matmuls into bf16
        with torch.autocast(device_type=v.device.type, enabled=False):
            out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_valid, self.group)
        return out.transpose(1, 2)


# ---- Ulysses -------------------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; it is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_to_all(grad, ctx.group), None


class UlyssesAttention(nn.Module):
    """Heads <-> tokens all-to-all (one for q, k, v stacked, one back), full-sequence attention on heads/cp."""

    def __init__(self, group: CommGroup, core: nn.Module):
        super().__init__()
        self.group, self.core = group, core

    def forward(self, q, k, v, key_valid=None):
        n = self.group.size
        b, chunk, heads, d = q.shape
        if heads % n:
            raise ValueError(
                f"Ulysses context parallelism needs the local head count ({heads}) divisible by cp={n}; "
                "use cp_comm='ring' or change tp/cp"
            )
        # one copy straight into the send layout [cp (head group), 3, B, Lc, H/cp, d]
        x = torch.stack([t.to(v.dtype).unflatten(2, (n, heads // n)).permute(2, 0, 1, 3, 4) for t in (q, k, v)], 1)
        x = _AllToAll.apply(x, self.group)  # [cp (token chunk), 3, B, Lc, H/cp, d]
        x = x.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # [3, B, L, H/cp, d]
        o = self.core(x[0], x[1], x[2], key_valid)  # [B, L, H/cp, d]
        o = o.unflatten(1, (n, chunk)).permute(1, 0, 2, 3, 4)  # [cp (token chunk), B, Lc, H/cp, d]
        o = _AllToAll.apply(o.contiguous(), self.group)  # [cp (head group), B, Lc, H/cp, d]
        return o.permute(1, 2, 0, 3, 4).flatten(2, 3)


# ---- local cores ----------------------------------------------------------------------------------------------------
class FlashAttention(nn.Module):
    """flash-attn's kernel for unmasked bf16/fp16 CUDA attention; anything else falls back to torch SDPA."""

    def __init__(self):
        super().__init__()
        from flash_attn import flash_attn_func  # raises ImportError where flash-attn is absent

        self._flash = flash_attn_func
        self._fallback = SDPAttention()

    def forward(self, q, k, v, key_valid=None):
        usable = key_valid is None and v.is_cuda and v.dtype in (torch.float16, torch.bfloat16)
        if not usable:
            return self._fallback(q, k, v, key_valid)
        return self._flash(q.to(v.dtype), k.to(v.dtype), v)


def make_local_attention(kind: str = "sdpa") -> nn.Module:
    if kind == "sdpa":
        return SDPAttention()
    if kind == "flash":
        try:
            return FlashAttention()
        except ImportError as err:
            raise RuntimeError(f"attention='flash' needs flash-attn and CUDA ({err}); use attention='sdpa'") from err
    raise ValueError(f"unknown attention core {kind!r}; choose 'sdpa' or 'flash'")


def make_self_attention(cp_group: CommGroup, cp_comm: str, kind: str = "sdpa") -> nn.Module:
    if cp_comm not in ("ring", "ulysses"):
        raise ValueError(f"unknown cp_comm {cp_comm!r}; choose 'ring' or 'ulysses'")
    if cp_group.size == 1:
        return make_local_attention(kind)
    if cp_comm == "ring":
        return RingAttention(cp_group)
    return UlyssesAttention(cp_group, make_local_attention(kind))
