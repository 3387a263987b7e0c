# Two commands set everything up on a fresh machine:
#   make quickstart   runs the main job end to end on the built-in digits data (no internet, no GPU)
#   make test         runs the test suite
# Both create .venv and install dscompress into it the first time.

VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines here have torch 2.14.1 / torchvision 0.29.1 on local disk; elsewhere pip picks a release.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: install quickstart test
install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/dscompress run recipes/quickstart.yaml -o runs/quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
