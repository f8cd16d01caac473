#!/usr/bin/env bash
# Makes sure redis-server and openssl are installed (for the remote chunk tier's tests and
# benchmarks; the TLS tests make their certificates with the openssl command).
#
#   bash scripts/install_redis.sh [--require]
#
# Does nothing if both are already on the machine. Otherwise installs the missing Debian /
# Ubuntu packages with apt-get (as root, or with password-less sudo) without starting
# the system-wide service: the tests and benchmarks start private servers on free
# loopback ports and stop them afterwards. Debian's redis-server (7.0 and later) is built
# with TLS. Without apt-get or root it prints how to install and exits 0, or 1 with
# --require (CI).
set -euo pipefail
REQUIRE=0
[[ "${1:-}" == "--require" ]] && REQUIRE=1

have_server() { command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]]; }
have_openssl() { command -v openssl >/dev/null 2>&1 || [[ -x /usr/bin/openssl ]]; }
PACKAGES=()
have_server || PACKAGES+=(redis-server)
have_openssl || PACKAGES+=(openssl)
if [[ ${#PACKAGES[@]} -eq 0 ]]; then
  echo "== [redis] found: $(redis-server --version 2>/dev/null || /usr/bin/redis-server --version); $(openssl version)"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo); fi
fi
if ! command -v apt-get >/dev/null 2>&1 || { [[ $(id -u) -ne 0 ]] && [[ ${#SUDO[@]} -eq 0 ]]; }; then
  msg="${PACKAGES[*]} not installed and cannot be installed here (needs apt-get as root): install with your package manager; the Redis tests skip without them"
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

echo "== [redis] apt-get install ${PACKAGES[*]}"
status=0
{ "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; } || status=$?
if [[ $status -ne 0 ]] || ! have_server || ! have_openssl; then
  msg="apt-get could not install ${PACKAGES[*]} (exit $status)"
  if [[ $REQUIRE -eq 1 ]]; then echo "== [redis] ERROR: $msg" >&2; exit 1; fi
  echo "== [redis] $msg; the Redis tests skip without it"
  exit 0
fi
echo "== [redis] installed: $(redis-server --version); $(openssl version)"
