// Pins the upstream releases whose manifests the cluster tier installs (read from the module cache,
// never vendored): Knative Serving's CRDs, of the release whose webhook the tier runs (knative/go.mod
// says why that is not v0.51.0, the newest), and the Prometheus Operator's monitoring CRDs.
module github.com/p2ptrain/p2ptrain/hack/cluster/upstream

go 1.26.0

require (
	github.com/prometheus-operator/prometheus-operator v0.93.0
	knative.dev/serving v0.47.1-0.20251204213410-5fbd94e8a6d7
)
