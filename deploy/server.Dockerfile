# The groundloop server image.
#
# With a registry:  docker build -f deploy/server.Dockerfile -t groundloop-server:latest .
# Without one:      python deploy/server_image.py --tag groundloop-server:latest
#   (a Debian base made by debootstrap and `docker import`, the wheels made by
#   the host's pip, and this same file built with no network; .ci/run does it
#   and tests/deploy/test_server_image.py runs a session through the result).
#
# Build context: the repository root (deploy/server.Dockerfile.dockerignore keeps
# .venv, .git, tests and caches out of it). The server starts sandbox containers
# through a Docker engine it reaches over DOCKER_HOST (default: the socket
# /var/run/docker.sock, mounted by deploy/compose.yaml); see docs/deploy.md for
# what that access means.
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY sessions ./sessions
COPY sandbox ./sandbox
# Wheels for an offline build (deploy/server_image.py); only a README otherwise.
COPY deploy/wheels ./wheels
RUN python3 -m venv /opt/groundloop/venv && \
    if ls wheels/*.whl >/dev/null 2>&1; then \
      /opt/groundloop/venv/bin/pip install --no-index --find-links wheels groundloop; \
    else \
      /opt/groundloop/venv/bin/pip install .; \
    fi && \
    rm -rf /src
ENV PATH=/opt/groundloop/venv/bin:$PATH
# The demo page: an installed (non-editable) package has no static/ beside it.
COPY static /opt/groundloop/static

# An unprivileged user. To reach the Docker socket it needs the socket's group:
# compose passes `group_add: [${DOCKER_GID}]`, Kubernetes `supplementalGroups`.
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin groundloop
USER 10001
WORKDIR /

# Everything else is a GROUNDLOOP_* variable (see the README's configuration
# table). Tokens come from the environment or a file at run time, never from the image:
#   GROUNDLOOP_TOKENS="tok1:alice,tok2:bob"  or  GROUNDLOOP_TOKENS_FILE=/run/secrets/groundloop_tokens
# Binding 0.0.0.0 without tokens is refused at start-up, on purpose.
ENV GROUNDLOOP_HOST=0.0.0.0 \
    GROUNDLOOP_PORT=8000 \
    GROUNDLOOP_STATIC_DIR=/opt/groundloop/static
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

# SIGTERM drains (running requests finish, up to GROUNDLOOP_DRAIN_S): give
# `docker stop -t` and the orchestrator's grace period more than that.
STOPSIGNAL SIGTERM
CMD ["groundloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
