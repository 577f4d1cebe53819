"""The ``assist`` request of a session: the assist runner wired to the session's outbox and sandbox.

``run_assist(session, r)`` is the handler of an ``assist`` request (it runs in
the request's task). It hands the runner (sessions/assist.py, the
``Assistant`` seam) two coroutines:

- ``emit(frame)``: a frame to the client, tagged with the request's id; it
  waits while the send queue is full (the backpressure reaches the model
  stream).
- ``execute(code, language, iteration)``: one ``run_code`` in the session's
  sandbox, its frames streamed with ``iteration``; returns ``ok``, the output
  tail (``OUTPUT_TAIL`` bytes), ``duration_ms``, ``error`` and ``truncated``
  when there are.

Without a model (no runner, or one that is not ``available``, or one that
raises ``llm_unavailable``) the request gets an ``llm_unavailable`` error frame
and ends ``ok: false`` ``LLMUnavailable``. Cancelling the task cancels the
runner, which cancels its executions (sessions/streaming.py stops the agent).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .inflight import InFlight
from .protocol import failure

if TYPE_CHECKING:
    from .session import Session

OUTPUT_TAIL = 8 << 10
TAIL_LINES = 512  # lines kept for the tail: enough for OUTPUT_TAIL bytes of short lines, bounded for long ones
UNAVAILABLE = "assist needs a model: set ANTHROPIC_API_KEY in the server's environment"


async def run_assist(session: Session, r: InFlight) -> dict[str, Any]:
    runner = session.manager.assist
    if runner is None or not getattr(runner, "available", False):
        await session.error("llm_unavailable", UNAVAILABLE, r.req.id)
        return {"ok": False, "error": failure("LLMUnavailable", UNAVAILABLE)}
    p = r.req.params
    language = p.get("language", "python")
    context = p.get("context")
    ops = session.ops

    async def emit(frame: dict[str, Any]) -> None:
        frame.setdefault("id", r.req.id)
        await session.outbox.put(frame)

    async def execute(code: str, language: str = language, iteration: int = 1) -> dict[str, Any]:
        params: dict[str, Any] = {
            "code": code,
            "language": language or "python",
            "timeout_s": ops.timeout(r),
            "max_output_bytes": session.settings.sandbox.max_output_bytes,
        }
        if context:
            params["context"] = context
        tail: deque[str] = deque(maxlen=TAIL_LINES)  # bounded whatever the sandbox sends
        t0 = time.perf_counter()
        done = await ops.request(r, "run_code", params, params["timeout_s"] + 10, {"iteration": iteration}, tail)
        out = {
            "ok": bool(done.get("ok")),
            "output": _tail(tail),
            "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
        }
        if done.get("error"):
            out["error"] = done["error"]
        if done.get("truncated"):
            out["truncated"] = True
        return out

    max_it = min(p.get("max_iterations", 3), session.settings.max_iterations)
    try:
        result = await runner.run(
            rid=r.req.id,
            prompt=p["prompt"],
            language=language,
            max_iterations=max_it,
            context=context,
            emit=emit,
            execute=execute,
            scope=session.user,
        )
    except Exception as exc:
        if getattr(exc, "code", None) != "llm_unavailable":
            raise
        await session.error("llm_unavailable", str(exc), r.req.id)
        return {"ok": False, "error": failure("LLMUnavailable", str(exc))}
    return dict(result)


def _tail(lines: Iterable[str]) -> str:
    text = "".join(lines)
    if len(text) > OUTPUT_TAIL:
        text = text[-OUTPUT_TAIL:]
    return text
