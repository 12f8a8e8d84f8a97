# Set-up and the two everyday commands. Each target creates .venv/ (pinned stack) when missing
# or when pyproject.toml changed since it was built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: train test venv clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[tpu,test]'
	touch $@

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) -m her_jax.train $(ARGS)

# Two pytest workers: most tests are single-threaded XLA compiles (ARGS="-n 0" runs serially).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 $(ARGS)

clean-venv:
	rm -rf $(VENV)
