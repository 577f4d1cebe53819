"""``groundloop``: serve, build the sandbox image, print the configuration table, run the MCP server."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from importlib.metadata import entry_points

from groundloop.sandbox.settings import SettingsError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from groundloop.sessions import logs

    from .app import create_app, uvicorn_config
    from .drain import DrainingServer
    from .settings import Settings

    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings.from_env(**overrides)
    logs.setup(settings.log_level)
    try:
        app = create_app(settings)  # refuses a non-loopback bind without tokens
    except SettingsError as exc:
        print(f"groundloop: {exc}", file=sys.stderr)
        return 2
    config = uvicorn_config(app, settings, log_level=settings.log_level, log_config=uvicorn.config.LOGGING_CONFIG)
    # Everything imported so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise walk it all (tens of ms under load).
    gc.collect()
    gc.freeze()
    # The first SIGTERM drains (server/drain.py): a fleet's proxy moves new sessions elsewhere
    # while running requests finish.
    DrainingServer(config, app.state.groundloop, settings.drain_s).run()
    return 0


def _image_build(args: argparse.Namespace) -> int:
    import logging

    from groundloop.sandbox import image
    from groundloop.sandbox.settings import SandboxSettings, load

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tag = args.tag or load(SandboxSettings).image
    t0 = time.monotonic()
    base = image.build(tag, from_registry=True if args.from_registry else None, profile=args.profile)
    size = image.size_of(tag)
    print(f"built {tag} (profile {args.profile}, {size / 1e6:.0f} MB) on {base} in {time.monotonic() - t0:.0f} s")
    return 0


def _config(args: argparse.Namespace) -> int:
    from groundloop.sandbox.settings import describe

    from .settings import Settings

    print("| Variable | Default | Meaning |")
    print("|---|---|---|")
    for name, default, doc in describe(Settings):
        if isinstance(default, (list, tuple)):
            shown = ",".join(map(str, default))
        else:
            shown = default
        print(f"| `{name}` | `{shown}` | {doc} |" if shown != "" else f"| `{name}` | | {doc} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groundloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (WebSocket /v1/ws, HTTP endpoints, demo page)")
    serve.add_argument("--host", help="bind address (default GROUNDLOOP_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="bind port (default GROUNDLOOP_PORT, 8000)")
    serve.set_defaults(func=_serve)
    img = sub.add_parser("image", help="the sandbox image")
    img_sub = img.add_subparsers(dest="image_command", required=True)
    build = img_sub.add_parser("build", help="build the sandbox image")
    build.add_argument("--tag", help="image tag (default GROUNDLOOP_SANDBOX_IMAGE)")
    build.add_argument("--from-registry", action="store_true", help="build on debian:bookworm-slim from a registry")
    build.add_argument(
        "--profile",
        default="standard",
        choices=("standard", "minimal"),
        help="standard: numpy, pandas, matplotlib, scipy, pillow, IPython, pip, TypeScript, npm; minimal: python3, node, git",
    )
    build.set_defaults(func=_image_build)
    cfg = sub.add_parser("config", help="print the configuration table (markdown)")
    cfg.set_defaults(func=_config)
    # Commands of the packages above the server (the MCP server is a client of it) come in by entry
    # point, so that server/ never imports from them (the layer rule, tests/test_layers.py).
    for command in entry_points(group="groundloop.commands"):
        command.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"groundloop: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
