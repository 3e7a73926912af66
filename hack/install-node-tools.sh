#!/usr/bin/env bash
# Installs what the node test tier (tests/node, `make e2e`) runs a Kubernetes node with, from Debian's
# packages: containerd and runc (the container runtime), the CNI plugins (the pods' bridge), nftables
# (kube-proxy's rules) and iproute2. Nothing is started or enabled: the tier starts its own containerd
# with a configuration of its own and stops it. Idempotent; root (or sudo).
set -euo pipefail
sudo=""
[[ "$(id -u)" == 0 ]] || sudo=sudo
missing=()
for tool in containerd:containerd runc:runc nft:nftables ip:iproute2; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
if ((${#missing[@]})); then
  echo "installing ${missing[*]} (Debian packages)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
