# ldm_tune developer targets. `make test` and `make demo` create .venv and install everything by themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install quality style test demo demo-quick bench bench-quick compare train-tiny clean

# torch first: `torch==2.13.0` resolves to the local CPU wheel here; a bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

install: $(STAMP)

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# HF_HUB_OFFLINE=1: an accidental hub download fails loudly instead of hanging on this offline machine.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The embedded default: data -> VAE -> UNet -> new-concept fine-tune -> evaluation, into outputs/demo/ (report.md).
# Interrupted, a second `make demo` resumes.
demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ldm-tune demo --out $(DEMO_DIR)

demo-quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ldm-tune demo --quick --out outputs/demo-quick

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_inference.py --out outputs/bench/inference.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_training.py --out outputs/bench/training.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_training.py --preset sd15-arch --steps 6 --warmup 2 --repeats 1 \
		--batch-size 1 --out outputs/bench/training-sd15.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_data.py --out outputs/bench/data.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_lora.py --out outputs/bench/lora.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_ema.py --out outputs/bench/ema.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_corpus.py --out outputs/bench/corpus.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_fuzz.py --cases 10000 --out outputs/bench/fuzz.json

# The same tables in a few minutes (tiny preset only, fewer samplers, steps, repeats and levers): for a first look.
bench-quick: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_inference.py --quick --out outputs/bench/inference-quick.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_training.py --steps 20 --warmup 5 --repeats 1 --configs reference ours \
		--out outputs/bench/training-quick.json
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_lora.py --presets tiny --out outputs/bench/lora-quick.json

# Pixel-space DDPM against the LDM on the demo's shapes world: same trainer, same training time (compare.md/.json/.png).
compare: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ldm-tune compare-pixel --out outputs/compare

# configs/tiny.yaml end to end on the CPU: builds the tiny model and the shapes data when missing.
train-tiny: install
	test -d outputs/models/tiny || $(VENV)/bin/ldm-tune init-model --preset tiny --out outputs/models/tiny
	test -d outputs/data/shapes || $(VENV)/bin/ldm-tune make-dataset shapes --out outputs/data/shapes --n 1000
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu.yaml train.py \
		--config configs/tiny.yaml checkpointing.resume_from_checkpoint=latest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
