#!/usr/bin/env bash
# Install and start a Docker engine with gVisor (runsc) registered, on a Debian
# machine. Idempotent. Needs root. Also installs what `groundloop image build`
# needs on the host: debootstrap, and a C compiler for deploy/statx_shim.c.
#
# runsc is registered with `--network=none --host-uds=open`: the second lets a
# sandbox connect to the host Unix socket bind-mounted into it, the server's data
# channel (docs/security.md, "The data channel"). An existing daemon.json gets the
# flags added to its runsc entry, nothing else changed; an engine already running
# is told to reload its runtimes (SIGHUP), never restarted: its containers live on.
set -euo pipefail
daemon_json=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
running=0
docker info >/dev/null 2>&1 && running=1
if [ "$running" = 0 ]; then
  if ! command -v dockerd >/dev/null 2>&1 || ! command -v runsc >/dev/null 2>&1 \
    || ! command -v debootstrap >/dev/null 2>&1 || ! command -v cc >/dev/null 2>&1 \
    || ! dpkg -s libc6-dev >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q docker.io runsc debootstrap gcc libc6-dev
  fi
fi
changed=0
if command -v runsc >/dev/null 2>&1; then
  mkdir -p "$(dirname "$daemon_json")"
  # runsc needs --network=none here; its kvm platform hangs, so the default platform stays.
  changed=$(python3 - "$daemon_json" "$(command -v runsc)" <<'PY'
import json, os, sys

path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        cfg = json.load(f)
except FileNotFoundError:
    cfg = {}
entry = cfg.setdefault("runtimes", {}).setdefault("runsc", {"path": runsc})
args = entry.setdefault("runtimeArgs", [])
before = list(args)
if "--network=none" not in args:
    args.append("--network=none")
uds = [a for a in args if a.startswith("--host-uds=")]
if uds not in (["--host-uds=open"], ["--host-uds=all"]):  # "all" opens and creates: already enough
    args[:] = [a for a in args if not a.startswith("--host-uds=")] + ["--host-uds=open"]
if args != before or not os.path.exists(path):
    tmp = path + ".groundloop-tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(1)
else:
    print(0)
PY
)
fi
if [ "$running" = 1 ]; then
  if [ "$changed" = 1 ]; then
    pid=$(cat /var/run/docker.pid 2>/dev/null || pgrep -xo dockerd || true)
    if [ -n "$pid" ]; then
      kill -HUP "$pid"  # reloads the runtimes; containers keep running
      echo "docker-up: runsc runtimeArgs updated in $daemon_json; dockerd $pid reloaded"
    else
      echo "docker-up: runsc runtimeArgs updated in $daemon_json; reload the engine to apply them" >&2
    fi
  fi
  exit 0
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
