# Everything runs from .venv in the repo root; `make test` and `make demo` install it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install test demo smoke bench bench-quality gpu-check gpu-wheels clean

install: $(STAMP)

$(STAMP): setup.py constraints/cpu.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints/cpu.txt torch==2.13.0
	$(PIP) install -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m tmd_megatron.demo

# launch/smoke_8gpu.sh on 8 gloo CPU processes (torchrun --standalone, no SLURM); on a GPU node run the
# script itself for NCCL + Transformer Engine.
smoke: install
	PATH="$(abspath $(VENV))/bin:$$PATH" TMD_DEVICE=cpu bash launch/smoke_8gpu.sh

# Performance ratios (docs/benchmarks.md, generated section): about 10 minutes on 2 CPU cores.
bench: install
	$(PY) -m tmd_megatron.bench.perf

# The quality table (teacher, DMD2-v, TMD on the synthetic task, 4 paired seeds, 7 arms; finished arms cached in
# runs/bench_quality/cache): 46 min measured on 2 cores, teacher included; then its figures (docs/figures).
# One ablation: $(PY) -m tmd_megatron.bench.quality --ablation NAME (docs/benchmarks.md, "Ablations").
bench-quality: install
	$(PY) -m tmd_megatron.bench.quality
	$(PY) -m tmd_megatron.bench.quality_figures

# On a GPU node, with the Python that holds CUDA torch (not the CPU venv): what only a GPU proves, in at most ten
# minutes; writes docs/gpu_check.md. Without CUDA it prints what it would run. Offline nodes: `make gpu-wheels`
# here, copy .whl/ over, then `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
# `PYTHONPATH=/tmp/site make gpu-check` there (docs/operations.md, "GPU check").
GPU_PYTHON ?= $(shell [ -x $(PY) ] && echo $(PY) || echo python3)  # the venv here; python3 in a CUDA image
gpu-check:
	NVIDIA_TF32_OVERRIDE=0 PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m tmd_megatron.bench.gpu_check

# The pure-Python dependencies a CUDA image with torch lacks, as Python 3.12 x86-64 wheels in .whl/ (9 MB).
GPU_WHEEL_PY ?= 3.12
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl -c constraints/cpu.txt \
		hydra-core omegaconf megatron-core diffusers
	python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) .pytest_cache
