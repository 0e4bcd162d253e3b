"""Snapshots: the snapshotter contract, the on-disk snapshotters, and the namespaced layer.

- ``snapshotter``: domain types (``Info``, ``Kind``, ``Usage``, ``Mount``) and the
  ``Snapshotter`` protocol with its error contract;
- ``mount``: ``mount_all`` / ``unmount`` / ``temp_mount`` over the mount syscalls;
- ``storage``: a backend's snapshot table (in a file of its own, or in the metadata
  database); ``local``: the machinery shared by ``overlay`` (overlayfs layers) and
  ``native`` (full copies);
- ``metadata`` (with ``records``): namespaces, leases and events over the backends —
  ``SnapshotService.get(name)`` is what the API and other services use.
"""
