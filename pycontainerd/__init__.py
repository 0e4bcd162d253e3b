"""pycontainerd: a container supervisor that speaks containerd's API."""
