"""Published ports: the runtime's ``-p`` mappings as the ``portMappings`` CNI capability.

The ``portmap`` plugin reads ``runtimeConfig.portMappings`` (a list of ``{hostPort,
containerPort, protocol, hostIP}``) and installs DNAT rules for them; a ``hostIP`` of
``127.0.0.1`` works because the plugin also enables ``route_localnet`` on the bridge and
masquerades the hairpinned traffic. This module only validates and converts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from pycontainerd.errdefs import InvalidArgument

__all__ = ["PortMapping", "parse_publish", "to_capability"]

_PROTOCOLS = ("tcp", "udp", "sctp")


@dataclass(frozen=True, slots=True)
class PortMapping:
    """One published port; ``host_ip`` "" means every host address."""

    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        for what, port in (("host", self.host_port), ("container", self.container_port)):
            if not 0 < port < 65536:
                raise InvalidArgument(f"{what} port {port} out of range 1-65535")
        if self.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"protocol {self.protocol!r} not one of {_PROTOCOLS}")
        if self.host_ip:
            try:
                ipaddress.ip_address(self.host_ip)
            except ValueError as exc:
                raise InvalidArgument(f"host IP {self.host_ip!r}") from exc

    @classmethod
    def of(
        cls, value: PortMapping | tuple[str, int, int, str] | tuple[str, int, int]
    ) -> PortMapping:
        """Accept a mapping or a ``(host_ip, host_port, container_port[, proto])`` tuple."""
        if isinstance(value, PortMapping):
            return value
        if len(value) == 4:
            host_ip, host_port, container_port, proto = value
        elif len(value) == 3:
            host_ip, host_port, container_port = value
            proto = "tcp"
        else:
            raise InvalidArgument(f"port mapping {value!r}")
        return cls(str(host_ip or ""), int(host_port), int(container_port), str(proto).lower())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.protocol,
        }
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


_PUBLISH = re.compile(
    r"^(?:(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<ip>[0-9.]+)):)?"
    r"(?P<host>\d+):(?P<ctr>\d+)(?:/(?P<proto>[a-z]+))?$"
)


def parse_publish(spec: str) -> PortMapping:
    """Parse docker's ``-p`` forms ``[ip:]hostPort:containerPort[/proto]``."""
    m = _PUBLISH.match(spec.strip())
    if m is None:
        raise InvalidArgument(f"port publish {spec!r}: want [ip:]hostPort:containerPort[/proto]")
    host_ip = m.group("ip6") or m.group("ip") or ""
    return PortMapping(
        host_ip, int(m.group("host")), int(m.group("ctr")), m.group("proto") or "tcp"
    )


def to_capability(mappings: list[PortMapping]) -> list[dict[str, Any]]:
    """The ``portMappings`` capability value; rejects two mappings of one host port."""
    seen: set[tuple[str, int, str]] = set()
    for m in mappings:
        key = (m.host_ip, m.host_port, m.protocol)
        if key in seen:
            raise InvalidArgument(f"host port {m.host_port}/{m.protocol} published twice")
        seen.add(key)
    return [m.to_json() for m in mappings]
