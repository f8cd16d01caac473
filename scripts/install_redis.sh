#!/usr/bin/env bash
# Makes sure redis-server is installed (for the remote chunk tier's tests and benchmarks).
#
#   bash scripts/install_redis.sh [--require]
#
# Does nothing if redis-server is already on the machine. Otherwise installs Debian's /
# Ubuntu's package with apt-get (as root, or with password-less sudo) without starting
# the system-wide service: the tests and benchmarks start private servers on free
# loopback ports and stop them afterwards. Without apt-get or root it prints how to
# install and exits 0, or 1 with --require (CI).
set -euo pipefail
REQUIRE=0
[[ "${1:-}" == "--require" ]] && REQUIRE=1

have_server() { command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]]; }
if have_server; then
  echo "== [redis] found: $(redis-server --version 2>/dev/null || /usr/bin/redis-server --version)"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo); fi
fi
if ! command -v apt-get >/dev/null 2>&1 || { [[ $(id -u) -ne 0 ]] && [[ ${#SUDO[@]} -eq 0 ]]; }; then
  msg="redis-server is not installed and cannot be installed here (needs apt-get as root): install it with your package manager; the Redis tests skip without it"
  if [[ $REQUIRE -eq 1 ]]; then echo "== [redis] ERROR: $msg" >&2; exit 1; fi
  echo "== [redis] $msg"
  exit 0
fi

# Keep the package from starting a system-wide service (invoke-rc.d honours policy-rc.d).
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [[ ! -e $POLICY ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  ADDED_POLICY=1
fi
cleanup() { if [[ $ADDED_POLICY -eq 1 ]]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

echo "== [redis] apt-get install redis-server"
status=0
{ "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; } || status=$?
if [[ $status -ne 0 ]] || ! have_server; then
  msg="apt-get could not install redis-server (exit $status)"
  if [[ $REQUIRE -eq 1 ]]; then echo "== [redis] ERROR: $msg" >&2; exit 1; fi
  echo "== [redis] $msg; the Redis tests skip without it"
  exit 0
fi
echo "== [redis] installed: $(redis-server --version)"
