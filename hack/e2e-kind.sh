#!/usr/bin/env bash
# End to end on a real cluster (needs docker, kind, kubectl, helm): create a kind cluster, install
# Knative Serving (Kourier) and kube-prometheus-stack, build and load the image, install the chart,
# train a job (examples/digits.yaml) and wait for it to succeed. Cannot run in CI here (no Docker engine).
#   hack/e2e-kind.sh            # create everything, run, keep the cluster
#   CLEANUP=1 hack/e2e-kind.sh  # delete the cluster at the end
#   JOB=examples/cnn-pvc.yaml hack/e2e-kind.sh   # another job (it must fit the cluster)
set -euo pipefail

CLUSTER="${CLUSTER:-p2ptrain}"
KNATIVE_VERSION="${KNATIVE_VERSION:-knative-v1.16.0}"
PROM_STACK_VERSION="${PROM_STACK_VERSION:-65.1.1}"
# Knative resolves every image tag to a digest through the registry, except for the registries in
# config-deployment's registries-skipping-tag-resolving (default "kind.local,ko.local,dev.local").
# An image loaded into kind exists in no registry, so it must be named kind.local/...: otherwise
# "p2ptrain:dev" means docker.io/library/p2ptrain and the function never gets a revision.
IMAGE="${IMAGE:-kind.local/p2ptrain:dev}"
NAMESPACE="${NAMESPACE:-p2ptrain}"
JOB_NAMESPACE="${JOB_NAMESPACE:-default}"
TIMEOUT="${TIMEOUT:-20m}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOB="${JOB:-$root/examples/digits.yaml}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done
job_name="$(sed -n 's/^  name: *\([a-z0-9-]*\).*/\1/p' "$JOB" | head -n 1)"
[[ -n "$job_name" ]] || { echo "error: no metadata.name in $JOB" >&2; exit 1; }

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
# Knative's default feature flags admit the gradient function's Service (emptyDir is on by default,
# the security settings sit on the container). The one flag a job can need is the claim flag, for a
# data set on a PersistentVolumeClaim (dataset.claimName); the operator names it when it is missing.
if grep -q '^ *claimName:' <(sed -n '/^  dataset:/,/^  [a-z]/p' "$JOB"); then
  kubectl patch configmap/config-features -n knative-serving --type merge \
    -p '{"data":{"kubernetes.podspec-persistent-volume-claim":"enabled"}}'
fi
kubectl wait --for=condition=Available deployment --all -n knative-serving --timeout=5m
kubectl wait --for=condition=Available deployment --all -n kourier-system --timeout=5m
# Knative's webhook admits the function's Service: it must be rolled out and ready before the job.
kubectl rollout status deployment/webhook -n knative-serving --timeout=5m

echo "--- kube-prometheus-stack $PROM_STACK_VERSION"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null
helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
  --version "$PROM_STACK_VERSION" --namespace monitoring --create-namespace --wait --timeout 10m \
  --set grafana.sidecar.dashboards.searchNamespace=ALL

echo "--- image $IMAGE"
docker build -t "$IMAGE" "$root"
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "--- p2ptrain chart"
# pullPolicy Never: the image exists only on the kind nodes.
helm upgrade --install p2ptrain "$root/charts/p2ptrain" --namespace "$NAMESPACE" --create-namespace --wait \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set monitoring.serviceMonitor.enabled=true --set monitoring.podMonitor.enabled=true \
  --set monitoring.serviceMonitor.additionalLabels.release=kube-prometheus-stack \
  --set monitoring.podMonitor.additionalLabels.release=kube-prometheus-stack
# Helm installs CRDs once and never upgrades them: keep the cluster's CRD current.
kubectl apply --server-side -f "$root/crds/"

echo "--- training $JOB"
kubectl apply -n "$JOB_NAMESPACE" -f "$JOB"
kubectl get p2pjobs -n "$JOB_NAMESPACE"
if ! kubectl wait -n "$JOB_NAMESPACE" --for=jsonpath='{.status.phase}'=Succeeded "p2pjob/$job_name" --timeout="$TIMEOUT"; then
  kubectl describe "p2pjob/$job_name" -n "$JOB_NAMESPACE"
  kubectl get ksvc,revisions -n "$JOB_NAMESPACE"
  kubectl logs -n "$NAMESPACE" deployment/p2ptrain --tail=100
  exit 1
fi
kubectl get p2pjobs -n "$JOB_NAMESPACE" -o wide
echo "Grafana: kubectl port-forward -n monitoring svc/kube-prometheus-stack-grafana 3000:80  (dashboard 'p2ptrain')"

if [[ "${CLEANUP:-0}" == 1 ]]; then
  kind delete cluster --name "$CLUSTER"
fi
