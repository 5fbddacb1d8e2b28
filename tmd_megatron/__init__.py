"""tmd_megatron: Transition Matching Distillation of Wan2.1 video DiTs with Megatron-style parallelism."""
__version__ = "0.1.0"
