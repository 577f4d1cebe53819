# groundloop: `make run` starts the server with the demo page, `make test` runs the suite.
# Both do all set-up on a fresh machine (virtualenv, package, sandbox image).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= $(or $(GROUNDLOOP_SANDBOX_IMAGE),groundloop-sandbox:latest)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install venv image run test bench bench-smoke lint docker-up clean

venv: $(BIN)/groundloop

$(BIN)/groundloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Start a Docker engine when none answers (this machine has none running by default).
docker-up:
	@docker info >/dev/null 2>&1 || ./deploy/docker-up.sh

image: venv docker-up
	$(BIN)/python -c "from groundloop.sandbox import image; import sys; print('built' if image.ensure('$(IMAGE)') else 'current', '$(IMAGE)')"

install: venv image

run: install
	$(BIN)/groundloop serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: install
	$(BIN)/python -m bench --smoke

# mypy reads its configuration from pyproject.toml; it checks the folders under their installed names
# (groundloop.*), linked under build/typecheck/ (the editable install's import hook is opaque to it).
lint: venv
	$(BIN)/ruff check server sessions sandbox tests bench
	$(BIN)/ruff format --check server sessions sandbox tests bench
	@mkdir -p build/typecheck/groundloop
	@for d in server sessions sandbox; do ln -sfn ../../../$$d build/typecheck/groundloop/$$d; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
