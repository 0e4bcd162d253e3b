"""Runtime: the OCI runtime wrapper (``runc.py``), the only place a runc binary is run.

The shim (``pycontainerd.shim``) drives containers through :class:`~pycontainerd.runtime.runc.Runc`;
the daemon talks to shims, never to runc directly.
"""

from __future__ import annotations
