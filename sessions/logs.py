"""Structured logs: one JSON line per event that matters, and the audit trail.

``event("connect", user=..., session=...)`` writes one JSON object to the
``groundloop`` logger; ``audit(...)`` one to ``groundloop.audit`` for every
execution (the SHA-256 of the code or command, never the code itself). Tokens
never reach these functions: callers pass user ids only.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from typing import Any

import orjson

log = logging.getLogger("groundloop")
audit_log = logging.getLogger("groundloop.audit")


def _line(event_name: str, fields: dict[str, Any]) -> str:
    record = {"ts": round(time.time(), 3), "event": event_name}
    record.update({k: v for k, v in fields.items() if v is not None})
    return orjson.dumps(record, default=str).decode()


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, _line(name, fields))


def audit(*, user: str, session: str, type: str, text: str, outcome: str, duration_ms: float, **extra: Any) -> None:
    """One audit line: ``text`` (the code or command) appears only as its SHA-256."""
    if audit_log.isEnabledFor(logging.INFO):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        audit_log.info(
            _line(
                "audit",
                {
                    "user": user,
                    "session": session,
                    "type": type,
                    "sha256": digest,
                    "outcome": outcome,
                    "duration_ms": round(duration_ms, 3),
                    **extra,
                },
            )
        )


def audit_event(name: str, **fields: Any) -> None:
    """An audit line that is not an execution (an egress connection: sessions/egress.py)."""
    if audit_log.isEnabledFor(logging.INFO):
        audit_log.info(_line(name, fields))


def setup(level: str = "info") -> None:
    """Plain message lines on stderr: each message already is a JSON object."""
    root = logging.getLogger("groundloop")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_groundloop", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._groundloop = True  # type: ignore[attr-defined]
        root.addHandler(handler)
