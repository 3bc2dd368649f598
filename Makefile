# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE := data/sample
DEMO_DIR := runs/demo

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# Re-installs only when the declared or pinned dependencies change.
$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

$(SAMPLE)/.complete: data/make_sample_data.py | install
	$(PY) data/make_sample_data.py --output_dir=$(SAMPLE)

demo: install $(SAMPLE)/.complete
	$(VENV)/bin/estimator-ft train --flagfile=data/demo.flags --model_dir=$(DEMO_DIR)

test: install
	$(PY) -m pytest tests

# Everything but the end-to-end runs marked slow.
test-fast: install
	$(PY) -m pytest -m "not slow" tests

bench: install $(SAMPLE)/.complete
	$(VENV)/bin/estimator-ft bench --quick --output=runs/bench.json

clean:
	rm -rf runs $(SAMPLE)
