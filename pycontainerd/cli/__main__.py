"""``pcd``: the command line, argument parsing, and turning failures into one line.

Every command is an ``async def cmd_x(settings, args) -> int``. A domain error ends the
command with ``pcd: <message>`` on stderr and exit code 1 (125 for ``run``, 126 for
``exec``, 127 when the command to run was not found); ``run`` and ``exec`` otherwise
exit with the process's own code.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pycontainerd.cli.commands import DEFAULT_ADDRESS, build_parser
from pycontainerd.errdefs import PycdError, Unavailable

if TYPE_CHECKING:
    import argparse

__all__ = ["build_parser", "main"]


def _one_line(exc: BaseException, address: str) -> str:
    from pycontainerd.cli.state import describe

    text = describe(exc)
    if isinstance(exc, Unavailable) and "connect" in text and "pull" not in text:
        return f"cannot reach the daemon at {address}: {text}"
    return text


def _not_found_command(text: str) -> bool:
    text = text.lower()
    return "executable file not found" in text or (
        "exec" in text and "no such file or directory" in text
    )


def _quick_pull(args: argparse.Namespace) -> int | None:
    """``pcd pull`` through the daemon's Pull service without loading the SDK; None when
    the SDK must do it."""
    from pycontainerd.cli.quickpull import quick_pull

    address = args.address or os.environ.get("PCD_ADDRESS") or DEFAULT_ADDRESS
    namespace = args.namespace or os.environ.get("PCD_NAMESPACE") or "default"
    try:
        return quick_pull(address, namespace, args)
    except KeyboardInterrupt:
        return 130
    except (PycdError, OSError) as exc:
        print(f"pcd: {_one_line(exc, address)}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quick_pull", False):
        code = _quick_pull(args)
        if code is not None:
            return code
    import asyncio

    from pycontainerd.cli.state import Settings

    settings = Settings.from_env(args.address, args.namespace, args.data_root, args.exec_root)
    try:
        return int(asyncio.run(args.func(settings, args)))
    except KeyboardInterrupt:
        return 130
    except (PycdError, OSError, RuntimeError) as exc:
        message = _one_line(exc, settings.address)
        print(f"pcd: {message}", file=sys.stderr)
        if _not_found_command(message) and args.command_name in ("run", "exec"):
            return 127
        return int(getattr(args, "error_code", 1))


if __name__ == "__main__":
    sys.exit(main())
