"""Deployment descriptions that are not part of the installed package (deploy/k8s: Kubernetes)."""
