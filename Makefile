# Everything runs from .venv in the repo root; `make test` and `make demo` install it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install test demo smoke clean

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

clean:
	rm -rf $(VENV) .pytest_cache
