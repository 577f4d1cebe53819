# The groundloop server image.
#
#   docker build -f deploy/server.Dockerfile -t groundloop-server:latest .
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
RUN pip install . && rm -rf /src
# The demo page: an installed (non-editable) package has no static/ beside it.
COPY static /opt/groundloop/static

# An unprivileged user. To reach the Docker socket it needs the socket's group:
# compose passes `group_add: [${DOCKER_GID}]`, Kubernetes `supplementalGroups`.
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin groundloop
USER 10001
WORKDIR /

# Everything else is a GROUNDLOOP_* variable (see the README's configuration
# table). Tokens come from the environment at run time, never from the image:
#   GROUNDLOOP_TOKENS="tok1:alice,tok2:bob"  or  GROUNDLOOP_TOKENS_FILE=/run/secrets/groundloop_tokens
# Binding 0.0.0.0 without tokens is refused at start-up, on purpose.
ENV GROUNDLOOP_HOST=0.0.0.0 \
    GROUNDLOOP_PORT=8000 \
    GROUNDLOOP_STATIC_DIR=/opt/groundloop/static
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

CMD ["groundloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
