"""pycontainerd: a container supervisor that speaks containerd's API."""

__version__ = "0.1.0"
