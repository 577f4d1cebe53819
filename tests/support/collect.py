"""A callback that collects a request's streamed events (the ``collect`` fixture hands out the class)."""

from __future__ import annotations


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
