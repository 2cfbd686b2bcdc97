"""The project's own test cluster: a Kubernetes API emulator and a local kubelet (see design.md)."""

from .cluster import DevCluster

__all__ = ["DevCluster"]
