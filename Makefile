# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := data/sample
DEMO_DIR := runs/demo

# Tests run in 2 processes, each test file whole in one (its module fixtures train once): about
# half the wall time of one process on 2 cores, since graph builds and exports use one core.
# Each process peaks near 4 GB; raise TEST_WORKERS only with the memory for it.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# Re-installs only when the declared or pinned dependencies change.
$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

$(SAMPLE)/.complete: estimator_ft/sample_data.py | install
	$(PY) -m estimator_ft.sample_data --output_dir=$(SAMPLE)

demo: install $(SAMPLE)/.complete
	$(VENV)/bin/estimator-ft train --flagfile=data/demo.flags --model_dir=$(DEMO_DIR)

test: install
	$(PYTEST) tests

# Everything but the end-to-end runs marked slow.
test-fast: install
	$(PYTEST) -m "not slow" tests

bench: install $(SAMPLE)/.complete
	$(VENV)/bin/estimator-ft bench --quick --output=runs/bench.json

clean:
	rm -rf runs $(SAMPLE)
