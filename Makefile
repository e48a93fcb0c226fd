# `make run`: set up .venv and train the bundled model with mHC on CPU.  `make test`: set up and test.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,models]'
	$(PY) -m pip install --quiet --no-deps 'litgpt==0.5.13' 'psutil>=5.9'
	touch $@

run: setup
	$(PY) -m lightning_mhc.cli fit --config examples/configs/tiny_moe_mhc.yaml

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra
