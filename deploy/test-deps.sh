#!/usr/bin/env bash
# Install what the test suite needs beyond the virtualenv and Docker (deploy/docker-up.sh):
# Chromium for the browser tests, Prometheus (promtool) for the rule and scrape tests, HAProxy
# for the fleet tests. Idempotent: installs only what is missing. Needs root on Debian.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need[@]}"
fi
