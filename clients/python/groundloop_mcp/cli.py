"""``groundloop mcp``: the MCP server's subcommand, registered with the ``groundloop`` command by the entry
point ``groundloop.commands`` (pyproject), so that the server's CLI does not import this package."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add ``mcp`` to the ``groundloop`` command's subparsers."""
    mcp = sub.add_parser(
        "mcp",
        help="run a Model Context Protocol server holding one groundloop session (tools: code, shell, files, processes)",
    )
    mcp.add_argument(
        "--url",
        default=os.environ.get("GROUNDLOOP_URL"),
        help="groundloop server, ws://HOST:PORT/v1/ws (default GROUNDLOOP_URL; none: run a server in this process)",
    )
    mcp.add_argument(
        "--token", default=os.environ.get("GROUNDLOOP_TOKEN"), help="bearer token (default GROUNDLOOP_TOKEN)"
    )
    mcp.add_argument(
        "--transport", choices=["stdio", "http"], default="stdio", help="stdio (default) or streamable HTTP"
    )
    mcp.add_argument("--host", default="127.0.0.1", help="HTTP transport: bind address (default 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8765, help="HTTP transport: port (default 8765; path /mcp)")
    mcp.add_argument(
        "--max-output-chars", type=int, default=20_000, help="each output stream is cut to this, head and tail kept"
    )
    mcp.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        from groundloop.mcp.server import run
    except ImportError as exc:
        print(f"groundloop mcp needs the mcp extra: pip install 'groundloop[mcp]' ({exc})", file=sys.stderr)
        return 2
    return run(
        args.url,
        args.token,
        transport=args.transport,
        host=args.host,
        port=args.port,
        max_chars=args.max_output_chars,
    )
