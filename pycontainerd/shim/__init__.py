"""containerd-shim-pyrunc-v1: our runtime v2 shim (runtime ``io.containerd.pyrunc.v1``).

Modules: ``__main__`` (the command line: ``start``/``delete``), ``launcher`` (the daemon's
in-process ``start_shim``), ``zygote`` (pre-loaded forking server), ``server`` (the shim
process), ``service`` (``containerd.task.v2.Task``), ``container``/``process``/``stdio``
(containers, state machines, FIFOs and ptys), ``reaper`` (the one ``waitpid`` loop),
``publisher`` (events to the daemon), ``metrics`` (cgroup stats, OOM), ``cleanup``
(``delete`` after a dead shim), ``address`` (socket and state paths).
"""

from __future__ import annotations
