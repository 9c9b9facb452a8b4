# The README's two commands: `make run` (the main job) and `make test` (the test suite).
# Both create or refresh .venv first. TORCH picks the torch build: the CPU wheel by default;
# GPU users run e.g. `make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
WORKDIR ?= work

.PHONY: venv run test test-fast lint bench clean browser

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: venv
	$(VENV)/bin/gptflow run --workdir $(WORKDIR)

test: venv browser
	$(PY) -m pytest -q --durations=20 tests

# The tests that need no Ray, no Ray Train fit, no cluster, no browser and no gptflow subprocess
# (tests/conftest.py marks the rest slow): a quick check while editing.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" --durations=10 tests

# The serving playground is tested in a real headless Chromium; Debian packages it with its driver.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null)

lint: venv
	$(VENV)/bin/ruff check gptcore flows tests bench

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
