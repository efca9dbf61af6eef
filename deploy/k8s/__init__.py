"""duoserve on Kubernetes: `python -m deploy.k8s.render` (docs/deploying.md)."""
