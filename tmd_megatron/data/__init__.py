"""Datasets for distillation: shard format, loaders (DALI and torch), preprocessing, teacher data, synthetic task."""
from .format import ShardError, ShardWriter, build_index, open_shard
from .loader import make_loader
from .stream import LoaderPosition
from .synthetic import ATTRIBUTES, SyntheticTask
from .text import PromptEncoder, clean_prompt, pad_context

__all__ = ["ATTRIBUTES", "LoaderPosition", "PromptEncoder", "ShardError", "ShardWriter", "SyntheticTask",
           "build_index", "clean_prompt", "make_loader", "open_shard", "pad_context"]
