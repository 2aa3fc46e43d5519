# The README's two commands are `make demo` and `make test`; each sets up
# everything it needs from a fresh clone (virtual environment included).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo demo-bundle test test-fast lint bench clean

setup: $(STAMP)

# torch first, from constraints.txt: its CPU wheel lies on disk here, and
# letting any other package choose torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ctfactory demo

# Rebuild the committed demo bundle from scratch on this CPU (phantoms ->
# report BERT -> VAE -> caches -> latent diffusion on the text -> the label
# token on the frozen text model -> ControlNet -> export); resumable.
# (`--controlnet-steps 0` leaves the ControlNet out.)
demo-bundle: $(STAMP)
	$(VENV)/bin/ctfactory train demo-bundle --out report2ct/bundles/demo --work runs/demo-build

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
