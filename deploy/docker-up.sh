#!/usr/bin/env bash
# Install and start a Docker engine with gVisor (runsc) registered, on a Debian
# machine with no engine running. Idempotent. Needs root. Also installs what
# `groundloop image build` needs on the host: debootstrap, and a C compiler for
# deploy/statx_shim.c.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v runsc >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1 \
  || ! command -v cc >/dev/null 2>&1 || ! dpkg -s libc6-dev >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q docker.io runsc debootstrap gcc libc6-dev
fi
mkdir -p /etc/docker
if [ ! -f /etc/docker/daemon.json ] || ! grep -q -- --host-uds=open /etc/docker/daemon.json; then
  # runsc needs --network=none here; its kvm platform hangs, so the default platform stays.
  # --host-uds=open: a sandbox connects to the Unix sockets of its run directory (egress.sock).
  cat > /etc/docker/daemon.json <<'JSON'
{
  "runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=open"]}}
}
JSON
fi
log=${DOCKERD_LOG:-/var/log/dockerd.log}
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not start; see $log" >&2
tail -20 "$log" >&2
exit 1
