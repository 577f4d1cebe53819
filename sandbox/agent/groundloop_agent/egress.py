"""The sandbox's HTTP proxy: its programs' only way out, and it decides nothing.

The sandbox has no network interface but ``lo``. When the server allows any egress it puts
``/run/groundloop/egress.sock`` in the sandbox's run directory before the container starts;
then this module listens on ``127.0.0.1:PROXY_PORT`` and the programs' environment points
``HTTP_PROXY``/``HTTPS_PROXY`` (and pip's and npm's own settings) at it. For each client
connection it reads one request head:

- ``CONNECT host:port``: asks the server (one JSON line on a fresh connection to egress.sock)
  for ``host:port``, answers ``200`` and then only moves bytes: TLS stays end to end;
- ``GET http://host[:port]/path`` (any method, an absolute URI): the same ask, then the request
  is sent on in origin form with ``Connection: close`` (one request per connection: a later
  request on a kept-alive connection could name another host).

The policy is the server's, outside the sandbox (sandbox/egress.py); this proxy is as untrusted
as the code beside it, and code that talks to egress.sock directly gets exactly the same answers.
A refusal becomes ``403`` with the server's reason in the status line and the body, which is
what pip, npm and curl print.

It runs on its own thread and event loop: a download must not delay the agent's frames.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from urllib.parse import urlsplit

SOCK = "/run/groundloop/egress.sock"
PROXY_PORT = 3128
HEAD_MAX = 64 * 1024
CHUNK = 1 << 18
BUFFER = 1 << 18  # a stream's buffer, and so the size of each read of the splice
USER_BASE = "/workspace/.local"


def install_env() -> dict[str, str]:
    """The programs' environment when egress is on: the proxy, and installs that land where the
    running contexts already look (user site-packages, /workspace/node_modules)."""
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    env = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = proxy
    # The sandbox's own servers stay direct: its loopback is not the host's.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = "localhost,127.0.0.1,::1"
    env.update(
        {
            "npm_config_proxy": proxy,
            "npm_config_https_proxy": proxy,
            "npm_config_noproxy": "localhost,127.0.0.1,::1",
            "npm_config_update_notifier": "false",
            "npm_config_audit": "false",
            "npm_config_fund": "false",
            "NODE_PATH": "/workspace/node_modules",  # jsworker's require resolves from its own directory
            # Debian's pip refuses to install (PEP 668); a user install into the workspace breaks nothing.
            "PIP_BREAK_SYSTEM_PACKAGES": "1",
            "PIP_USER": "1",
            "PYTHONUSERBASE": USER_BASE,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
    )
    return env


def user_site() -> str:
    return os.path.join(USER_BASE, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")


def start() -> dict[str, str]:
    """Start the proxy if this sandbox has an egress socket; returns the programs' extra environment."""
    if not os.path.exists(SOCK):
        return {}
    try:
        # Python adds the user site to sys.path at start only if the directory exists then: it must
        # exist before the first context starts, so that a later `pip install` is importable at once.
        os.makedirs(user_site(), exist_ok=True)
    except OSError as exc:
        print(f"groundloop agent: no user site-packages: {exc}", file=sys.stderr)
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            try:
                server = await asyncio.start_server(_client, "127.0.0.1", PROXY_PORT, limit=BUFFER)
            except OSError as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            async with server:
                await server.serve_forever()

        asyncio.run(main())

    threading.Thread(target=run, name="egress-proxy", daemon=True).start()
    ready.wait(10)
    if failure:
        print(f"groundloop agent: the egress proxy could not listen: {failure[0]}", file=sys.stderr)
        return {}
    return install_env()


def _status(code: int, reason: str, body: str = "") -> bytes:
    reason = "".join(c if 32 <= ord(c) < 127 else "?" for c in reason)[:300]
    data = (body or reason).encode() + b"\n"
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + data


def _target(method: str, uri: str) -> tuple[str, int, str]:
    """host, port and the origin-form path of a request (a CONNECT's path is empty)."""
    if method == "CONNECT":
        host, _, port = uri.rpartition(":")
        return host.strip("[]"), int(port), ""
    parts = urlsplit(uri)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("a proxy request needs an absolute http:// URI (use CONNECT for https)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.hostname, parts.port or 80, path


async def _ask(host: str, port: int):
    """Ask the server for host:port: (reader, writer) of the spliced connection, or the refusal's reason."""
    try:
        reader, writer = await asyncio.open_unix_connection(SOCK, limit=BUFFER)
    except OSError as exc:
        return None, f"the egress socket is unreachable: {exc}"
    writer.write(json.dumps({"host": host, "port": port}).encode() + b"\n")
    try:
        answer = json.loads(await reader.readuntil(b"\n"))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
        writer.close()
        return None, "the server closed the egress connection"
    if not answer.get("ok"):
        writer.close()
        return None, str(answer.get("reason") or "refused")
    return (reader, writer), None


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    upstream = None
    try:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        if len(head) > HEAD_MAX:
            writer.write(_status(431, "Request Header Fields Too Large"))
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, uri, version = lines[0].split(" ", 2)
            host, port, path = _target(method.upper(), uri)
        except ValueError as exc:
            writer.write(_status(400, "Bad Request", f"groundloop egress proxy: {exc}"))
            return
        upstream, reason = await _ask(host, port)
        if upstream is None:
            writer.write(
                _status(
                    403,
                    f"Forbidden by groundloop egress policy: {reason}",
                    f"groundloop egress policy refused {host}:{port}: {reason}",
                )
            )
            return
        up_reader, up_writer = upstream
        if method.upper() == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            kept = [
                h
                for h in lines[1:]
                if h
                and h.split(":", 1)[0].strip().lower() not in ("proxy-connection", "proxy-authorization", "connection")
            ]
            out = [f"{method} {path} {version}", *kept, "Connection: close", "", ""]
            up_writer.write("\r\n".join(out).encode("latin-1"))
        await _splice(reader, writer, up_reader, up_writer)
    except (ConnectionError, OSError):
        pass
    finally:
        if upstream is not None:
            upstream[1].close()
        writer.close()


async def _splice(a_reader, a_writer, b_reader, b_writer) -> None:
    async def pump(src, dst) -> None:
        # a write waits only past 1 MiB queued: bounded, and it keeps both ends busy
        dst.transport.set_write_buffer_limits(high=BUFFER * 4)
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            pass

    up = asyncio.ensure_future(pump(a_reader, b_writer))
    try:
        await pump(b_reader, a_writer)  # the server's end (the remote's) ends the connection
    finally:
        up.cancel()
