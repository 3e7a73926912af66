#!/usr/bin/env bash
# End to end on a real cluster (needs docker, kind, kubectl, helm): create a kind cluster, install
# Knative Serving (Kourier) and kube-prometheus-stack, build and load the image, install the chart,
# train examples/digits.yaml and wait for it to succeed. Cannot run in CI here (no Docker engine).
#   hack/e2e-kind.sh            # create everything, run, keep the cluster
#   CLEANUP=1 hack/e2e-kind.sh  # delete the cluster at the end
set -euo pipefail

CLUSTER="${CLUSTER:-p2ptrain}"
KNATIVE_VERSION="${KNATIVE_VERSION:-knative-v1.16.0}"
PROM_STACK_VERSION="${PROM_STACK_VERSION:-65.1.1}"
IMAGE="${IMAGE:-p2ptrain:dev}"
NAMESPACE="${NAMESPACE:-p2ptrain}"
JOB_NAMESPACE="${JOB_NAMESPACE:-default}"
TIMEOUT="${TIMEOUT:-20m}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --image kindest/node:v1.31.0 --wait 120s
fi
kubectl config use-context "kind-$CLUSTER"

echo "--- Knative Serving $KNATIVE_VERSION with Kourier"
base="https://github.com/knative"
kubectl apply -f "$base/serving/releases/download/$KNATIVE_VERSION/serving-crds.yaml"
kubectl apply -f "$base/serving/releases/download/$KNATIVE_VERSION/serving-core.yaml"
kubectl apply -f "$base/net-kourier/releases/download/$KNATIVE_VERSION/kourier.yaml"
kubectl patch configmap/config-network -n knative-serving --type merge \
  -p '{"data":{"ingress-class":"kourier.ingress.networking.knative.dev"}}'
# Functions need a writable /tmp (emptyDir) and may scale to zero from the first revision.
kubectl patch configmap/config-features -n knative-serving --type merge \
  -p '{"data":{"kubernetes.podspec-emptydir":"enabled","kubernetes.podspec-persistent-volume-claim":"enabled","kubernetes.podspec-securitycontext":"enabled"}}'
kubectl patch configmap/config-autoscaler -n knative-serving --type merge \
  -p '{"data":{"allow-zero-initial-scale":"true"}}'
kubectl wait --for=condition=Available deployment --all -n knative-serving --timeout=5m

echo "--- kube-prometheus-stack $PROM_STACK_VERSION"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
  --version "$PROM_STACK_VERSION" --namespace monitoring --create-namespace --wait --timeout 10m \
  --set grafana.sidecar.dashboards.searchNamespace=ALL

echo "--- image $IMAGE"
docker build -t "$IMAGE" "$root"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "--- p2ptrain chart"
helm upgrade --install p2ptrain "$root/charts/p2ptrain" --namespace "$NAMESPACE" --create-namespace --wait \
  --set image.repository="${IMAGE%%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set monitoring.serviceMonitor.enabled=true --set monitoring.podMonitor.enabled=true \
  --set monitoring.serviceMonitor.additionalLabels.release=kube-prometheus-stack \
  --set monitoring.podMonitor.additionalLabels.release=kube-prometheus-stack
# Helm installs CRDs once and never upgrades them: keep the cluster's CRD current.
kubectl apply --server-side -f "$root/crds/"

echo "--- training examples/digits.yaml"
kubectl apply -n "$JOB_NAMESPACE" -f "$root/examples/digits.yaml"
kubectl get p2pjobs -n "$JOB_NAMESPACE"
if ! kubectl wait -n "$JOB_NAMESPACE" --for=jsonpath='{.status.phase}'=Succeeded p2pjob/digits --timeout="$TIMEOUT"; then
  kubectl describe p2pjob/digits -n "$JOB_NAMESPACE"
  kubectl logs -n "$NAMESPACE" deployment/p2ptrain --tail=100
  exit 1
fi
kubectl get p2pjobs -n "$JOB_NAMESPACE" -o wide
echo "Grafana: kubectl port-forward -n monitoring svc/kube-prometheus-stack-grafana 3000:80  (dashboard 'p2ptrain')"

if [[ "${CLEANUP:-0}" == 1 ]]; then
  kind delete cluster --name "$CLUSTER"
fi
