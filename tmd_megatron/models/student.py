"""The decoupled TMD student (paper Eq. 12–14, App. A.1, B.3, B.4) built from a Wan DiT.

    backbone(x_t, t, ctx)           = embeddings + blocks[0 : L−H]          -> BackboneFeatures (m, ...)
    flow_head(y_s, s, r, features)  = fusion + blocks[L−H : L] + output head -> head_θ(y_s, s, r; m)

Both are separate calls: the finite-difference JVP re-runs only the flow head on the same features, the
trainer places the flow head on the last pipeline stage. The Wan code is used through its public parts only.
Times are in [0, 1]; Wan's 1000·t units appear only here, at the model boundary.

Image conditioning (models/wan/conditioning.py) enters the backbone like the teacher's input; the flow head's
patch embedding reads y_s with the same mask and latent channels (I2V), and its output is 0 on a TI2V
conditioning frame, like every velocity there.

Decisions (docs/algorithms.md, "Ambiguities"), each with its alternative as a `StudentConfig` option:
- head_time="outer" (default): the flow-head blocks are modulated by emb(t) + E_s(s) + E_Δ(s−r) with E_s,
  E_Δ new zero-initialised time embeddings. App. A.1 literally re-uses Wan's embedding for s
  (head_time="inner": emb(s) + E_Δ(s−r)); then the fresh student runs the teacher's last H blocks at time s on
  features of time t and cannot equal the teacher, which the paper's own goal ("the student's initial forward
  pass matches that of the teacher") and our identity test require.
- Gated fusion closes by a zero-initialised output projection (adaLN-Zero), not by a saturated sigmoid: a
  sigmoid never reaches 0, and under Adam (steps ≈ lr) a gate logit of −10 would stay shut for the whole
  3k-iteration stage. fusion_zero_init=False with a negative gate_init gives the literal "random block, gate
  starts (nearly) closed" variant.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .wan import TokenGeometry, WanModel, timestep_sinusoid
from .wan.block import fp32_region, modulate, modulation_chunks
from .wan.conditioning import ImageCondition, model_call_inputs
from .wan.layers import FP32LayerNorm

FUSIONS = ("gated", "concat")
TARGETS = ("dtm", "x")
HEAD_TIMES = ("outer", "inner")


@dataclass(frozen=True)
class StudentConfig:
    flow_head_blocks: int = 5  # H (paper: 5 for both sizes)
    fusion: str = "gated"  # "gated" (App. A.1, paper default) | "concat" (App. B.3)
    target: str = "dtm"  # "dtm": y = x_1 − x (Eq. 3, default) | "x": y = x (App. B.4)
    head_time: str = "outer"  # see module docstring
    fusion_zero_init: bool = True  # gated: zero output projection, so the fresh student is the teacher
    gate_init: float = 0.0  # logit of the global sigmoid gate (gate = 0.5 at init)
    concat_noise_std: float = 0.01  # App. B.3: std of the y_s half of the concat projection
    flow_map_sign: int = -1  # Eq. 13 read as y_r = y_s − (s − r)·u; +1 is the printed sign

    def __post_init__(self):
        for name, allowed in (("fusion", FUSIONS), ("target", TARGETS), ("head_time", HEAD_TIMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"StudentConfig.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.flow_map_sign not in (-1, 1):
            raise ValueError(f"flow_map_sign={self.flow_map_sign} must be -1 or +1")
        if self.flow_head_blocks < 1:
            raise ValueError(f"flow_head_blocks={self.flow_head_blocks} must be >= 1")


@dataclass
class BackboneFeatures:
    """What the flow head needs from one backbone pass."""

    m: torch.Tensor  # main feature tokens after block L−H−1 [B, L_local, D]
    context: torch.Tensor  # embedded text [B, text_len, D]
    geom: TokenGeometry
    e_t: torch.Tensor  # time embedding of t [B, D] (fp32)
    x_t: torch.Tensor  # the backbone input (the x-target parametrisation, App. B.4, needs it)
    t: torch.Tensor  # [B] in [0, 1]
    cond: ImageCondition | None = None

    def at_least_fp32(self) -> "BackboneFeatures":
        """The features with bf16/fp16 tensors (the embedded text under autocast) widened to fp32, for flow-head
        passes run with autocast off (the finite-difference JVP's, TMMFConfig.fd_dtype)."""
        def wide(x):
            return x.float() if torch.is_tensor(x) and x.dtype in (torch.bfloat16, torch.float16) else x

        return dataclasses.replace(self, m=wide(self.m), context=wide(self.context), x_t=wide(self.x_t))


def time_embedding_like(wan: WanModel, zero_output: bool) -> nn.Sequential:
    """A new time embedding with Wan's shape (Linear(freq, D), SiLU, Linear(D, D))."""
    cfg = wan.config
    emb = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
    if zero_output:
        nn.init.zeros_(emb[2].weight)
        nn.init.zeros_(emb[2].bias)
    return emb


class GatedFusion(nn.Module):
    """App. A.1: AdaLN-style block on the patch-embedded y_s, gated into the main feature m.

    z = m + σ(α) · g ⊙ FFN(LN(p)·(1 + scale) + shift), (shift, scale, g) = modulation + e0[:, 3:6]

    i.e. the interpolation m + σ(α)(h − m) towards the block output h = m + g ⊙ FFN(...). The block re-uses the
    flow head's global shift/scale/gate (the FFN triple of e0, the shared time projection of its time
    embedding) plus its own learnable offset, like a Wan block.
    """

    def __init__(self, wan: WanModel, zero_init: bool, gate_init: float):
        super().__init__()
        cfg, layers = wan.config, wan.backend
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.modulation = nn.Parameter(torch.randn(1, 3, cfg.dim) / cfg.dim**0.5)
        self.ffn = nn.Sequential(
            layers.linear_in(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), layers.linear_out(cfg.ffn_dim, cfg.dim)
        )
        self.gate_logit = nn.Parameter(torch.tensor(float(gate_init)))
        if zero_init:
            nn.init.zeros_(self.ffn[2].weight)
            nn.init.zeros_(self.ffn[2].bias)

    def forward(self, m: torch.Tensor, p: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        with fp32_region(m.device):
            shift, scale, gate = modulation_chunks(self.modulation, e0[..., 3:6, :])
        h = self.ffn(modulate(self.norm(p), shift, scale)) * gate
        return m + torch.sigmoid(self.gate_logit) * h


class ConcatFusion(nn.Module):
    """App. B.3: z = W [m; p] + b with W = [I | N(0, std²)], b = 0 (close to, not exactly, the identity)."""

    def __init__(self, wan: WanModel, noise_std: float):
        super().__init__()
        dim = wan.config.dim
        self.proj = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :dim].copy_(torch.eye(dim))
            self.proj.weight[:, dim:].normal_(0.0, noise_std)
            self.proj.bias.zero_()

    def forward(self, m: torch.Tensor, p: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([m, p.to(m.dtype)], dim=-1))


class DecoupledStudent(nn.Module):
    """Wan DiT split into a main backbone and a recurrent flow head.

    Parameter names: the Wan model under `wan.` (original checkpoint keys), and the extras `fusion.*`,
    `delta_time_embedding.*` (E_Δ, embeds s − r) and, for head_time="outer", `inner_time_embedding.*` (E_s).
    """

    def __init__(self, wan: WanModel, config: StudentConfig = StudentConfig()):
        super().__init__()
        num_layers = wan.config.num_layers
        if config.flow_head_blocks >= num_layers:
            raise ValueError(
                f"flow_head_blocks={config.flow_head_blocks} leaves no backbone in a {num_layers}-block model; "
                f"use at most {num_layers - 1}"
            )
        self.config = config
        self.wan = wan
        self.split = num_layers - config.flow_head_blocks
        if config.fusion == "gated":
            self.fusion = GatedFusion(wan, config.fusion_zero_init, config.gate_init)
        else:
            self.fusion = ConcatFusion(wan, config.concat_noise_std)
        self.delta_time_embedding = time_embedding_like(wan, zero_output=True)
        self.head_patch_embedding = None  # set by the pipeline builder when the flow head is on another stage
        if config.head_time == "outer":
            self.inner_time_embedding = time_embedding_like(wan, zero_output=True)

    @classmethod
    def from_teacher(cls, teacher: WanModel, config: StudentConfig = StudentConfig()) -> "DecoupledStudent":
        """A trainable student initialised from (a deep copy of) the teacher; the teacher is not touched."""
        wan = copy.deepcopy(teacher)
        wan.requires_grad_(True)
        return cls(wan, config)

    @classmethod
    def from_pretrained(cls, path, config: StudentConfig = StudentConfig(), **load_kwargs) -> "DecoupledStudent":
        """A student initialised from a teacher checkpoint directory (either Wan key format)."""
        return cls(WanModel.from_pretrained(path, **load_kwargs), config)

    # ---- time embeddings ------------------------------------------------------------------------------------
    def _embed(self, t_B: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ref = module[0].weight
        with fp32_region(ref.device):
            sinus = timestep_sinusoid(1000.0 * t_B, self.wan.config.freq_dim)
            return module(sinus.to(torch.promote_types(torch.float32, ref.dtype)))

    def flow_head_time(self, s: torch.Tensor, r: torch.Tensor, e_t: torch.Tensor):
        """(e, e0) conditioning the flow head's fusion, blocks and output head (App. A.1); e_t = emb(t)."""
        per_token = (lambda v: v[:, None]) if e_t.ndim == 3 else (lambda v: v)  # e_t of per-token timesteps
        delta = per_token(self._embed(s - r, self.delta_time_embedding))
        if self.config.head_time == "outer":
            e = e_t + per_token(self._embed(s, self.inner_time_embedding)) + delta
        else:
            e = self._embed(s, self.wan.time_embedding) + delta
        with fp32_region(e.device):
            e0 = self.wan.time_projection(e).unflatten(-1, (6, self.wan.config.dim))
        return e, e0

    # ---- the two calls --------------------------------------------------------------------------------------
    def backbone(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 cond: ImageCondition | None = None) -> BackboneFeatures:
        """m_θ(x_t, t) (Eq. 12): embeddings and blocks[0 : L−H]; t ∈ [0, 1] as [B]."""
        wan = self.wan
        x_in, timestep, image = model_call_inputs(wan.config, x_t, 1000.0 * t, cond)
        tokens, geom = wan.embed_tokens(x_in)
        e, e0 = wan.embed_time(timestep)
        ctx = wan.embed_context(context, image)
        m, _ = wan.run_blocks(tokens, ctx, e0, geom, 0, self.split)
        return BackboneFeatures(m=m, context=ctx, geom=geom, e_t=e, x_t=x_t, t=t, cond=cond)

    def patch_tokens(self, y_s: torch.Tensor, cond: ImageCondition | None = None) -> torch.Tensor:
        """y_s through the shared patch embedding (App. A.1), sharded like the video tokens; an I2V model's
        embedding also reads the mask and conditioning latent, as for x_t.

        Under pipeline parallelism the flow head lives on the last stage and `head_patch_embedding` is a copy
        of the first stage's patch embedding whose gradients are summed with the original's (tied weights).
        """
        if cond is not None and cond.mode == "concat":
            y_s = cond.model_input(y_s)
        conv = self.head_patch_embedding if self.head_patch_embedding is not None else self.wan.patch_embedding
        return self.wan.layout.split(conv(y_s).flatten(2).transpose(1, 2).contiguous())  # as WanModel.embed

    def fuse(self, y_s: torch.Tensor, e0: torch.Tensor, features: BackboneFeatures) -> torch.Tensor:
        """Patch-embed y_s with the shared patch embedding (App. A.1) and fuse it into m."""
        return self.fusion(features.m, self.patch_tokens(y_s, features.cond), e0)

    def flow_head_given(self, y_s: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, features: BackboneFeatures):
        """The flow head for conditioning (e, e0) computed by `flow_head_time`: fusion, blocks, output head."""
        z = self.fuse(y_s, e0, features)
        z, _ = self.wan.run_blocks(z, features.context, e0, features.geom, self.split, self.wan.config.num_layers)
        out = self.wan.head_out(z, e, features.geom)
        return out if features.cond is None else features.cond.output(out)

    def flow_head(self, y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, features: BackboneFeatures) -> torch.Tensor:
        """head_θ(y_s, s, r; m) [B, C, F, H, W]: fusion, blocks[L−H : L] and the output head (fp32)."""
        e, e0 = self.flow_head_time(s, r, features.e_t)
        return self.flow_head_given(y_s, e, e0, features)

    def compile_blocks(self) -> None:
        """Regional torch.compile of the DiT blocks (backbone and flow head) and of the gated fusion block."""
        self.wan.compile_blocks()
        if isinstance(self.fusion, GatedFusion):
            self.fusion.compile()

    @property
    def layout(self):
        """The Wan model's token layout (data-parallel code reads it to know which gradients are TP-partial)."""
        return self.wan.layout

    def extra_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not n.startswith("wan.")]
