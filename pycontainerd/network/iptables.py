"""Removing a container's masquerade rules when the bridge plugin cannot.

The bridge plugin (v1.1.x) finds the addresses whose ``ipMasq`` rules it must delete by
entering the container's namespace; when that namespace is already gone (removed by
hand, or a teardown retried after it was) its DEL succeeds but leaves the rules behind.
They are recognisable: every rule carries the comment ``name: "<network>" id: "<id>"``
(CNI's own format) and jumps to a per-container ``CNI-<hash>`` chain. This module
deletes exactly those, in the ``nat`` table, through the iptables binaries.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import shutil

__all__ = ["purge_container_rules"]

log = logging.getLogger(__name__)

_SHARED = ("CNI-HOSTPORT-",)


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def purge_container_rules(network: str, container_id: str) -> int:
    """Delete nat rules commented for (network, container) and their chains; how many."""
    comment = f'name: "{network}" id: "{container_id}"'
    removed = 0
    for binary in ("iptables", "ip6tables"):
        if shutil.which(binary) is None:
            continue
        rc, out = await _run(binary, "-w", "-t", "nat", "-S")
        if rc != 0:
            log.warning("%s -t nat -S failed: %s", binary, out.strip())
            continue
        chains: list[str] = []
        for line in out.splitlines():
            try:
                args = shlex.split(line)
            except ValueError:
                continue
            if len(args) < 2 or args[0] != "-A":
                continue
            if "--comment" not in args or args[args.index("--comment") + 1] != comment:
                continue
            target = args[args.index("-j") + 1] if "-j" in args[:-1] else ""
            if target.startswith("CNI-") and not target.startswith(_SHARED):
                chains.append(target)
            rc, msg = await _run(binary, "-w", "-t", "nat", "-D", *args[1:])
            if rc == 0:
                removed += 1
            else:
                log.warning("%s -D %s: %s", binary, line, msg.strip())
        for chain in dict.fromkeys(chains):
            await _run(binary, "-w", "-t", "nat", "-F", chain)
            await _run(binary, "-w", "-t", "nat", "-X", chain)
    return removed
