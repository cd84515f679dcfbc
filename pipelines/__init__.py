"""Kubeflow pipelines: wiring only (issue 5)."""
