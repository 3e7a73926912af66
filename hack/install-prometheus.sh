#!/usr/bin/env bash
# Installs the Debian package `prometheus` (2.42, with `promtool`) for the monitoring tests: they run a
# real Prometheus against a local job and check the chart's alert rules with `promtool test rules`.
# The package's postinst would start a system Prometheus on :9090 (systemd or init.d); the tests pick
# their own free port, but a stray server still wastes a port and memory, so service starts are
# refused during the install (policy-rc.d, the Debian mechanism for this) and any that slipped
# through are stopped. Idempotent.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
sudo=""
[[ "$(id -u)" == 0 ]] || sudo=sudo
policy=/usr/sbin/policy-rc.d
added_policy=""
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 0755 "$policy"
  added_policy=1
fi
cleanup() { [[ -z "$added_policy" ]] || $sudo rm -f "$policy"; }
trap cleanup EXIT
echo "installing prometheus and promtool (Debian package prometheus)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# systemd ignores policy-rc.d when it is PID 1 and the unit is enabled: stop and disable it there.
if [[ -d /run/systemd/system ]]; then
  $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
prometheus --version 2>&1 | head -1
promtool --version 2>&1 | head -1
