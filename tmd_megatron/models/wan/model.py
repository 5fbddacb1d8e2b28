"""The Wan DiT (WAN_SPEC §2) of every Wan2.1 / Wan2.2 variant (docs/wan_family.md), single-device readable.

Besides `forward`, the pieces are public so the TMD student and pipeline stages can run parts of the
network: `embed_tokens`, `embed_time` (timesteps per sample [B] or per token [B, L]), `embed_context` (text,
and CLIP image tokens for Wan2.1 I2V), `run_blocks` (a contiguous block range, optionally returning chosen
hidden states) and `head_out`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import checkpoint as wan_checkpoint
from . import saving
from .block import WanBlock, fp32_region, modulation_chunks
from .config import IMAGE_NORM_EPS, WanConfig
from .layers import FP32LayerNorm, get_backend
from .layout import LocalLayout
from .rope import grid_positions, rope_angles, rope_cos_sin


def timestep_sinusoid(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin] embedding of Wan timesteps (units of 1000·t), computed in float64 like the original."""
    half = dim // 2
    t64 = t_B.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t_B.device) / half)
    angles = torch.outer(t64, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


@dataclass
class TokenGeometry:
    """Where the tokens of one forward sit: latent grid after patching and what attention sees."""

    grid: tuple[int, int, int]  # (F', H', W')
    num_tokens: int  # F'·H'·W' (global)
    rope_cos: torch.Tensor  # [L_att, d/2]
    rope_sin: torch.Tensor
    real_keys: int | None  # keys [0, real_keys) of the padded sequence are tokens; None: all


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_volume)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x_B_L_D, e):
        # The head uses e (before SiLU; [B, D] or per token [B, L, D]), shift first, all in fp32 like the original.
        with fp32_region(x_B_L_D.device):
            shift, scale = modulation_chunks(self.modulation, e.unsqueeze(-2))
            return self.head(self.norm(x_B_L_D).float() * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width (wan/modules/model.py MLPProj: LayerNorm, Linear, exact GELU, Linear,
    LayerNorm; the norms in fp32 like diffusers' WanImageEmbedding)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        i = cfg.image_dim
        self.proj = nn.Sequential(FP32LayerNorm(i, eps=IMAGE_NORM_EPS), nn.Linear(i, i), nn.GELU(), nn.Linear(i, cfg.dim),
                                  FP32LayerNorm(cfg.dim, eps=IMAGE_NORM_EPS))

    def forward(self, image_B_N_C: torch.Tensor) -> torch.Tensor:
        return self.proj(image_B_N_C)


class WanModel(nn.Module):
    def __init__(self, config: WanConfig, backend="torch"):
        super().__init__()
        self.config = cfg = config
        self.backend = layers = get_backend(backend)
        self.layout = LocalLayout()
        self.activation_checkpointing = False
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        if cfg.image_dim is not None:
            self.img_emb = ImageEmbedding(cfg)
        self.blocks = nn.ModuleList(WanBlock(cfg, layers) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)

    # ---- embeddings -------------------------------------------------------------------------------------
    def patchify(self, x_B_C_F_H_W: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch embedding of a latent: all tokens [B, L, D] (frame-major) and the post-patch grid."""
        cfg = self.config
        if x_B_C_F_H_W.ndim != 5 or x_B_C_F_H_W.shape[1] != cfg.in_dim:
            raise ValueError(f"expected a latent [B, {cfg.in_dim}, F, H, W], got shape {tuple(x_B_C_F_H_W.shape)}")
        bad = [n for n, p in zip(x_B_C_F_H_W.shape[2:], cfg.patch_size) if n % p]
        if bad:
            raise ValueError(
                f"latent size {tuple(x_B_C_F_H_W.shape[2:])} is not divisible by patch_size {cfg.patch_size}"
            )
        tokens = self.patch_embedding(x_B_C_F_H_W)
        grid = tuple(tokens.shape[2:])
        # Contiguous tokens: a transposed view would make every residual add keep the channel-major layout and
        # every layer norm copy it (5 % of a CPU forward, docs/benchmarks.md).
        return tokens.flatten(2).transpose(1, 2).contiguous(), grid

    def geometry(self, grid: tuple[int, int, int], device) -> TokenGeometry:
        num_tokens = math.prod(grid)
        att = self.layout.attention_tokens(num_tokens, device)
        pos = grid_positions(grid, device)[att.index]
        angles = rope_angles(pos, self.config.rope_split, self.config.rope_theta, self.config.rope_max_positions)
        cos, sin = rope_cos_sin(angles, torch.float32)
        return TokenGeometry(grid, num_tokens, cos, sin, att.real_keys)

    def embed_tokens(self, x_B_C_F_H_W: torch.Tensor) -> tuple[torch.Tensor, TokenGeometry]:
        """This process's share of the patch tokens [B, L_local, D] and their geometry."""
        tokens, grid = self.patchify(x_B_C_F_H_W)
        return self.layout.split(tokens), self.geometry(grid, tokens.device)

    def embed_time(self, timestep: torch.Tensor, embedding: nn.Module | None = None):
        """(e, e0) from timesteps in Wan units [0, 1000]; fp32 as the original.

        timestep [B] (per sample): e [B, D], e0 [B, 6, D]. timestep [B, L] (per token, Wan2.2; L = all video
        tokens in the frame-major order): the layout keeps this rank's tokens first, e [B, L_local, D],
        e0 [B, L_local, 6, D].
        """
        embedding = self.time_embedding if embedding is None else embedding
        ref = embedding[0].weight
        if timestep.ndim == 2:
            timestep = self.layout.split(timestep.unsqueeze(-1)).squeeze(-1)
        elif timestep.ndim != 1:
            raise ValueError(f"timestep must be [B] or per token [B, L], got shape {tuple(timestep.shape)}")
        with fp32_region(ref.device):
            sinus = timestep_sinusoid(timestep.flatten(), self.config.freq_dim).unflatten(0, timestep.shape)
            e = embedding(sinus.to(torch.promote_types(torch.float32, ref.dtype)))
            e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def embed_context(self, context_B_T_C: torch.Tensor, image_B_N_C: torch.Tensor | None = None) -> torch.Tensor:
        """What the cross-attention reads: the embedded text, after the embedded CLIP image tokens when the model
        has an image branch (Wan2.1 I2V concatenates [image, text] the same way)."""
        text = self.embed_text(context_B_T_C)
        cfg = self.config
        if cfg.image_dim is None:
            if image_B_N_C is not None:
                raise ValueError("this Wan model has no image branch (image_dim is None): pass image_context=None")
            return text
        want = (text.shape[0], cfg.image_len, cfg.image_dim)
        if image_B_N_C is None or tuple(image_B_N_C.shape) != want:
            got = None if image_B_N_C is None else tuple(image_B_N_C.shape)
            raise ValueError(f"this I2V model needs image_context (CLIP image tokens) of shape {want}, got {got}")
        return torch.cat([self.img_emb(image_B_N_C).to(text.dtype), text], dim=1)

    def embed_text(self, context_B_T_C: torch.Tensor) -> torch.Tensor:
        """Text MLP over the zero-padded context; shorter inputs are padded to text_len like Wan, never masked."""
        cfg = self.config
        if context_B_T_C.ndim != 3 or context_B_T_C.shape[-1] != cfg.text_dim:
            raise ValueError(f"expected context [B, T, {cfg.text_dim}], got shape {tuple(context_B_T_C.shape)}")
        n = context_B_T_C.shape[1]
        if n > cfg.text_len:
            raise ValueError(f"context has {n} tokens, more than text_len={cfg.text_len}; trim it to {cfg.text_len}")
        if n < cfg.text_len:
            context_B_T_C = F.pad(context_B_T_C, (0, 0, 0, cfg.text_len - n))
        return self.text_embedding(context_B_T_C)

    # ---- trunk --------------------------------------------------------------------------------------------
    def run_blocks(
        self,
        tokens: torch.Tensor,
        context: torch.Tensor,
        e0: torch.Tensor,
        geom: TokenGeometry,
        start: int = 0,
        end: int | None = None,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks[start:end]; return the tokens and {i: output of block i} for i in capture."""
        end = self.config.num_layers if end is None else end
        if not 0 <= start <= end <= len(self.blocks):
            raise ValueError(f"block range [{start}, {end}) is outside the model's {len(self.blocks)} blocks")
        hidden = {}
        for i in range(start, end):
            args = (tokens, context, e0, geom.rope_cos, geom.rope_sin, geom.real_keys)
            if self.activation_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(self.blocks[i], *args, use_reentrant=False)
            else:
                tokens = self.blocks[i](*args)
            if i in capture:
                hidden[i] = tokens
        return tokens, hidden

    def head_out(self, tokens: torch.Tensor, e: torch.Tensor, geom: TokenGeometry) -> torch.Tensor:
        """Output head and unpatchify: the velocity [B, C_out, F, H, W] (fp32)."""
        y = self.layout.merge(self.head(tokens, e), geom.num_tokens)
        return self.unpatchify(y, geom.grid)

    def unpatchify(self, y_B_L_P: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        p_t, p_h, p_w = self.config.patch_size
        f, h, w = grid
        b = y_B_L_P.shape[0]
        y = y_B_L_P.reshape(b, f, h, w, p_t, p_h, p_w, self.config.out_dim)
        return y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * p_t, h * p_h, w * p_w)

    def tokens_to_grid(self, tokens: torch.Tensor, geom: TokenGeometry) -> torch.Tensor:
        """Hidden tokens as a feature volume [B, D, F', H', W'] (the discriminator's input)."""
        full = self.layout.merge(tokens, geom.num_tokens)
        return full.transpose(1, 2).unflatten(2, geom.grid)

    def forward(
        self,
        x_B_C_F_H_W: torch.Tensor,
        timestep: torch.Tensor,
        context_B_T_C: torch.Tensor,
        image_context: torch.Tensor | None = None,
        return_hidden: tuple[int, ...] = (),
    ):
        """Velocity prediction [B, out_dim, F, H, W]; with return_hidden, also {block: hidden tokens [B, L_local, D]}.

        x: the model input (I2V: [x_t, mask, conditioning latent] along channels); timestep: Wan units, [B] or
        per token [B, L]; image_context: CLIP image tokens [B, image_len, image_dim] (Wan2.1 I2V only).
        """
        if timestep.shape[0] != x_B_C_F_H_W.shape[0] or context_B_T_C.shape[0] != x_B_C_F_H_W.shape[0]:
            raise ValueError(
                f"batch sizes differ: x {x_B_C_F_H_W.shape[0]}, timestep {timestep.shape[0]}, "
                f"context {context_B_T_C.shape[0]}"
            )
        tokens, geom = self.embed_tokens(x_B_C_F_H_W)
        if timestep.ndim == 2 and timestep.shape[1] != geom.num_tokens:
            raise ValueError(f"per-token timesteps [B, L] need L = {geom.num_tokens} (the latent's tokens), "
                             f"got {timestep.shape[1]}")
        e, e0 = self.embed_time(timestep)
        context = self.embed_context(context_B_T_C, image_context)
        tokens, hidden = self.run_blocks(tokens, context, e0, geom, capture=tuple(return_hidden))
        out = self.head_out(tokens, e, geom)
        return (out, hidden) if return_hidden else out

    # ---- construction helpers -------------------------------------------------------------------------------
    def compile_blocks(self) -> None:
        """Regional torch.compile: each block is compiled on its own (every block runs the same code, so they
        share one compiled graph; a whole-model compile would trace the pipeline stage's variable block range,
        checkpointing and the layout's collectives). Absent blocks (other pipeline stages) stay as they are."""
        from tmd_megatron.parallel.comm import keep_eager

        keep_eager()  # the layout's collectives run eagerly between the compiled pieces
        for block in self.blocks:
            if isinstance(block, WanBlock):
                block.compile()

    def init_weights(self) -> None:
        """The original WanModel.init_weights scheme (for training from scratch)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "WanModel":
        """A Wan DiT from a checkpoint directory in either key format (variant detected from config and tensors).
        A two-expert (A14B) directory needs expert='high' or 'low'; WanExperts.from_pretrained loads both."""
        return wan_checkpoint.load_wan(cls, path, **kwargs)

    def save_pretrained(self, path, format: str = "original", **kwargs) -> None:
        saving.save_wan(self, path, format=format, **kwargs)
