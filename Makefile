# fastalign: two commands, each complete on a fresh machine.
#   make demo   set up, then train the shipped tiny Llama with DPO on the shipped preference data
#               (progress, reward accuracy and margins, fused-vs-eager loss memory, plots)
#   make test   set up, then run the whole test suite
#   make bench  set up, then benchmark the fused op against its peers on this machine's shapes
#   make hopper-table  set up, then compile every Triton kernel for sm_90/sm_80 (no GPU needed)
#               and write its registers / spills / shared memory table to benchmarks/results/
#   make online-offline  set up, then train offline DPO, online DPO, GRPO, PPO and TRPO with equal
#               budgets on the shipped task and compare held-out judge reward and KL (CSV, PNG, table)
#   make gpu-check-dry-run  print the plan of benchmarks/gpu_check.sh (the GPU check) and its
#               estimated duration; needs no set-up and no GPU
#
# Set-up makes a virtual environment in .venv with the CPU build of torch (never the CUDA wheels),
# builds the C++ extension once against it (no pip build isolation, so torch is never downloaded
# into a build environment) and is skipped when nothing it depends on has changed.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastalign-installed
BENCH_OUT ?= benchmarks/results/latest
DEMO_OUT ?= fastalign-runs/demo-dpo
HOPPER_OUT ?= benchmarks/results
ONLINE_OFFLINE_OUT ?= benchmarks/results/online_offline
GPU_CHECK_OUT ?= /tmp/fastalign-gpu-check

.PHONY: setup demo test bench hopper-table online-offline gpu-check-dry-run lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q setuptools wheel pybind11 ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -c "import fastalign; print('fastalign', fastalign.__version__, 'ready:', fastalign.available_implementations('cpu'))"
	touch $(STAMP)

demo: setup
	$(BIN)/fastalign train dpo --output $(DEMO_OUT) --max-steps 40 --batch-size 8 --lr 5e-4 \
		--eval-steps 10 --seed 0 --memory-report --overwrite

bench: setup
	$(BIN)/fastalign bench --output $(BENCH_OUT)

hopper-table: setup
	env -u TRITON_INTERPRET $(BIN)/python -m fastalign.bench.hopper --out $(HOPPER_OUT)

online-offline: setup
	$(BIN)/python -m fastalign.bench.online_offline --out $(ONLINE_OFFLINE_OUT)

gpu-check-dry-run:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh $(GPU_CHECK_OUT) --dry-run

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q tests

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build *.egg-info fastalign/_C*.so $(STAMP)
