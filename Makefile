# Two commands from a fresh clone:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# Create the virtual environment and install the pinned requirements (once; again when they change).
$(STAMP): requirements.txt requirements-extras.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-extras.txt -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# Build the synthetic set, train on CPU, caption held-out images, score them, draw attention maps.
demo: $(STAMP)
	$(PY) demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs/demo
