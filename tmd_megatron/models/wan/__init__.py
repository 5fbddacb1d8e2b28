from .config import EXPERT_BOUNDARY, PRESETS, WanConfig, parameter_count
from .experts import WanExperts
from .model import TokenGeometry, WanModel, timestep_sinusoid

__all__ = ["EXPERT_BOUNDARY", "PRESETS", "TokenGeometry", "WanConfig", "WanExperts", "WanModel", "parameter_count",
           "timestep_sinusoid"]
