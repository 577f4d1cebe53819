"""A callback that collects a request's streamed events (the ``collect`` fixture hands out the class), and the
agent tests' way to hold a sandbox of an engine and call it."""

from __future__ import annotations

import contextlib

AGENT_DEADLINE = 60.0  # the server's own guard: a request not answered by then means a stalled agent


class Collector:
    """Collects a request's streamed events."""

    def __init__(self):
        self.events: list[dict] = []

    async def __call__(self, ev: dict) -> None:
        self.events.append(ev)

    def text(self, stream: str = "stdout") -> str:
        return "".join(
            line for ev in self.events if ev.get("ev") == "out" and ev["s"] == stream for line in ev["lines"]
        )

    def lines(self, stream: str = "stdout") -> list[str]:
        return [line for ev in self.events if ev.get("ev") == "out" and ev["s"] == stream for line in ev["lines"]]

    def results(self) -> list[dict]:
        return [ev for ev in self.events if ev.get("ev") == "result"]


@contextlib.asynccontextmanager
async def sandbox_of(engine):
    """A sandbox of ``engine`` whose events outside requests go to ``sb.background`` (a Collector)."""
    sb = await engine.acquire()
    background = Collector()
    sb.set_listener(background)
    sb.background = background
    try:
        yield sb
    finally:
        await engine.release(sb)


async def call(sb, op: str, **params) -> tuple[dict, Collector]:
    """One op of the agent: its done, and its streamed events."""
    ev = Collector()
    done = await sb.request(op, params, ev, deadline_s=AGENT_DEADLINE)
    return done, ev
