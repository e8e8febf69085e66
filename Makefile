# Two entry points: `make demo` (the main job on built-in defaults) and `make test`.
# Both create or reuse the project virtual environment in .venv.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

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

clean:
	rm -rf $(VENV) playground/checkpoints
