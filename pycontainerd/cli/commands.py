"""The ``pcd`` command line's parser: every command, its flags, and where it lives.

Kept apart from the commands themselves, and light to import (argparse only): a
command's module — with the SDK, gRPC and the network code it needs — is imported when
that command runs, so ``pcd pull`` never loads the container, task or network modules.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycontainerd.cli.state import Settings

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_RUNTIME",
    "build_parser",
    "registry_options",
    "registry_settings",
]

DEFAULT_ADDRESS = "/run/pycontainerd/pycontainerd.sock"
DEFAULT_RUNTIME = "io.containerd.pyrunc.v1"

Command = Callable[["Settings", argparse.Namespace], Awaitable[int]]


def _cmd(module: str, name: str) -> Command:
    """``pycontainerd.cli.<module>.<name>``, imported when the command runs."""

    async def run(settings: Settings, args: argparse.Namespace) -> int:
        fn: Any = getattr(importlib.import_module(f"pycontainerd.cli.{module}"), name)
        return int(await fn(settings, args))

    run.__qualname__ = run.__name__ = name
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcd", description="Run containers on pycontainerd.")
    p.add_argument(
        "-a", "--address", help="daemon socket (env PCD_ADDRESS; default "
        "/run/pycontainerd/pycontainerd.sock)",
    )  # fmt: skip
    p.add_argument("-n", "--namespace", help="namespace (env PCD_NAMESPACE; default 'default')")
    p.add_argument("--data-root", help="where logs live (env PCD_DATA_ROOT; default /var/lib/pcd)")
    p.add_argument(
        "--exec-root", help="network state and namespaces (env PCD_EXEC_ROOT; default /run/pcd)"
    )
    sub = p.add_subparsers(dest="command_name", required=True, metavar="COMMAND")
    _run(sub)
    _containers(sub)
    _images(sub)
    _system(sub)
    return p


def registry_settings(args: argparse.Namespace, host: str) -> dict[str, Any]:
    """How to reach registry ``host`` by the flags (and ``PCD_INSECURE_REGISTRIES``):
    the fields of a ``RegistryHost``."""
    insecure = set(args.insecure_registry)
    insecure.update(h for h in os.environ.get("PCD_INSECURE_REGISTRIES", "").split(",") if h)
    return {
        "insecure": host in insecure,
        "ca_file": args.ca_file,
        "username": args.username,
        "password": args.password,
    }


def registry_options() -> argparse.ArgumentParser:
    """A parent parser with the registry flags (for pull, push and run)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("registry")
    g.add_argument(
        "--insecure-registry", action="append", default=[], metavar="HOST:PORT",
        help="speak plain HTTP to this registry",
    )  # fmt: skip
    g.add_argument("--ca-file", help="trust this CA for the registry's TLS certificate")
    g.add_argument("--username", default=os.environ.get("PCD_REGISTRY_USERNAME", ""))
    g.add_argument("--password", default=os.environ.get("PCD_REGISTRY_PASSWORD", ""))
    return p


def _run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run a command in a new container", parents=[registry_options()])
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin attached")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--name", help="a name for the container")
    p.add_argument("-e", "--env", action="append", default=[], help="KEY=VALUE (or KEY)")
    p.add_argument("-v", "--volume", action="append", default=[], help="HOST:CTR[:ro]")
    p.add_argument("-p", "--publish", action="append", default=[], help="[IP:]HOST:CTR[/proto]")
    p.add_argument(
        "--network", "--net", default="bridge", help="bridge (default), host, none"
    )  # net.BRIDGE
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="USER[:GROUP] (names or ids)")
    p.add_argument("--hostname", help="container host name (default: its short id)")
    p.add_argument("--memory", "-m", help="memory limit, e.g. 512m")
    p.add_argument("--cpus", type=float, help="CPUs' worth of time, e.g. 1.5")
    p.add_argument("--privileged", action="store_true")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME)
    p.add_argument("--pull", choices=("missing", "never", "always"), default="missing")
    p.add_argument("--log-max-size", default="10m", help="rotate the log at this size")
    p.add_argument("--log-max-files", type=int, default=3)
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd("run", "cmd_run"), error_code=125)


def _containers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def ps_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("-a", "--all", action="store_true", help="also stopped containers")
        p.add_argument("-q", "--quiet", action="store_true", help="only ids")
        p.set_defaults(func=_cmd("containers", "cmd_ps"))

    def rm_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("-f", "--force", action="store_true", help="kill it first if running")
        p.add_argument("containers", nargs="+")
        p.set_defaults(func=_cmd("containers", "cmd_rm"))

    ps_args(sub.add_parser("ps", help="list containers"))
    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[])
    p.add_argument("-w", "--workdir")
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd("containers", "cmd_exec"), error_code=126)
    p = sub.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL)")
    p.add_argument("-t", "--time", type=float, default=10.0, help="grace period in seconds")
    p.add_argument("containers", nargs="+")
    p.set_defaults(func=_cmd("containers", "cmd_stop"))
    p = sub.add_parser("kill", help="send a signal to containers")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", nargs="+")
    p.set_defaults(func=_cmd("containers", "cmd_kill"))
    rm_args(sub.add_parser("rm", help="remove containers"))
    p = sub.add_parser("logs", help="show a container's output")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-t", "--timestamps", action="store_true")
    p.add_argument("-n", "--tail", type=int)
    p.add_argument("container")
    p.set_defaults(func=_cmd("containers", "cmd_logs"))
    p = sub.add_parser("inspect", help="show containers or images as JSON")
    p.add_argument("objects", nargs="+")
    p.set_defaults(func=_cmd("containers", "cmd_inspect"))
    container = sub.add_parser("container", help="manage containers")
    csub = container.add_subparsers(dest="container_command", required=True)
    ps_args(csub.add_parser("ls", aliases=["list", "ps"]))
    rm_args(csub.add_parser("rm", aliases=["remove"]))
    p = csub.add_parser("prune", help="remove every stopped container")
    p.add_argument("-f", "--force", action="store_true", help="accepted for docker parity")
    p.set_defaults(func=_cmd("containers", "cmd_prune"))


def _images(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reg = registry_options()
    p = sub.add_parser("pull", help="pull an image from a registry", parents=[reg])
    p.add_argument("reference")
    p.set_defaults(func=_cmd("images", "cmd_pull"), quick_pull=True)
    p = sub.add_parser("push", help="push an image to a registry", parents=[reg])
    p.add_argument("image")
    p.add_argument("target", nargs="?", help="push under this reference (default: its name)")
    p.set_defaults(func=_cmd("images", "cmd_push"))
    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("source")
    p.add_argument("target")
    p.set_defaults(func=_cmd("images", "cmd_tag"))
    p = sub.add_parser("load", help="import images from an OCI or docker archive")
    p.add_argument("-i", "--input", required=True)
    p.set_defaults(func=_cmd("images", "cmd_load"))
    p = sub.add_parser("save", help="export images to an OCI archive")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd("images", "cmd_save"))
    for name in ("images",):
        p = sub.add_parser(name, help="list images")
        p.add_argument("-q", "--quiet", action="store_true")
        p.set_defaults(func=_cmd("images", "cmd_images"))
    p = sub.add_parser("rmi", help="remove images")
    _rm_args(p)
    image = sub.add_parser("image", help="manage images")
    isub = image.add_subparsers(dest="image_command", required=True)
    p = isub.add_parser("ls", aliases=["list"], help="list images")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd("images", "cmd_images"))
    p = isub.add_parser("rm", aliases=["remove"], help="remove images")
    _rm_args(p)
    p = isub.add_parser("prune", help="remove untagged images (-a: every unused image)")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-f", "--force", action="store_true", help="accepted for docker parity")
    p.set_defaults(func=_cmd("images", "cmd_prune"))
    p = isub.add_parser("inspect", help="show an image's record and config")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd("images", "cmd_image_inspect"))
    for verb, fn in (("pull", _cmd("images", "cmd_pull")), ("push", _cmd("images", "cmd_push"))):
        p = isub.add_parser(verb, parents=[reg])
        p.add_argument("image" if verb == "push" else "reference")
        if verb == "push":
            p.add_argument("target", nargs="?")
        p.set_defaults(func=fn, quick_pull=verb == "pull")


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="even if a container uses it")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=_cmd("images", "cmd_rmi"))


def _system(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="print the daemon's events as they happen")
    p.add_argument(
        "filter", nargs="*", help='containerd filters, e.g. topic=="/tasks/exit" (any matches)'
    )
    p.set_defaults(func=_cmd("system", "cmd_events"))
    ns = sub.add_parser("namespace", aliases=["ns"], help="manage namespaces")
    nsub = ns.add_subparsers(dest="namespace_command", required=True)
    p = nsub.add_parser("ls", aliases=["list"])
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd("system", "cmd_ns_ls"))
    p = nsub.add_parser("create")
    p.add_argument("name")
    p.add_argument("labels", nargs="*", help="KEY=VALUE")
    p.set_defaults(func=_cmd("system", "cmd_ns_create"))
    p = nsub.add_parser("rm", aliases=["remove"])
    p.add_argument("names", nargs="+")
    p.set_defaults(func=_cmd("system", "cmd_ns_rm"))
