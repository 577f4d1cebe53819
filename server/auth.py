"""Who is connecting: bearer tokens, the anonymous local user, and the Origin check.

A token comes from ``Authorization: Bearer <token>`` or, for browsers, from the
subprotocol list ``groundloop.v1, bearer.<token>``. Tokens map to user ids via
``settings.tokens`` (``tok:user`` items) and ``settings.tokens_file`` (one
``tok:user`` per line, ``#`` comments). With no tokens at all and a loopback
bind, everyone is the one anonymous user ``local``; a non-loopback bind without
tokens is refused at start-up (``check_startup``).

Origin: a request with an ``Origin`` header must name an allowed origin
(``settings.allowed_origins``, ``*`` for any; default the server's own origin,
``http(s)://<Host header>``). No Origin (editor extensions, CLIs) is allowed:
the token is what authenticates them.

DNS rebinding: a page on ``evil.example`` whose name is made to resolve to
127.0.0.1 reaches a loopback server with ``Host`` and ``Origin`` both naming
``evil.example``, so a Host-derived origin would match. With tokens that page
still needs a token (nothing here is ambient, like a cookie); anonymous mode has
no such second check, so there every request must name the server by a loopback
host name (``localhost``, ``127.x.y.z``, ``[::1]``) in ``Host``, or it is
refused (``forbidden``) before anything else, the Origin check included.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from groundloop.sandbox.engine import is_loopback
from groundloop.sandbox.settings import SettingsError
from groundloop.sessions.errors import AuthError
from groundloop.sessions.protocol import PROTOCOL

ANONYMOUS = "local"
BEARER_PREFIX = "bearer."


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header value: ``[::1]:8000`` -> ``::1``, ``localhost:80`` -> ``localhost``."""
    value = host_header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    name, _, _port = value.partition(":")
    return name


def parse_tokens(items: Iterable[str]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for raw in items:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, sep, user = line.rpartition(":")
        if not sep or not token or not user:
            raise SettingsError("a token entry must be `token:user`")
        tokens[token.strip()] = user.strip()
    return tokens


def load_tokens(settings: Any) -> dict[str, str]:
    tokens = parse_tokens(settings.tokens)
    if settings.tokens_file:
        try:
            with open(settings.tokens_file, encoding="utf-8") as f:
                tokens.update(parse_tokens(f.read().splitlines()))
        except OSError as exc:
            raise SettingsError(f"GROUNDLOOP_TOKENS_FILE: {exc}") from None
    return tokens


def check_startup(settings: Any, host: str | None = None) -> None:
    """Refuse a non-loopback bind without tokens."""
    host = settings.host if host is None else host
    if not load_tokens(settings) and not is_loopback(host):
        raise SettingsError(
            f"refusing to bind {host} without tokens: set GROUNDLOOP_TOKENS or "
            "GROUNDLOOP_TOKENS_FILE (anonymous access is for loopback only)"
        )


class Authenticator:
    def __init__(self, settings: Any):
        check_startup(settings)
        self.tokens = load_tokens(settings)
        self.anonymous = not self.tokens
        self.allowed = {o.strip().rstrip("/").lower() for o in settings.allowed_origins if o.strip()}

    def user_for(self, token: str | None) -> str:
        """The user of ``token``; AuthError(unauthorized) when it is missing or unknown."""
        if self.anonymous:
            return ANONYMOUS
        if not token:
            raise AuthError("a bearer token is required", code="unauthorized")
        user = None
        given = token.encode()
        for known, uid in self.tokens.items():  # compare against all: no early exit on a match
            if hmac.compare_digest(known.encode(), given):
                user = uid
        if user is None:
            raise AuthError("the token is not valid", code="unauthorized")
        return user

    @staticmethod
    def bearer(headers: Mapping[str, str]) -> str | None:
        value = headers.get("authorization") or ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None

    def websocket(self, headers: Mapping[str, str], subprotocols: list[str], scheme: str) -> tuple[str, str | None]:
        """(user, subprotocol to accept with) for a WebSocket upgrade; raises AuthError."""
        self.check_origin(headers, scheme)
        token = self.bearer(headers)
        if token is None:
            for sp in subprotocols:
                if sp.startswith(BEARER_PREFIX):
                    token = sp[len(BEARER_PREFIX) :]
                    break
        user = self.user_for(token)
        return user, (PROTOCOL if PROTOCOL in subprotocols else None)

    def http(self, headers: Mapping[str, str], scheme: str) -> str:
        self.check_origin(headers, scheme)
        return self.user_for(self.bearer(headers))

    def check_host(self, headers: Mapping[str, str]) -> None:
        """Anonymous mode answers loopback host names only (see the module docstring: DNS rebinding)."""
        if self.anonymous and not is_loopback(host_name(headers.get("host") or "")):
            raise AuthError(
                "without tokens the server answers loopback host names only (localhost, 127.0.0.1, [::1])",
                code="forbidden",
            )

    def check_origin(self, headers: Mapping[str, str], scheme: str) -> None:
        self.check_host(headers)
        origin = headers.get("origin")
        if origin is None:
            return
        origin = origin.strip().rstrip("/").lower()
        if self.allowed:
            if "*" in self.allowed or origin in self.allowed:
                return
        else:
            host = (headers.get("host") or "").lower()
            if host and origin in (f"http://{host}", f"https://{host}"):
                return
        raise AuthError("this Origin is not allowed to connect", code="forbidden")


class LoopbackHostOnly:
    """ASGI middleware for anonymous mode: every plain HTTP request (the page, /metrics, ...) must name a
    loopback host too, so a rebound name reads nothing; WebSocket upgrades are refused by their endpoint."""

    def __init__(self, app: Any, auth: Authenticator):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.auth.anonymous:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            try:
                self.auth.check_host({"host": host})
            except AuthError as exc:
                # the same body as the endpoints' own refusals (server/http.py)
                body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
                headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                await send({"type": "http.response.start", "status": exc.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
