# groundloop: `make run` starts the server with the demo page, `make test` runs the suite.
# Both do all set-up on a fresh machine (virtualenv, package, sandbox image).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
IMAGE ?= $(or $(GROUNDLOOP_SANDBOX_IMAGE),groundloop-sandbox:latest)
# standard (numpy, pandas, matplotlib, scipy, pillow, IPython, pip, TypeScript, npm) or minimal.
PROFILE ?= standard
HOST ?= 127.0.0.1
PORT ?= 8000

SERVER_IMAGE ?= $(or $(GROUNDLOOP_SERVER_IMAGE),groundloop-server:test)
# The manifest checkers (tests/deploy/test_deploy.py) live in a virtualenv of their own:
# checkov pins dozens of packages that must not move the server's.
DEPLOY_VENV := .venv-deploy

.PHONY: install venv image server-image deploy-tools run test test-deps bench bench-smoke lint docker-up clean js

venv: $(BIN)/groundloop

$(BIN)/groundloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Start a Docker engine when none answers (this machine has none running by default); on a running
# one, only make sure runsc has its flags (--host-uds=open: the data channel), reloading it if they changed.
docker-up:
	@./deploy/docker-up.sh

# What the tests need beyond the package and Docker: Chromium, Prometheus, HAProxy.
test-deps:
	@./deploy/test-deps.sh

image: venv docker-up
	$(BIN)/python -c "from groundloop.sandbox import image; import sys; print('built' if image.ensure('$(IMAGE)', '$(PROFILE)') else 'current', '$(IMAGE)')"

install: venv image

deploy-tools: $(DEPLOY_VENV)/bin/checkov

$(DEPLOY_VENV)/bin/checkov:
	$(PY) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q kubernetes-validate checkov
	@touch $@

# The server image, built offline (deploy/server_image.py); tests/deploy/test_server_image.py runs it.
server-image: venv docker-up
	$(BIN)/python deploy/server_image.py --tag $(SERVER_IMAGE)

run: install
	$(BIN)/groundloop serve --host $(HOST) --port $(PORT)

# The TypeScript client's dev dependencies (tsc, ws) for tests/clients/test_js_client.py; without npm those tests skip.
# The page needs none of this: it serves the client's committed build (static/vendor/groundloop-client.js).
JS := clients/js
js:
	@if command -v npm >/dev/null 2>&1; then \
	  [ $(JS)/node_modules/.package-lock.json -nt $(JS)/package-lock.json ] || (cd $(JS) && npm ci --no-audit --no-fund); \
	else echo "npm not found: the TypeScript client tests will be skipped"; fi

test: install test-deps deploy-tools server-image js
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: install
	$(BIN)/python -m bench --smoke

# mypy reads its configuration from pyproject.toml; it checks the folders under their installed names
# (groundloop.*), linked under build/typecheck/ (the editable install's import hook is opaque to it).
lint: venv
	$(BIN)/ruff check server sessions sandbox clients/python tests bench
	$(BIN)/ruff format --check server sessions sandbox clients/python tests bench
	@mkdir -p build/typecheck/groundloop
	@for d in server sessions sandbox; do ln -sfn ../../../$$d build/typecheck/groundloop/$$d; done
	@ln -sfn ../../../clients/python/groundloop_client build/typecheck/groundloop/client
	@ln -sfn ../../../clients/python/groundloop_mcp build/typecheck/groundloop/mcp
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) .pytest_cache test-artifacts $(JS)/node_modules $(JS)/dist
