"""`python -m bench [--smoke] [-n N]`: every benchmark in one run, one table."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform

from . import baselines, channels, contexts, egress, engine, files, floors, hostile, humaneval
from .stats import Table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--smoke", action="store_true", help="a few iterations: checks the benchmarks work")
    parser.add_argument("-n", type=int, default=2000, help="iterations of the round-trip loops")
    parser.add_argument(
        "--only",
        choices=["engine", "server", "channels", "contexts", "terminal", "hostile", "humaneval", "egress", "files"],
        default=None,
    )
    args = parser.parse_args()
    n = 20 if args.smoke else args.n
    table = Table()
    idle = floors.machine()
    print(
        f"groundloop bench on {platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}"
        + (f", {idle}" if idle else "")
    )
    run = asyncio.run
    try:  # the clients' own event loop: as fast as the server's
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        pass
    if args.only in (None, "engine"):
        run(engine.run(table, n))
        floors.attach_echo(table, n)
        channels.socket_echo(table, n)
        run(channels.engine_rows(table, n, args.smoke))
        baselines.jupyter(table, min(n, 1000))
    if args.only in (None, "server"):
        try:
            from . import server
        except ImportError as exc:  # pragma: no cover
            print(f"server benchmarks unavailable: {exc}")
        else:
            floors.ws_echo(table, n)
            run(server.run(table, n, smoke=args.smoke))
            run(channels.server_rows(table, n, args.smoke))
    if args.only == "channels":  # the rows of issue 15 alone
        floors.attach_echo(table, n)
        channels.socket_echo(table, n)
        run(channels.engine_rows(table, n, args.smoke))
        run(channels.server_rows(table, n, args.smoke))
    if args.only in (None, "server", "terminal"):
        from . import terminal

        run(terminal.run(table, n, smoke=args.smoke))
    if args.only in (None, "contexts"):
        run(contexts.run(table, smoke=args.smoke))
    if args.only in (None, "humaneval"):
        run(humaneval.run(table, smoke=args.smoke))
    if args.only in (None, "egress"):
        run(egress.run(table, smoke=args.smoke))
    if args.only in (None, "files"):
        run(files.run(table, n, smoke=args.smoke))
    if args.only in (None, "hostile"):
        run(hostile.run(table, n, smoke=args.smoke))
    print()
    print(table.render())


if __name__ == "__main__":
    main()
