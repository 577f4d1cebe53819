"""A session's egress: its narrowed policy on each sandbox it holds, and every connection audited.

The policy and the proxy's host side live in the sandbox layer (sandbox/egress.py); this module
binds a sandbox's gate to the session that holds it (user, session id, the session's own list
from the ``egress`` connect parameter) and turns each ``EgressRecord`` into one audit line and the
metrics. A sandbox in the warm pool has no owner, so nothing leaves it before a session has it.
"""

from __future__ import annotations

from typing import Any

from groundloop.sandbox.base import Sandbox
from groundloop.sandbox.egress import EgressOwner, EgressPolicy, EgressRecord, Rule

from . import logs

MAX_ENTRIES = 64


def parse_param(raw: str | None) -> list[str] | None:
    """The ``egress`` connect parameter: a comma list of allow-list entries (narrowing the server's),
    ``none`` or empty for no egress at all; absent: the server's list. Raises ValueError."""
    if raw is None:
        return None
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if entries == ["none"]:
        return []
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"egress: at most {MAX_ENTRIES} entries, got {len(entries)}")
    for e in entries:
        Rule.parse(e)  # raises with the entry named
    return entries


class SessionEgress:
    """One session's egress owner; bound to each sandbox the session gets (a replacement too)."""

    def __init__(self, *, user: str, session: str, sandbox_settings: Any, metrics: Any, narrow: list[str] | None):
        policy = EgressPolicy.from_settings(sandbox_settings).narrow(narrow)
        self.owner = EgressOwner(user=user, session=session, policy=policy, observer=self.observe)
        self.metrics = metrics

    def bind(self, sb: Sandbox) -> None:
        gate = getattr(sb, "egress", None)  # None: egress is off, or a backend without it (local)
        if gate is not None:
            gate.bind(self.owner)

    def describe(self) -> dict[str, Any]:
        p = self.owner.policy
        return {
            "enabled": p.enabled and p.narrowed != (),
            "max_connections": p.max_connections,
            "max_bytes": p.max_bytes,
        }

    def observe(self, rec: EgressRecord) -> None:
        logs.audit_event(
            "egress",
            user=rec.user,
            session=rec.session,
            host=rec.host,
            port=rec.port,
            address=rec.address,
            verdict=rec.verdict,
            reason=rec.reason,
            bytes_out=rec.bytes_out,
            bytes_in=rec.bytes_in,
            duration_ms=round(rec.seconds * 1000, 3),
        )
        egress_done = getattr(self.metrics, "egress_done", None)
        if egress_done is not None:
            egress_done(rec.verdict, rec.bytes_out, rec.bytes_in)
