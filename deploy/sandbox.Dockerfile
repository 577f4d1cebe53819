# The groundloop sandbox image.
#
# With a registry:   docker build -f deploy/sandbox.Dockerfile -t groundloop-sandbox:latest sandbox/agent
# Without one, `groundloop image build` makes a Debian base offline (debootstrap +
# docker import) and builds this same file on top of it with --build-arg BASE=...
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# The offline base already carries these; a registry base installs them here.
RUN if ! command -v python3 >/dev/null || ! command -v node >/dev/null || ! command -v git >/dev/null; then \
      apt-get update && \
      apt-get install -y --no-install-recommends python3 nodejs git ca-certificates && \
      rm -rf /var/lib/apt/lists/*; \
    fi

# A non-root user owns /workspace; at run time /workspace and /tmp are tmpfs
# mounts over a read-only root (see sandbox/docker_backend.py).
RUN (getent group sandbox || groupadd --gid 1000 sandbox) && \
    (getent passwd sandbox || useradd --uid 1000 --gid 1000 --home-dir /workspace --no-create-home --shell /bin/sh sandbox) && \
    mkdir -p /workspace /opt/groundloop && chown 1000:1000 /workspace

COPY groundloop_agent /opt/groundloop/groundloop_agent
# PYTHONPATH is the agent's alone: it starts every child with an environment of its own.
ENV HOME=/workspace LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/groundloop
USER 1000:1000
WORKDIR /workspace
CMD ["python3", "-u", "-B", "-P", "-m", "groundloop_agent"]
