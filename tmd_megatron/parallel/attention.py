"""Self-attention cores for context parallelism: ring (K/V rotation, online softmax) and Ulysses (all-to-all).

Both take this rank's contiguous chunk of the (padded) token sequence, [B, L_chunk, heads, d], and return
the attention output for it. `real_keys`, when given, is how many tokens of the whole padded sequence
[L_chunk * cp] are real: the layout pads at the end, so padded keys are sliced off (never a mask, which would
force an unfused kernel) and padded queries are discarded later. Optional flash-attn core (CUDA only).
"""
from __future__ import annotations

import torch
from torch import nn

from tmd_megatron.models.wan.layers import SDPAttention, real_key_slice

from . import comm
from .chunk_attention import select_kernel
from .comm import CommGroup


# ---- ring attention --------------------------------------------------------------------------------------------
def _real_keys_of(chunk: int, length: int, real_keys: int | None) -> int:
    """Real keys in K/V chunk `chunk` of `length` tokens: padding sits at the end of the whole sequence."""
    if real_keys is None:
        return length
    return max(0, min(length, real_keys - chunk * length))


class _RingAttention(torch.autograd.Function):
    """Exact softmax attention over K/V chunks passed around the CP ring.

    Each chunk is computed by a fused kernel that returns its log-sum-exp (chunk_attention.py); the partial
    outputs are merged by LSE in fp32 (fp64 for fp64 inputs), so no [Lc, Lc] score block is kept and memory is
    linear in the chunk length. Backward hands the *merged* output and LSE to the kernel's backward for each
    chunk (exact: P = exp(S - lse), delta = rowsum(dO * O)) and passes K/V around again rather than keeping
    the other chunks from the forward (their memory is what the ring saves; keep_kv=True keeps them). The dK/dV of a remote chunk travel
    one rank behind it in fp32, starting where it is first seen, and reach its owner after cp - 1 hops; the
    owner adds its own part last. Padded keys (the end of the sequence) are sliced off, never masked.
    """

    @staticmethod
    def forward(ctx, q, k, v, real_keys, group: CommGroup, kernel_name: str, keep_kv: bool = False):
        n, r = group.size, group.rank
        nxt, prv = group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        scale = q.shape[-1] ** -0.5
        kernel = select_kernel(q, kernel_name)
        length = k.shape[-2]
        acc = torch.promote_types(q.dtype, torch.float32)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        aux = [None] * n
        k_cur, v_cur = k.contiguous(), v.contiguous()
        kept = []  # keep_kv: the other ranks' chunks, in the order they arrived, for the backward
        for step in range(n):
            if step < n - 1:
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                pending = comm.exchange(group, [(k_cur, nxt), (v_cur, nxt)], [(k_nxt, prv), (v_nxt, prv)], True)
            src = (r - step) % n
            keep = _real_keys_of(src, length, real_keys)
            if keep:
                blk_out, blk_lse, aux[src] = kernel.forward(q, k_cur[..., :keep, :], v_cur[..., :keep, :], scale)
                blk_lse = blk_lse.to(acc)
                new_lse = torch.logaddexp(lse, blk_lse)
                # a row's first chunk has lse = -inf: exp(-inf - new) = 0 weights the empty accumulator out
                out = out * torch.exp(lse - new_lse)[..., None] + blk_out.to(acc) * torch.exp(blk_lse - new_lse)[..., None]
                lse = new_lse
            if step < n - 1:
                pending.wait()
                k_cur, v_cur = k_nxt, v_nxt
                if keep_kv:
                    kept += [k_cur, v_cur]
        ctx.save_for_backward(q, k, v, out.to(q.dtype) if kernel.name != "math" else out, lse, *kept)
        ctx.group, ctx.kernel, ctx.real_keys, ctx.aux, ctx.keep_kv = group, kernel, real_keys, aux, keep_kv
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *kept = ctx.saved_tensors
        group, kernel = ctx.group, ctx.kernel
        n, r = group.size, group.rank
        nxt, prv = group.ranks[(r + 1) % n], group.ranks[(r - 1) % n]
        scale = q.shape[-1] ** -0.5
        length = k.shape[-2]
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        travelling = None  # (dK, dV) of the chunk this rank sees next, sent on by the previous rank
        for step in range(n):
            if step < n - 1 and not ctx.keep_kv:
                k_nxt, v_nxt = torch.empty_like(k_cur), torch.empty_like(v_cur)
                pending = comm.exchange(group, [(k_cur, nxt), (v_cur, nxt)], [(k_nxt, prv), (v_nxt, prv)], True)
            src = (r - step) % n
            keep = _real_keys_of(src, length, ctx.real_keys)
            dk = torch.zeros(k_cur.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v_cur.shape, dtype=acc, device=v.device)
            if keep:
                dq_b, dk_b, dv_b = kernel.backward(dout, q, k_cur[..., :keep, :], v_cur[..., :keep, :], out, lse,
                                                   scale, ctx.aux[src])
                dq += dq_b
                dk[..., :keep, :] = dk_b
                dv[..., :keep, :] = dv_b
            if step == 0:
                dk_own, dv_own = dk, dv
            else:  # chunk src's accumulator moves on to rank r + 1, which sees src next (its owner after the last)
                if travelling is not None:
                    dk, dv = dk + travelling[0], dv + travelling[1]
                dk_in, dv_in = torch.empty_like(dk), torch.empty_like(dv)
                comm.exchange(group, [(dk, nxt), (dv, nxt)], [(dk_in, prv), (dv_in, prv)])
                travelling = (dk_in, dv_in)
            if step < n - 1:
                if ctx.keep_kv:
                    k_cur, v_cur = kept[2 * step], kept[2 * step + 1]
                else:
                    pending.wait()
                    k_cur, v_cur = k_nxt, v_nxt
        if travelling is not None:  # everyone else's part of this rank's dK/dV
            dk_own, dv_own = dk_own + travelling[0], dv_own + travelling[1]
        return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), None, None, None, None


class RingAttention(nn.Module):
    """Ring attention on [B, L_chunk, heads, d]; `kernel` picks the chunk kernel ('auto': fused for the device).
    keep_kv=True keeps the other ranks' K/V chunks from the forward for the backward instead of rotating them
    again: the minimum traffic, for 2(cp - 1) chunks held per attention until its backward (measured against the
    default in docs/benchmarks.md, "Ring attention memory"; the layouts use the default)."""

    def __init__(self, group: CommGroup, kernel: str = "auto", keep_kv: bool = False):
        super().__init__()
        self.group, self.kernel, self.keep_kv = group, kernel, keep_kv

    def forward(self, q, k, v, real_keys=None):
        q, k = q.to(v.dtype), k.to(v.dtype)
        # the merge accumulates in fp32 on purpose: autocast must not turn its arithmetic into bf16
        with torch.autocast(device_type=v.device.type, enabled=False):
            out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), real_keys,
                                       self.group, self.kernel, self.keep_kv)
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

    def forward(self, q, k, v, real_keys=None):
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
        o = self.core(x[0], x[1], x[2], real_keys)  # [B, L, H/cp, d]
        o = o.unflatten(1, (n, chunk)).permute(1, 0, 2, 3, 4)  # [cp (token chunk), B, Lc, H/cp, d]
        o = _AllToAll.apply(o.contiguous(), self.group)  # [cp (head group), B, Lc, H/cp, d]
        return o.permute(1, 2, 0, 3, 4).flatten(2, 3)


# ---- local cores ----------------------------------------------------------------------------------------------------
class FlashAttention(nn.Module):
    """flash-attn's kernel for bf16/fp16 CUDA attention; anything else falls back to torch SDPA."""

    def __init__(self):
        super().__init__()
        from flash_attn import flash_attn_func  # raises ImportError where flash-attn is absent

        self._flash = flash_attn_func
        self._fallback = SDPAttention()

    def forward(self, q, k, v, real_keys=None):
        if not (v.is_cuda and v.dtype in (torch.float16, torch.bfloat16)):
            return self._fallback(q, k, v, real_keys)
        k, v = real_key_slice(k, real_keys), real_key_slice(v, real_keys)
        return self._flash(q.to(v.dtype), k.to(v.dtype), v)  # [B, L, heads, d] in and out (flash_attn_func)


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
