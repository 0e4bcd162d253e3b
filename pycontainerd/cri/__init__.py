"""Kubernetes' Container Runtime Interface (k8s.io/cri-api ``runtime.v1``) over the daemon.

Layout: ``options`` (the plugin config), ``store`` (what is persisted and where),
``spec`` (OCI specs for sandboxes and containers), ``runtime`` (connection, state, exits,
recovery), ``sandbox`` / ``container`` / ``images`` (the operations), ``logwriter`` (the
detached per-container CRI log writer) and ``servicer`` (the gRPC services). The plugin
registration is ``pycontainerd.plugins.cri``. Nothing is imported here: the daemon loads
the implementation after it starts serving.
"""
