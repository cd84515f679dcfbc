"""Kubeflow Pipelines components: thin definitions over importable functions (issue 5)."""
