# The groundloop sandbox image.
#
# Build it with `groundloop image build` (sandbox/image.py): its context is the agent's files plus
# statx_shim.so, compiled from deploy/statx_shim.c on the host. With a registry the base is
# debian:bookworm-slim; without one, a Debian base made offline (debootstrap + docker import),
# passed as --build-arg BASE=...
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The profile's Debian packages (sandbox/image.py PROFILES), space-separated.
ARG PACKAGES="python3 nodejs git ca-certificates"

# The offline base already carries them; a registry base installs them here.
RUN if ! dpkg -s $PACKAGES >/dev/null 2>&1; then \
      apt-get update && \
      apt-get install -y --no-install-recommends $PACKAGES && \
      rm -rf /var/lib/apt/lists/*; \
    fi

# A non-root user owns /workspace; at run time /workspace and /tmp are tmpfs
# mounts over a read-only root (see sandbox/docker_backend.py).
RUN (getent group sandbox || groupadd --gid 1000 sandbox) && \
    (getent passwd sandbox || useradd --uid 1000 --gid 1000 --home-dir /workspace --no-create-home --shell /bin/sh sandbox) && \
    mkdir -p /workspace /opt/groundloop && chown 1000:1000 /workspace

# Preloaded into every dynamically linked process (whatever its environment): under gVisor
# 20221219, statx() with AT_NO_AUTOMOUNT fails with EINVAL, which breaks coreutils' ls and stat;
# the shim retries without the flag (deploy/statx_shim.c).
COPY statx_shim.so /usr/local/lib/groundloop/statx_shim.so
RUN chmod 0644 /usr/local/lib/groundloop/statx_shim.so && \
    echo /usr/local/lib/groundloop/statx_shim.so > /etc/ld.so.preload

COPY groundloop_agent /opt/groundloop/groundloop_agent
# Compiled here, once: the root is read-only at run time, so without these every agent, zygote and
# spawned worker would compile the agent's modules from source at its start (about 35 ms of a cold
# session start, measured: docs/performance.md, round six).
RUN python3 -m compileall -q /opt/groundloop/groundloop_agent
# PYTHONPATH is the agent's alone: it starts every child with an environment of its own.
ENV HOME=/workspace LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/opt/groundloop
USER 1000:1000
WORKDIR /workspace
CMD ["python3", "-u", "-B", "-P", "-S", "-m", "groundloop_agent"]
