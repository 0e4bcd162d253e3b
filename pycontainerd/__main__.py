"""Command line: ``pycontainerd serve`` runs the daemon, ``pycontainerd config default``
prints the complete default configuration."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import TYPE_CHECKING

from pycontainerd import config as configmod

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger("pycontainerd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pycontainerd", description="A container supervisor speaking containerd's API."
    )
    # Global, as containerd's: shims run `<publish-binary> --address A publish ...`.
    p.add_argument("--address", "-a", dest="global_address", help="daemon gRPC socket (publish)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", "-c", help="TOML config file (default: built-in defaults)")
    s.add_argument("--root", help="persistent state directory")
    s.add_argument("--state", help="runtime state directory")
    s.add_argument("--address", "-a", help="gRPC unix socket path")
    s.add_argument("--log-level", "-l", help="trace, debug, info, warn, error")
    pub = sub.add_parser("publish", help="publish an event (a serialized Any on stdin)")
    pub.add_argument("--namespace", required=True)
    pub.add_argument("--topic", required=True)
    c = sub.add_parser("config", help="configuration helpers")
    csub = c.add_subparsers(dest="config_command", required=True)
    csub.add_parser("default", help="print the default configuration")
    return p


def default_config_text() -> str:
    """The complete default configuration, including each plugin's table."""
    from pycontainerd.server.plugins import build_registry

    data = configmod.as_mapping(configmod.Config())
    plugins: dict[str, object] = {}
    for reg in build_registry(configmod.Config()):
        if reg.config is not None:
            plugins[reg.uri] = configmod.as_mapping(reg.config())
    data["plugins"] = plugins
    return configmod.to_toml(data)


def _publish(address: str, namespace: str, topic: str) -> int:
    """What shims call when they cannot reach the ttrpc socket: Events.Publish over gRPC."""
    import grpc
    from google.protobuf import any_pb2

    from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc

    payload = any_pb2.Any()
    payload.ParseFromString(sys.stdin.buffer.read())
    with grpc.insecure_channel("unix:" + address) as ch:
        try:
            events_pb2_grpc.EventsStub(ch).Publish(
                events_pb2.PublishRequest(topic=topic, event=payload),
                metadata=(("containerd-namespace", namespace),),
                timeout=10,
            )
        except grpc.RpcError as exc:
            print(f"pycontainerd publish: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "publish":
        address = args.global_address or configmod.DEFAULT_ADDRESS
        return _publish(address, args.namespace, args.topic)
    if args.command == "config":
        sys.stdout.write(default_config_text())
        return 0
    try:
        cfg = configmod.load(args.config)
        overrides: dict[str, object] = {}
        if args.root:
            overrides["root"] = args.root
        if args.state:
            overrides["state"] = args.state
        if args.address:
            overrides["grpc"] = dataclasses.replace(cfg.grpc, address=args.address)
        if args.log_level:
            overrides["debug"] = dataclasses.replace(cfg.debug, level=args.log_level)
        cfg = dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]
        from pycontainerd.server import logs

        logs.setup(cfg.debug.level, cfg.debug.format)
    except (configmod.ConfigError, ValueError) as exc:
        print(f"pycontainerd: {exc}", file=sys.stderr)
        return 2
    from pycontainerd.errdefs import PycdError
    from pycontainerd.server.main import serve

    try:
        return serve(cfg)
    except PycdError as exc:
        log.error("%s", exc)
        print(f"pycontainerd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
