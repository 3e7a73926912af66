"""The p2ptrain Kubernetes operator (kopf): reconciles P2PTrainingJobs into peers, Redis and Knative.

It lives in the top-level ``operator/`` folder under a name of its own, because ``operator`` belongs to
the standard library.
"""
