"""Egress under policy: the host side of a sandbox's only way out.

A sandbox has no network interface but ``lo``. Its agent runs a small HTTP proxy on the
sandbox's loopback (``groundloop_agent/egress.py``) that, for every connection a program asks
for, opens the sandbox's ``egress.sock`` (a Unix socket in its run directory, sandbox/rundir.py)
and asks this side for ``host:port``. Here, outside the sandbox, the policy decides:

1. the sandbox must belong to a session (a warm sandbox in the pool has no owner: refused);
2. ``host:port`` must match the operator's allow-list (``GROUNDLOOP_EGRESS_ALLOW``) and, when the
   session gave one, the session's own list (it narrows, never widens: both must match);
3. the session must be under its limits (concurrent connections, bytes);
4. the name is resolved here, with the host's resolver, and every address that is not public
   (loopback, private, link-local, cloud metadata, multicast, reserved, CGNAT) is dropped unless
   ``GROUNDLOOP_EGRESS_ALLOW_PRIVATE`` admits the name or the address: no SSRF into the host's
   networks;
5. the connection goes to an address that was checked, never to the name again: a second
   resolution could answer differently (DNS rebinding).

The answer is one JSON line (``{"ok": true, "address": ...}`` or ``{"ok": false, "reason":
...}``); after an ok, bytes are spliced both ways and counted against the session's budget.
Every connection, refused or not, ends in one ``EgressRecord`` for the owner's observer (the
session layer writes it to the audit log and the metrics: this layer imports nothing above it).

Why hand-written rather than a proxy library (proxy.py, mitmproxy, Squid): a policy CONNECT
splice is ~200 lines of asyncio, while a library proxy resolves names itself, so pinning the
checked address per connection means patching its connect path; and the request arrives over a
per-sandbox Unix socket, not TCP, which none of them serve without a plugin. TLS is never
terminated here: a CONNECT tunnel carries the client's own TLS end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .settings import SettingsError

log = logging.getLogger("groundloop.sandbox")

DEFAULT_PORTS = (80, 443)  # an allow-list entry without a port
ASK_MAX = 4096  # bytes of the sandbox's one request line
ASK_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
CHUNK = 1 << 18
# A stream's buffer: asyncio pauses reading at twice this, so it sets the size of each read
# (8 KiB gave 27 MB/s through the splice, 256 KiB ... see docs/performance.md).
BUFFER = 1 << 18
# Cloud metadata endpoints: link-local or private already, named here so a refusal says what it was.
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}

# A host as asked for: a DNS name or an IP literal (IPv6 without brackets); anything else (a NUL, a
# space, a non-ASCII label) is refused before it reaches the resolver.
HOST_CHARS = re.compile(r"[a-z0-9_.:-]{1,253}")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# ---- policy (pure)


@dataclass(frozen=True)
class Rule:
    """One allow-list entry: a host name, ``*.suffix`` (any subdomain, not the suffix itself), or an
    IP literal; with a port, ``*`` for any port, or none for 80 and 443."""

    host: str
    ports: tuple[int, ...] | None  # None: any port

    @classmethod
    def parse(cls, text: str) -> Rule:
        raw = text.strip().lower()
        host, port = raw, ""
        if raw.startswith("["):  # [v6]:port
            end = raw.find("]")
            if end < 0:
                raise ValueError(f"bad egress rule {text!r}")
            host, port = raw[1:end], raw[end + 1 :].removeprefix(":")
        elif raw.count(":") == 1:
            host, port = raw.split(":")
        host = host.rstrip(".")
        if not host or " " in host or (host.startswith("*") and not host.startswith("*.")):
            raise ValueError(f"bad egress rule {text!r}: expected host, *.domain or an IP, with an optional :port")
        if port == "*":
            return cls(host, None)
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad egress rule {text!r}: bad port")
            return cls(host, (int(port),))
        return cls(host, DEFAULT_PORTS)

    def matches(self, host: str, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def parse_rules(entries: list[str] | tuple[str, ...]) -> tuple[Rule, ...]:
    return tuple(Rule.parse(e) for e in entries if e.strip())


def parse_admitted(entries: list[str] | tuple[str, ...]) -> tuple[tuple[Rule, ...], tuple[Network, ...]]:
    """``GROUNDLOOP_EGRESS_ALLOW_PRIVATE``: CIDRs (``10.0.0.0/8``: any name resolving there) and host
    rules (``index.internal``, ``127.0.0.2``: that name only, whatever it resolves to)."""
    names, nets = [], []
    for e in entries:
        e = e.strip()
        if not e:
            continue
        if "/" in e:
            nets.append(ipaddress.ip_network(e, strict=False))
        else:
            names.append(Rule(Rule.parse(e).host, None))
    return tuple(names), tuple(nets)


def normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def public(addr: Address) -> bool:
    """An address on the public internet (not loopback, private, link-local, multicast, CGNAT, ...)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)


def why_not_public(addr: Address) -> str:
    if addr in METADATA:
        return "a cloud metadata address"
    for attr in ("loopback", "link_local", "multicast", "private", "unspecified", "reserved"):
        if getattr(addr, "is_" + attr):
            return f"a {attr.replace('_', '-')} address"
    return "not a public address"


@dataclass(frozen=True)
class EgressPolicy:
    """What a sandbox may reach: the operator's rules, narrowed by a session's own."""

    allow: tuple[Rule, ...] = ()
    admitted_names: tuple[Rule, ...] = ()
    admitted_nets: tuple[Network, ...] = ()
    narrowed: tuple[Rule, ...] | None = None  # the session's list; None: the operator's list as is
    max_connections: int = 16
    max_bytes: int = 1 << 30

    @classmethod
    def from_settings(cls, settings) -> EgressPolicy:
        try:
            allow = parse_rules(settings.egress_allow)
        except ValueError as exc:
            raise SettingsError(f"GROUNDLOOP_EGRESS_ALLOW: {exc}") from None
        try:
            names, nets = parse_admitted(settings.egress_allow_private)
        except ValueError as exc:
            raise SettingsError(f"GROUNDLOOP_EGRESS_ALLOW_PRIVATE: {exc}") from None
        return cls(
            allow=allow,
            admitted_names=names,
            admitted_nets=nets,
            max_connections=settings.egress_max_connections,
            max_bytes=settings.egress_max_bytes,
        )

    @property
    def enabled(self) -> bool:
        """Whether any connection could be allowed (the operator's list is not empty)."""
        return bool(self.allow)

    def narrow(self, entries: list[str] | tuple[str, ...] | None) -> EgressPolicy:
        """This policy, limited to ``entries`` as well (None: unchanged; empty: nothing at all)."""
        if entries is None:
            return self
        rules = parse_rules(entries)
        if self.narrowed is not None:
            rules = tuple(r for r in rules if any(n.host == r.host for n in self.narrowed))
        return EgressPolicy(
            self.allow, self.admitted_names, self.admitted_nets, rules, self.max_connections, self.max_bytes
        )

    def refusal(self, host: str, port: int) -> str | None:
        """Why ``host:port`` may not be asked for at all (before any resolution), or None."""
        if not self.allow:
            return "egress is off on this server (GROUNDLOOP_EGRESS_ALLOW is empty)"
        if not any(r.matches(host, port) for r in self.allow):
            return f"{host}:{port} is not in the server's egress allow-list (GROUNDLOOP_EGRESS_ALLOW)"
        if self.narrowed is not None and not any(r.matches(host, port) for r in self.narrowed):
            return f"{host}:{port} is not in this session's egress list (the egress connect parameter)"
        return None

    def admits(self, host: str, addr: Address) -> bool:
        """A resolved address may be connected to: public, or admitted by the operator's override."""
        if public(addr):
            return True
        if any(r.matches(host, 0) for r in self.admitted_names):
            return True
        return any(addr in net for net in self.admitted_nets)


# ---- connections


@dataclass
class EgressRecord:
    """One connection asked for by a sandbox, as the audit log and the metrics see it."""

    user: str | None
    session: str | None
    host: str
    port: int
    verdict: str = "refused"  # allowed | refused | failed
    reason: str | None = None
    address: str | None = None
    bytes_out: int = 0  # sandbox -> remote
    bytes_in: int = 0  # remote -> sandbox
    seconds: float = 0.0


@dataclass
class EgressOwner:
    """The session a sandbox belongs to: its policy, its budget, and who hears of each connection.

    The budget is the session's: it carries over to a replacement sandbox."""

    user: str
    session: str
    policy: EgressPolicy
    observer: Callable[[EgressRecord], None] | None = None
    open: int = 0
    bytes: int = 0
    limited: set[int] = field(default_factory=set)


class EgressGate:
    """Listens on one sandbox's ``egress.sock``; each connection on it asks for one host:port."""

    def __init__(self, path: str, policy: EgressPolicy, resolver=None):
        self.path = path
        self.policy = policy  # the operator's, until a session binds the sandbox
        self.owner: EgressOwner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._resolve = resolver or self._getaddrinfo

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on ``sock`` (already bound: sandbox/rundir.py binds paths too long for an address), or on
        ``self.path``."""
        if sock is not None:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=BUFFER)
        else:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=BUFFER)

    def bind(self, owner: EgressOwner | None) -> None:
        self.owner = owner

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        # Connections that have not asked yet count too: a program that opens the socket
        # a thousand times and says nothing must not hold a thousand tasks.
        cap = 2 * (self.owner.policy.max_connections if self.owner else self.policy.max_connections) + 4
        if len(self._tasks) >= cap:
            writer.close()
            return
        self._tasks.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), ASK_TIMEOUT_S)
            if len(line) > ASK_MAX:
                raise ValueError("the request line is too long")
            ask = json.loads(line)
            host = normalise_host(str(ask["host"]))
            port = int(ask["port"])
            if not HOST_CHARS.fullmatch(host) or not 0 < port < 65536:
                raise ValueError("bad host or port")
        except (TimeoutError, ValueError, KeyError, TypeError, asyncio.LimitOverrunError):
            writer.write(b'{"ok": false, "reason": "bad egress request"}\n')
            return
        owner = self.owner
        rec = EgressRecord(owner.user if owner else None, owner.session if owner else None, host, port)
        try:
            if owner is None:
                rec.reason = "this sandbox belongs to no session yet"
                return
            rec.reason = owner.policy.refusal(host, port)
            if rec.reason is not None:
                return
            if owner.open >= owner.policy.max_connections:
                rec.reason = (
                    f"the session has {owner.open} egress connections open, the limit is {owner.policy.max_connections}"
                )
                return
            owner.open += 1  # taken before the first await: connections asking at once cannot all pass
            try:
                remote = await self._open(owner, rec)
                if remote is None:
                    return
                rec.verdict = "allowed"
                writer.write(json.dumps({"ok": True, "address": rec.address}).encode() + b"\n")
                await self._splice(owner, rec, reader, writer, *remote)
            finally:
                owner.open -= 1
        finally:
            if rec.verdict != "allowed":
                with contextlib.suppress(Exception):
                    writer.write(json.dumps({"ok": False, "reason": rec.reason}).encode() + b"\n")
                    await writer.drain()
            rec.seconds = time.monotonic() - t0
            self._report(owner, rec)

    async def _open(self, owner: EgressOwner, rec: EgressRecord):
        policy = owner.policy
        if owner.bytes >= policy.max_bytes:
            rec.reason = f"the session used its egress budget of {policy.max_bytes} bytes"
            return None
        try:
            addrs = [ipaddress.ip_address(rec.host)]  # an IP literal needs no resolver
        except ValueError:
            addrs = []
        try:
            addrs = addrs or await asyncio.wait_for(self._resolve(rec.host, rec.port), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:  # UnicodeError (a label over 63) is a ValueError
            rec.verdict, rec.reason = "failed", f"{rec.host} could not be resolved: {exc}"
            return None
        usable = [a for a in addrs if policy.admits(rec.host, a)]
        if not usable:
            first = addrs[0] if addrs else None
            what = why_not_public(first) if first is not None else "no address"
            resolved = "is" if str(first) == rec.host else f"resolves to {first},"
            rec.reason = (
                f"{rec.host} {resolved} {what}, which egress never reaches "
                "unless GROUNDLOOP_EGRESS_ALLOW_PRIVATE admits it"
            )
            return None
        last: Exception | None = None
        for addr in usable:  # the checked addresses themselves: the name is never resolved again
            try:
                remote = await asyncio.wait_for(
                    asyncio.open_connection(str(addr), rec.port, limit=BUFFER), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            rec.address = str(addr)
            return remote
        rec.verdict, rec.reason = "failed", f"could not connect to {rec.host}:{rec.port}: {last or 'timed out'}"
        return None

    @staticmethod
    async def _getaddrinfo(host: str, port: int) -> list[Address]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen: list[Address] = []
        for *_, sockaddr in infos:
            addr = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
            if addr not in seen:
                seen.append(addr)
        return seen

    async def _splice(self, owner, rec, sb_reader, sb_writer, remote_reader, remote_writer) -> None:
        """Copy both ways until either side ends or the session's byte budget is spent."""

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, outward: bool) -> None:
            # a write waits only past 1 MiB queued: bounded, and it keeps both ends busy
            dst.transport.set_write_buffer_limits(high=BUFFER * 4)
            try:
                while True:
                    data = await src.read(CHUNK)
                    if not data:
                        break
                    if owner.bytes + len(data) > owner.policy.max_bytes:
                        rec.reason = f"the session's egress budget of {owner.policy.max_bytes} bytes was spent"
                        owner.bytes = owner.policy.max_bytes  # what is left is too little to be of use
                        sb_writer.close()  # both ways end: the other pump reads EOF or fails
                        remote_writer.close()
                        break
                    owner.bytes += len(data)
                    if outward:
                        rec.bytes_out += len(data)
                    else:
                        rec.bytes_in += len(data)
                    dst.write(data)
                    await dst.drain()  # backpressure: no unbounded buffer on either side
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                pass

        up = asyncio.ensure_future(pump(sb_reader, remote_writer, True))
        down = asyncio.ensure_future(pump(remote_reader, sb_writer, False))
        try:
            # The remote's end ends the connection (a client may keep an idle proxy connection
            # open, which would hold one of the session's connections for nothing); the sandbox's
            # end is passed on as a half-close, and the remote's answer still comes back.
            await down
        finally:
            up.cancel()
            down.cancel()
            remote_writer.close()

    def _report(self, owner: EgressOwner | None, rec: EgressRecord) -> None:
        if owner is not None and owner.observer is not None:
            try:
                owner.observer(rec)
            except Exception:  # pragma: no cover - a bug in the observer must not break the splice
                log.exception("egress observer failed")
        elif rec.verdict != "allowed":
            log.info("egress refused for a sandbox with no session: %s:%d: %s", rec.host, rec.port, rec.reason)
