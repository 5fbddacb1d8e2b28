"""The image conditioning of a training batch for the recipe's model (docs/wan_family.md)."""
from __future__ import annotations

from tmd_megatron.models.wan.conditioning import ImageCondition

from .config import RecipeError, Resolved


def image_condition_of(res: Resolved, batch: dict):
    """The batch's image conditioning for the recipe's model: I2V from the shards' cond (and clip) members, TI2V
    from the first latent frame (unless data.image_condition=false), None for T2V."""
    cfg = res.wan
    if cfg.model_type == "t2v" or (cfg.model_type == "ti2v" and not res.raw.data.image_condition):
        return None
    if cfg.model_type == "ti2v":
        return ImageCondition.for_model(cfg, batch["latent"].float())
    missing = [k for k in ("cond",) + (("clip",) if cfg.image_dim is not None else ()) if k not in batch]
    if missing:
        raise RecipeError(f"an I2V model trains on shards with the first frame's conditioning latent and CLIP tokens, "
                          f"but the data lack {missing}: write them with tmd-preprocess videos --i2v "
                          "(--image-encoder <CLIP dir> for Wan2.1)")
    clip = batch["clip"].float() if cfg.image_dim is not None else None
    return ImageCondition.for_model(cfg, batch["cond"].float(), clip)
