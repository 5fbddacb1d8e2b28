"""Image conditioning of a video batch: what a Wan I2V / TI2V model sees besides the noisy latent.

Two modes, chosen by the model (docs/wan_family.md):
- "concat" (Wan2.1 I2V-14B, Wan2.2 I2V-A14B; config.model_type "i2v"): the model input is [x_t, mask,
  latent] along channels (Wan2.1 wan/image2video.py: `y = concat([msk, vae.encode([img, zeros])])`, model
  `x = cat([x, y])`). `latent` is the VAE latent of the first frame followed by zero frames, the mask is 1 on
  the first latent frame's 4 channels. Wan2.1 also passes CLIP tokens of the image (`image`). Every frame is
  generated (frame 0 too); CFG drops the text only.
- "first_frame" (Wan2.2 TI2V-5B, model_type "ti2v"): `latent` is the clean first latent frame; it replaces x_t's
  first frame, whose tokens get timestep 0 (wan/textimage2video.py: `latent = (1 - mask) * z + mask * latent`,
  `temp_ts = (mask[0][:, ::2, ::2] * t).flatten()`), and the frame stays fixed along the whole flow. We make the
  frame a fixed point of every flow in training as in sampling: noise drawn for a conditioned batch is pinned to
  the clean value there (`pin`), so x_t, the flow-matching velocity and every target equal the known value or 0
  there, and the model's prediction for those tokens is replaced by 0 (`output`), as Wan2.2 replaces the frame.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import I2V_MASK_CHANNELS, WanConfig

MODES = {"i2v": "concat", "ti2v": "first_frame"}


@dataclass
class ImageCondition:
    mode: str  # "concat" | "first_frame"
    latent: torch.Tensor  # concat: [B, C, F, H, W]; first_frame: [B, C, 1, H, W]
    image: torch.Tensor | None = None  # CLIP tokens [B, N, C_img] (Wan2.1 I2V)

    def __post_init__(self):
        if self.mode not in MODES.values():
            raise ValueError(f"image conditioning mode {self.mode!r}; choose one of {sorted(MODES.values())}")
        if self.latent.ndim != 5 or (self.mode == "first_frame" and self.latent.shape[2] != 1):
            raise ValueError(f"{self.mode} conditioning latent of shape {tuple(self.latent.shape)}: expected "
                             f"[B, C, {'1' if self.mode == 'first_frame' else 'F'}, H, W]")

    @classmethod
    def for_model(cls, cfg: WanConfig, latent: torch.Tensor, image: torch.Tensor | None = None) -> "ImageCondition":
        """The conditioning a model of `cfg` takes; latent as above (first_frame also accepts a full clean latent,
        whose first frame it keeps)."""
        if cfg.model_type not in MODES:
            raise ValueError(f"a {cfg.model_type} model takes no image conditioning; use an i2v or ti2v model")
        mode = MODES[cfg.model_type]
        if mode == "first_frame":
            latent = latent[:, :, :1]
        if (cfg.image_dim is None) != (image is None):
            raise ValueError(f"this model {'needs' if cfg.image_dim else 'takes no'} CLIP image tokens")
        return cls(mode, latent, image)

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    # ---- model inputs and outputs -------------------------------------------------------------------------------
    def model_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """What the DiT's patch embedding reads for the noisy latent x_t."""
        latent = self.latent.to(device=x_t.device, dtype=x_t.dtype)
        if self.mode == "concat":
            mask = torch.zeros_like(x_t[:, :I2V_MASK_CHANNELS])
            mask[:, :, 0] = 1
            return torch.cat([x_t, mask, latent], dim=1)
        return torch.cat([latent, x_t[:, :, 1:]], dim=2)

    def timesteps(self, t_wan: torch.Tensor, latent_shape, patch_size) -> torch.Tensor:
        """The model's timesteps for per-sample Wan timesteps t_wan [B]: [B], or [B, L] with the first frame's
        tokens at 0 (first_frame mode)."""
        if self.mode == "concat":
            return t_wan
        if patch_size[0] != 1:
            raise ValueError(f"first-frame conditioning needs a temporal patch of 1, got patch_size {patch_size}")
        f, h, w = (n // p for n, p in zip(latent_shape[-3:], patch_size))
        per_token = t_wan[:, None].repeat(1, f * h * w)
        per_token[:, : h * w] = 0
        return per_token

    def output(self, v: torch.Tensor) -> torch.Tensor:
        """A velocity-like prediction with the conditioning frame's entries replaced by 0 (first_frame mode)."""
        if self.mode == "concat":
            return v
        return torch.cat([torch.zeros_like(v[:, :, :1]), v[:, :, 1:]], dim=2)

    def pin(self, noise: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Noise whose conditioning frame equals the clean endpoint's (first_frame mode): that frame is then a fixed
        point of the interpolation (1 - t)·clean + t·noise and its velocity noise - clean is 0."""
        if self.mode == "concat":
            return noise
        return torch.cat([clean[:, :, :1].to(noise), noise[:, :, 1:]], dim=2)

    # ---- batch handling -------------------------------------------------------------------------------------
    def rows(self, index) -> "ImageCondition":
        """The samples `index` (a slice or index tensor) of the batch."""
        take = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        return replace(self, latent=take(self.latent), image=None if self.image is None else take(self.image))

    def to(self, device) -> "ImageCondition":
        return replace(self, latent=self.latent.to(device), image=None if self.image is None else self.image.to(device))

    def repeat(self, times: int) -> "ImageCondition":
        """The batch `times` over (e.g. for a [fake; real] batch)."""
        cat = lambda t: torch.cat([t] * times)  # noqa: E731
        return replace(self, latent=cat(self.latent), image=None if self.image is None else cat(self.image))


def model_call_inputs(cfg: WanConfig, x_t: torch.Tensor, t_wan: torch.Tensor, cond: ImageCondition | None):
    """(model input, timesteps, image tokens or None) for the noisy latent x_t at per-sample Wan timesteps."""
    if cond is None:
        if cfg.model_type == "i2v":
            raise ValueError("an i2v model needs its image conditioning (the first frame): pass cond=")
        return x_t, t_wan, None
    return cond.model_input(x_t), cond.timesteps(t_wan, x_t.shape, cfg.patch_size), cond.image
