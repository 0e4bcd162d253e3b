"""``containerd-shim-pyrunc-v1``: the shim command line (runtime ``io.containerd.pyrunc.v1``).

Same flags and actions as containerd's shims, so containerd can drive it and we can drive
containerd's::

    containerd-shim-pyrunc-v1 -namespace NS -address GRPC -publish-binary P -id ID
        [-debug] [-bundle B] start|delete

``start`` (cwd = bundle, runtime options ``Any`` on stdin, ``TTRPC_ADDRESS`` in the env)
starts or reuses a detached server, writes ``address`` in the bundle and prints it.
``delete`` cleans up after a dead shim and prints a serialized ``DeleteResponse``.
``serve`` (internal) runs a server on the listening socket inherited from ``start``.
Imports stay minimal until an action needs more: ``start`` runs on every container start.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

VERSION = "0.1.0"
_FLAGS_WITH_VALUE = ("namespace", "address", "publish-binary", "id", "bundle", "socket")
_BOOL_FLAGS = ("debug", "v")


def parse(argv: list[str]) -> tuple[dict[str, str], set[str], str]:
    """Go ``flag``-style parsing: ``-name value``, ``-name=value``, ``--name``; then the action."""
    values: dict[str, str] = {}
    bools: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            if not eq or value.lower() in ("1", "t", "true"):
                bools.add(name)
        elif name in _FLAGS_WITH_VALUE:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise SystemExit(f"flag needs an argument: -{name}")
                value = argv[i]
            values[name] = value
        else:
            raise SystemExit(f"flag provided but not defined: -{name}")
        i += 1
    action = argv[i] if i < len(argv) else ""
    return values, bools, action


def _start(values: dict[str, str], debug: bool, bundle: str) -> int:
    from pycontainerd.shim.launcher import start_shim_sync

    options = b""
    if not sys.stdin.isatty():
        options = sys.stdin.buffer.read()
    addr = start_shim_sync(
        values["namespace"],
        values.get("id", ""),
        bundle,
        values.get("address", ""),
        os.environ.get("TTRPC_ADDRESS", ""),
        options,
        debug,
    )
    sys.stdout.write(addr)
    sys.stdout.flush()
    return 0


def _delete(values: dict[str, str], bundle: str) -> int:
    from pycontainerd.shim import _nogrpc

    _nogrpc.install()
    from pycontainerd.shim.cleanup import cleanup

    sys.stdout.buffer.write(
        cleanup(values["namespace"], values.get("id", ""), bundle, values.get("address", ""))
    )
    sys.stdout.flush()
    return 0


def _serve(values: dict[str, str], debug: bool, bundle: str) -> int:
    import socket

    from pycontainerd.shim import _nogrpc

    _nogrpc.install()
    from pycontainerd.shim import address
    from pycontainerd.shim.launcher import SOCKET_FD_ENV
    from pycontainerd.shim.server import ShimConfig, run_detached

    fd = int(os.environ.pop(SOCKET_FD_ENV, "3"))
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    grpc_address = values.get("address", "")
    group = address.group_id(bundle, values.get("id", ""))
    cfg = ShimConfig(
        namespace=values["namespace"],
        id=values.get("id", ""),
        bundle=bundle,
        grpc_address=grpc_address,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        socket_address=address.socket_address(grpc_address, values["namespace"], group),
        debug=debug,
    )
    run_detached(cfg, sock, None)


def main(argv: list[str] | None = None) -> int:
    values, bools, action = parse(sys.argv[1:] if argv is None else argv)
    if "v" in bools:
        print(f"{os.path.basename(sys.argv[0])}:\n  Version:  {VERSION}\n")
        return 0
    if not values.get("namespace"):
        print("shim namespace cannot be empty", file=sys.stderr)
        return 1
    bundle = values.get("bundle") or os.getcwd()
    debug = "debug" in bools
    try:
        if action == "start":
            return _start(values, debug, bundle)
        if action == "delete":
            return _delete(values, bundle)
        if action == "serve":
            return _serve(values, debug, bundle)
    except Exception as exc:
        print(f"containerd-shim-pyrunc-v1: {exc}", file=sys.stderr)
        return 1
    print(f"containerd-shim-pyrunc-v1: unknown action {action!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
