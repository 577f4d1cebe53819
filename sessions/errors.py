"""The server's exception tree and its one mapping to the wire.

::

    GroundloopError                 base of every error the server reports
    ├── ProtocolError               a client frame was refused (code: bad_request, too_large, ...)
    ├── AuthError                   refused before the upgrade (HTTP 401 / 403, close 4401 / 4403)
    └── LimitError                  busy / rate_limited (error frame + done ok:false)

Sandbox errors live in ``sandbox.base`` (``SandboxError`` > ``SandboxUnavailable``,
``SandboxLost``) and map to ``sandbox_unavailable``.

``ERROR_CODES`` is the table of protocol error codes; ``CLOSE_CODES`` the
WebSocket close codes the server uses. docs/protocol.md mirrors both.
"""

from __future__ import annotations

ERROR_CODES = {
    "bad_request": "the frame is not valid JSON, has an unknown type, or a field is missing, unknown or wrong",
    "unauthorized": "no token, or a token that is not configured",
    "forbidden": "the Origin is not allowed",
    "not_found": "no such session (or it belongs to another user), or no such request for cancel",
    "rate_limited": "the user's request rate is over the token bucket",
    "too_large": "the frame is over max_message_bytes",
    "busy": "too many requests in flight in this session, or too many sessions for this user",
    "sandbox_unavailable": "no sandbox could be started or reached",
    "llm_unavailable": "assist needs ANTHROPIC_API_KEY (or the model API is unreachable)",
    "draining": "this server is draining (shutting down): connect again, without `session`, to reach another",
    "internal": "a server bug; the message says what",
    "quota_exceeded": "the user's named workspaces are at their quota (docs/workspaces.md)",
}

# WebSocket close codes used by the server.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_SLOW_CONSUMER = 4408
CLOSE_TAKEN_OVER = 4409
CLOSE_TOO_MANY_SESSIONS = 4429
CLOSE_SESSION_CLOSED = 4410
CLOSE_DRAINING = 4503

CLOSE_CODES = {
    CLOSE_GOING_AWAY: "the server is shutting down",
    CLOSE_TOO_BIG: "a frame over the transport limit (2 x max_message_bytes)",
    CLOSE_INTERNAL: "internal error",
    CLOSE_RESTART: "the server is restarting",
    CLOSE_TRY_LATER: "no sandbox could be started; try again later",
    CLOSE_BAD_REQUEST: "bad resume parameters (last_seq past the last frame sent)",
    CLOSE_UNAUTHORIZED: "unauthorized (when the refusal could not happen before the upgrade)",
    CLOSE_FORBIDDEN: "forbidden origin (same)",
    CLOSE_NOT_FOUND: "no such session to resume",
    CLOSE_SLOW_CONSUMER: "the client did not read for send_timeout_s; the session stays resumable",
    CLOSE_TAKEN_OVER: "another connection resumed this session",
    CLOSE_SESSION_CLOSED: "the session was closed (idle, or its sandbox could not be replaced)",
    CLOSE_TOO_MANY_SESSIONS: "too many sessions for this user",
    CLOSE_DRAINING: "this server takes no new sessions (draining): connect again at once, the proxy picks another",
}


class GroundloopError(Exception):
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, id: object = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.id = id


class ProtocolError(GroundloopError):
    code = "bad_request"


class AuthError(GroundloopError):
    code = "unauthorized"

    @property
    def status(self) -> int:
        return 403 if self.code == "forbidden" else 401


class LimitError(GroundloopError):
    code = "busy"

    @property
    def name(self) -> str:
        return {"rate_limited": "RateLimited", "draining": "Draining"}.get(self.code, "Busy")
