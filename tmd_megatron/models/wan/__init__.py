from .config import PRESETS, WanConfig
from .model import TokenGeometry, WanModel, timestep_sinusoid

__all__ = ["PRESETS", "TokenGeometry", "WanConfig", "WanModel", "timestep_sinusoid"]
