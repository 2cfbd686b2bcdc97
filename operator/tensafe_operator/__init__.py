"""The TenSafe Kubernetes operator: custom resource definitions and pure builders of child objects."""
