"""``pcd``: a docker-like command line for pycontainerd (``python -m pycontainerd.cli``).

Modules: ``__main__`` (parser, error reporting), ``run`` (create, network, attach or
detach), ``containers`` (ps, exec, stop, kill, rm, prune, logs, inspect), ``images``
(pull, push, images, rmi, prune, tag, load, save), ``system`` (events, namespaces),
``logs`` (rotated log files and the detached logger process), ``net`` (namespaces, CNI,
ports), ``lifecycle`` (stop and remove), ``stdio`` (terminals and pipes), ``state``
(settings, labels, lookups), ``progress`` and ``tables`` (output for people).

Nothing else is imported here: the logger process (``python -m pycontainerd.cli.logs``) must
start without loading gRPC.
"""

import os

# pcd forks helpers (CNI plugins, the logger) that exec at once and never use gRPC, so
# gRPC's fork handlers buy nothing and would only log warnings about other threads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
