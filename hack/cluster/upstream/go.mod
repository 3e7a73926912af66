// Pins the upstream releases whose manifests the cluster tier installs (read from the module cache,
// never vendored): Knative Serving's CRDs and the Prometheus Operator's monitoring CRDs.
module github.com/p2ptrain/p2ptrain/hack/cluster/upstream

go 1.26.0

require (
	github.com/prometheus-operator/prometheus-operator v0.93.0
	knative.dev/serving v0.51.0
)
