"""``pcd``: the command line, argument parsing, and turning failures into one line.

Every command is an ``async def cmd_x(settings, args) -> int``. A domain error ends the
command with ``pcd: <message>`` on stderr and exit code 1 (125 for ``run``, 126 for
``exec``, 127 when the command to run was not found); ``run`` and ``exec`` otherwise
exit with the process's own code.
"""

from __future__ import annotations

import asyncio
import sys

from pycontainerd.cli.commands import build_parser
from pycontainerd.cli.state import Settings, describe
from pycontainerd.errdefs import PycdError, Unavailable

__all__ = ["build_parser", "main"]


def _one_line(exc: BaseException, address: str) -> str:
    text = describe(exc)
    if isinstance(exc, Unavailable) and "connect" in text and "pull" not in text:
        return f"cannot reach the daemon at {address}: {text}"
    return text


def _not_found_command(text: str) -> bool:
    text = text.lower()
    return "executable file not found" in text or (
        "exec" in text and "no such file or directory" in text
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
