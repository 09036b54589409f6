# cytoray: two commands matter — `make demo` (the main job on local synthetic data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cytoray-installed

.PHONY: install browser demo test lint bench clean

# torch 2.13.0 first: on CPU hosts that pin resolves to the local CPU build; anything else would pull
# several GB of CUDA wheels through the `torch` requirement of ray/kornia/etc.
# constraints-cpu.txt keeps the resolver from backtracking onto another torch while solving the rest.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) recipes/demo.py

# The report test opens report.html in a real headless Chromium (Debian's package; needs root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

test: $(STAMP) browser
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check cytoray recipes tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
