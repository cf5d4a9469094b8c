# The two commands of the README's Quick start. Both set up what they need into .venv first, once:
# a stamp file per step remembers what is installed, so a second run installs nothing.
#
#   make demo    torch + sd35, then one image from the built-in demo model (demo.png, never overwritten)
#   make test    + the test references (diffusers, transformers, k-diffusion, ...) and clients (webuiapi,
#                openai, Playwright with the system's Chromium), Ray Serve and PostgreSQL (the system's),
#                then ruff, the suite, and the Ray tests in their own step with a time limit
#
# TORCH picks the torch build: the default is the CPU/CUDA wheel pip finds for torch==2.13.0; for another
# build, e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# k-diffusion (a test-only reference for the samplers) without its dependency list, which pulls torchvision
# and wandb; what its sampling module needs is in the project's [test] extra.
KDIFFUSION := k-diffusion==0.1.1.post1
# transformers 4.46's slow (pure Python) CLIPTokenizer, the official reference's, which transformers 5 no longer
# has: installed apart (--target), only for tests/conditioning/slow_clip_reference.py, which runs it in a
# subprocess with this folder first on PYTHONPATH.
SLOW_CLIP_REF := transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5
DEMO_PROMPT := a green square at the bottom right on a yellow background

# the Ray tests (a local Ray cluster, replicas killed and restarted) run on their own, bounded
RAY_TEST_LIMIT_S ?= 600

.PHONY: demo test chromium postgresql cxx clean-venv

demo: $(VENV)/.sd35
	$(BIN)/sd35 generate --prompt "$(DEMO_PROMPT)" --seed 1 -o demo.png

test: $(VENV)/.sd35-test chromium postgresql cxx
	$(BIN)/ruff check . && $(BIN)/python -m pytest -m "not ray"
	timeout $(RAY_TEST_LIMIT_S) $(BIN)/python -m pytest -m ray

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "sd35 needs Python 3.10 or newer; run make PYTHON=python3.11 (or another)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.sd35: pyproject.toml | $(BIN)/python
	$(PIP) $(TORCH)
	$(PIP) -e .
	@touch $@

$(VENV)/.sd35-test: pyproject.toml $(VENV)/.sd35
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(KDIFFUSION)
	$(PIP) --no-deps --upgrade --target $(VENV)/ref/transformers4 $(SLOW_CLIP_REF)
	@touch $@

# the web page's tests drive the system's Chromium (Debian's package; Playwright's browser download is not used)
chromium:
	@if [ -z "$$SD35_CHROMIUM" ] && ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq chromium; \
		else \
			echo "the web page's tests need Chromium: sudo apt-get install chromium (or set SD35_CHROMIUM)"; exit 1; \
		fi; \
	fi

# the job store's tests start a throwaway PostgreSQL server (Debian's package: initdb, pg_ctl)
postgresql:
	@if [ -z "$$SD35_PG_BIN" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq postgresql; \
		else \
			echo "the job store's tests need PostgreSQL: sudo apt-get install postgresql (or set SD35_PG_BIN to its bin folder)"; exit 1; \
		fi; \
	fi

# --compile on the CPU (and its test) runs torch inductor's C++ backend, which calls the system's C++ compiler
cxx:
	@if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq g++; \
		else \
			echo "--compile on the CPU and its test need a C++ compiler: sudo apt-get install g++"; exit 1; \
		fi; \
	fi

clean-venv:
	rm -rf $(VENV)
