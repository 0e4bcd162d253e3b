"""The daemon side of running containers: bundles, shims (runtime v2) and the task manager.

A task is a container's process tree run by a shim: a separate process, started with the
runtime v2 ``start`` protocol and driven over ttrpc, that outlives the daemon. The
manager keeps one connection per task, reconnects to live shims after a restart and
cleans up after dead ones.
"""
