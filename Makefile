# Two entry points: `make demo` (the main job on built-in defaults) and `make test`.
# Both create or reuse the project virtual environment in .venv (the LLaVA stack, transformers 4.37.2).
# Qwen2.5-VL has its own environment, .venv-qwen (a newer transformers, requirements-qwen.txt):
# `make install-qwen` and `make test-qwen` (tests_qwen/).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean install-qwen test-qwen

QVENV  ?= .venv-qwen
QPY    := $(QVENV)/bin/python
QSTAMP := $(QVENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llava-torch==1.2.2.post1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m restore.demo
	bash scripts/demo_benchmarks.sh

bench: $(STAMP)
	$(PY) -m restore.bench --threads 1

test: $(STAMP)
	$(PY) -m pytest -q

# The Qwen2.5-VL environment: torch first and on its own (the pinned CPU/CUDA build, as for .venv), then
# requirements-qwen.txt. The project itself is not pip-installed there (its pyproject pins the LLaVA
# stack's transformers): it runs from the source tree on PYTHONPATH.
$(QSTAMP): requirements-qwen.txt
	test -x $(QPY) || $(PYTHON) -m venv $(QVENV)
	$(QPY) -m pip install -q --upgrade pip
	$(QPY) -m pip install -q "$(TORCH)"
	$(QPY) -m pip install -q -r requirements-qwen.txt
	touch $(QSTAMP)

install-qwen: $(QSTAMP)

test-qwen: $(QSTAMP)
	PYTHONPATH=$(CURDIR) $(QPY) -m pytest -q -p no:cacheprovider tests_qwen

clean:
	rm -rf $(VENV) $(QVENV) playground/checkpoints
