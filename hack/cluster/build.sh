#!/usr/bin/env bash
# Builds the cluster tier's control plane (tests/cluster) from upstream Go modules and gathers the
# upstream CRDs it installs. Idempotent: the binary is rebuilt only when this module changes, and Go's
# module and build caches (GOMODCACHE, GOCACHE: kept on the machine) make a rebuild cheap.
#
#   .tools/bin/p2p-kube        kube-apiserver, kube-controller-manager, kube-scheduler and etcd in one
#                              binary (k8s.io/kubernetes v1.37.2, go.etcd.io/etcd/server/v3 v3.7.0)
#   .tools/cluster/crds/       Knative Serving's CRDs and the Prometheus Operator's, from the releases
#                              pinned in upstream/go.mod (checked against upstream/go.sum)
#   .tools/bin/knative-webhook Knative Serving's admission webhook (its stock cmd/webhook, pinned in
#                              knative/go.mod, a module of its own: Knative pins older k8s.io modules)
#   .tools/cluster/knative-webhook/  that release's config/core manifests the webhook runs with
#   .tools/bin/coredns         CoreDNS with the plugins a cluster's DNS needs (coredns/go.mod), for the
#                              node tier (tests/node); the p2p-kube binary also holds kubelet and kube-proxy
#   .tools/bin/pause           the pod sandbox's process (pause.c, static), for the node tier's sandbox image
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$root/.tools/bin"
crds="$root/.tools/cluster/crds"
# The Go toolchain's usual home, for shells whose PATH lacks it (CI runs with a minimal environment).
command -v go >/dev/null || [[ ! -x /usr/local/go/bin/go ]] || export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || { echo "hack/cluster/build.sh: a Go toolchain (go >= 1.26) is needed on PATH" >&2; exit 1; }
# Everything the binary is built from: a change to any of these rebuilds it.
want="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "$here/build.sh" "$here/upstream/go.sum" | sha256sum | cut -c1-16) $(go env GOVERSION)"
stamp="$root/.tools/cluster/stamp"

# Knative's webhook first, with its own stamp: it does not rebuild the control plane, nor the reverse.
knative="$here/knative"
knative_config="$root/.tools/cluster/knative-webhook"
knative_want="$(cat "$knative/go.mod" "$knative/go.sum" "$here/build.sh" | sha256sum | cut -c1-16) $(go env GOVERSION)"
knative_stamp="$root/.tools/cluster/knative-webhook.stamp"
if [[ ! -x "$bin/knative-webhook" || ! -f "$knative_stamp" || "$(cat "$knative_stamp")" != "$knative_want" ]]; then
  started=$SECONDS
  echo "building Knative Serving's webhook: the first build on a machine takes about 5 minutes on 2 cores"
  mkdir -p "$bin"
  (cd "$knative" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$bin/knative-webhook.new" \
    knative.dev/serving/cmd/webhook)
  mv "$bin/knative-webhook.new" "$bin/knative-webhook"
  core="$(cd "$knative" && go list -mod=readonly -m -f '{{.Dir}}' knative.dev/serving)/config/core"
  rm -rf "$knative_config"
  mkdir -p "$knative_config"/{200-roles,configmaps,webhooks}
  cp "$core"/100-namespace.yaml "$core"/200-serviceaccount.yaml "$knative_config/"
  for part in 200-roles configmaps webhooks; do cp "$core/$part"/*.yaml "$knative_config/$part/"; done
  chmod -R u+w "$knative_config"
  echo "$knative_want" > "$knative_stamp"
  echo "Knative's webhook built in $((SECONDS - started)) s: $(du -h "$bin/knative-webhook" | cut -f1) binary"
fi

# The node tier's CoreDNS and pause, each with its own stamp as well.
coredns="$here/coredns"
coredns_want="$(cat "$coredns/go.mod" "$coredns/go.sum" "$coredns/main.go" "$here/build.sh" | sha256sum | cut -c1-16) $(go env GOVERSION)"
coredns_stamp="$root/.tools/cluster/coredns.stamp"
if [[ ! -x "$bin/coredns" || ! -f "$coredns_stamp" || "$(cat "$coredns_stamp")" != "$coredns_want" ]]; then
  started=$SECONDS
  echo "building CoreDNS: the first build on a machine takes about a minute on 2 cores"
  mkdir -p "$bin" "$(dirname "$coredns_stamp")"
  (cd "$coredns" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$bin/coredns.new" .)
  mv "$bin/coredns.new" "$bin/coredns"
  echo "$coredns_want" > "$coredns_stamp"
  echo "CoreDNS built in $((SECONDS - started)) s: $(du -h "$bin/coredns" | cut -f1) binary"
fi
if [[ ! -x "$bin/pause" || "$here/pause.c" -nt "$bin/pause" ]]; then
  command -v gcc >/dev/null || { echo "hack/cluster/build.sh: gcc (with the C library's static archive) is needed" >&2; exit 1; }
  mkdir -p "$bin"
  gcc -static -Os -s -o "$bin/pause.new" "$here/pause.c"
  mv "$bin/pause.new" "$bin/pause"
fi

if [[ -x "$bin/p2p-kube" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
mkdir -p "$bin" "$crds"
started=$SECONDS
echo "building the control plane and node (k8s.io/kubernetes v1.37.2, etcd v3.7.0): the first build on a machine takes about 8 minutes on 2 cores"
# -mod=readonly: go.sum pins every module, so no checksum database is consulted.
version="k8s.io/component-base/version"
(cd "$here" && CGO_ENABLED=0 go build -mod=readonly -trimpath -o "$bin/p2p-kube.new" \
  -ldflags "-s -w -X $version.gitVersion=v1.37.2 -X $version.gitMajor=1 -X $version.gitMinor=37 \
            -X $version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=v1.37.2" .)
mv "$bin/p2p-kube.new" "$bin/p2p-kube"
rm -f "$crds"/*.yaml
module_dir() {  # where the module cache holds the pinned release of $1 (downloaded if missing)
  (cd "$here/upstream" && go mod download -json "$1") | python3 -c 'import json, sys; o = json.load(sys.stdin); sys.exit(o["Error"]) if o.get("Error") else print(o["Dir"])'
}
serving="$(module_dir knative.dev/serving)"
monitoring="$(module_dir github.com/prometheus-operator/prometheus-operator)"
cp "$serving"/config/core/300-resources/*.yaml "$crds/"
cp "$monitoring"/example/prometheus-operator-crd/monitoring.coreos.com_{servicemonitors,podmonitors,prometheusrules}.yaml "$crds/"
chmod u+w "$crds"/*.yaml
echo "$want" > "$stamp"
echo "control plane built in $((SECONDS - started)) s: $(du -h "$bin/p2p-kube" | cut -f1) binary; module cache $(du -sh "$(go env GOMODCACHE)" | cut -f1), build cache $(du -sh "$(go env GOCACHE)" | cut -f1)"
