# Everything runs from .venv in the repo root; `make test` and `make demo` install it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install test demo smoke bench bench-quality clean

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

# The quality table (teacher, DMD2-v, TMD on the synthetic task, 3 seeds): under an hour on 2 CPU cores.
bench-quality: install
	$(PY) -m tmd_megatron.bench.quality

clean:
	rm -rf $(VENV) .pytest_cache
