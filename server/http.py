"""HTTP endpoints: /healthz, /readyz, /metrics, POST /v1/validate-code.

``validate-code`` runs the code once in a pristine sandbox of its own (taken
from the warm pool and removed afterwards, never one of the caller's live
sessions) and answers
``{"ok","output","error","results","formats","duration_ms","cached"}``.

Because the sandbox is pristine, a result depends only on the language, the
code and the image, never on anyone's files or variables: that is what makes
the one cache, keyed by ``code_key(language, code)``, safe to share between
users (a hit says ``"cached": true``). Serving it from a live session would
let one user read or poison another's result.

The endpoint is held to the same limits as a session (``SessionManager.
validation``): the user's token bucket, the per-user session cap (a running
validation holds a sandbox like a session does) and a server-wide cap on
concurrent validations, so that no user can drain the warm pool. The body is
read in chunks and refused as soon as it passes ``max_message_bytes``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
from groundloop.sandbox.base import Sandbox, SandboxError
from groundloop.sessions import logs
from groundloop.sessions.cache import code_key
from groundloop.sessions.errors import AuthError, LimitError
from groundloop.sessions.protocol import LANGUAGES, shown
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .metrics import CONTENT_TYPE

OUTPUT_MAX = 64 << 10
BODY_MAX = 4 << 20  # a validate-code body: code to check, not data (the WebSocket's frames may be larger)


def _gl(request: Request) -> Any:
    return request.app.state.groundloop


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def readyz(request: Request) -> Response:
    """Ready means "takes new sessions": 200; 503 while starting, with the backend unreachable, or
    with no warm sandbox while sandbox starts fail;
    404 while draining (HAProxy's ``http-check disable-on-404``: no new sessions, resumes still
    routed here). A warm pool that is short is not a reason: the next session starts cold, and
    the pool shows in ``pool_full``, the metrics and the GroundloopPoolShort alert."""
    gl = _gl(request)
    engine, manager = gl.engine, gl.manager
    if engine is None or manager is None:
        return JSONResponse({"ready": False, "reason": "starting"}, status_code=503)
    body: dict[str, Any] = {"engine": engine.status(), "pool_full": engine.pool_full, "sessions": len(manager.sessions)}
    if manager.draining or manager.closing:
        return JSONResponse({"ready": False, "draining": True, **body}, status_code=404)
    try:
        ready = await engine.ready()
    except Exception as exc:  # pragma: no cover - backend trouble
        return JSONResponse({"ready": False, "reason": str(exc)}, status_code=503)
    if not ready:
        return JSONResponse({"ready": False, "reason": "the sandbox backend is unreachable", **body}, status_code=503)
    if body["engine"]["pool_free"] == 0 and engine.last_error:
        # No warm sandbox and the last start failed (say, the image is missing on this node):
        # a new session would get sandbox_unavailable, so this server does not take one.
        reason = f"sandboxes fail to start: {engine.last_error}"
        return JSONResponse({"ready": False, "reason": reason, **body}, status_code=503)
    return JSONResponse({"ready": True, **body})


async def metrics(request: Request) -> Response:
    gl = _gl(request)
    if gl.settings.metrics_port:  # served on its own port, which the public proxy does not reach
        return Response("metrics are on GROUNDLOOP_METRICS_PORT", status_code=404, media_type="text/plain")
    return Response(gl.metrics.exposition(), media_type=CONTENT_TYPE)


async def validate_code(request: Request) -> Response:
    gl = _gl(request)
    try:
        user = gl.auth.http(request.headers, request.url.scheme)
    except AuthError as exc:
        gl.metrics.error(exc.code)
        return _error(exc.status, exc.code, exc.message)
    # The limits come first, so that a body is read and parsed only within them: at most
    # validate_concurrency bodies of BODY_MAX are in memory at once, whoever sends them.
    try:
        async with gl.manager.validation(user):
            return await _validate(gl, request, user)
    except LimitError as exc:
        gl.metrics.error(exc.code)
        return _error(503 if exc.code == "draining" else 429, exc.code, exc.message)


async def _validate(gl: Any, request: Request, user: str) -> Response:
    limit = min(gl.settings.max_message_bytes, BODY_MAX)
    body = await _read_body(request, limit)
    if body is None:
        gl.metrics.error("too_large")
        return _error(413, "too_large", f"the body is over {limit} bytes")
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _error(400, "bad_request", f"the body is not valid JSON: {exc}")
    if not isinstance(req, dict) or not isinstance(req.get("code"), str):
        return _error(400, "bad_request", "the body must be an object with `code` (a string)")
    language = req.get("language") or "python"
    if language not in LANGUAGES:
        return _error(400, "bad_request", f"unsupported language {shown(language)} (python or javascript)")
    code = req["code"]
    key = code_key(language, code)
    hit = gl.cache.get(key)
    if hit is not None:
        return JSONResponse({**hit, "cached": True})
    t0 = time.perf_counter()
    try:
        sb = await gl.engine.acquire()
        try:
            result = await run_once(gl, sb, code, language)
        finally:
            await gl.engine.release(sb)
    except SandboxError as exc:
        gl.metrics.error("sandbox_unavailable")
        return _error(503, "sandbox_unavailable", str(exc))
    seconds = time.perf_counter() - t0
    result["duration_ms"] = round(seconds * 1000, 3)
    outcome = "ok" if result["ok"] else "error"
    gl.metrics.request_done("validate_code", outcome, seconds)
    logs.audit(
        user=user,
        session="-",
        type="validate_code",
        text=code,
        outcome=outcome,
        duration_ms=seconds * 1000,
        language=language,
    )
    gl.cache.put(key, result)
    return JSONResponse({**result, "cached": False})


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``limit`` bytes.

    Starlette's ``request.body()`` reads the whole body before anyone can look
    at its size; this stops at the first chunk past the limit, so a huge body
    costs the server at most ``limit`` bytes plus one chunk.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def run_once(gl: Any, sb: Sandbox, code: str, language: str) -> dict[str, Any]:
    """Run ``code`` in a new context of ``sb``, then delete the context."""
    s = gl.settings.sandbox
    cid = f"validate-{secrets.token_hex(6)}"
    out: list[str] = []
    size = 0
    results: list[dict[str, Any]] = []
    ids: list[str | None] = []  # the display id of each result
    dropped: list[int] = []  # sizes of the results over the cap
    pending_clear = False

    # What a notebook would show at the end (docs/protocol.md section 12): an update replaces its display, a
    # clear_output drops what came before it. The cap counts everything received.
    def clear() -> None:
        nonlocal pending_clear
        out.clear()
        results.clear()
        ids.clear()
        pending_clear = False

    async def on_event(ev: dict[str, Any]) -> None:
        nonlocal size, pending_clear
        what = ev.get("ev")
        if what == "clear":
            if ev.get("wait"):
                pending_clear = True
            else:
                clear()
            return
        update = what == "result" and bool(ev.get("display_id")) and bool(ev.get("update"))
        if pending_clear and what in ("out", "result") and not update:
            clear()
        if what == "out":
            for line in ev.get("lines", ()):
                if size < OUTPUT_MAX:
                    out.append(line)
                    size += len(line)
        elif what == "result":
            # Results count against the same cap as output: the agent caps them too, but what it sends is
            # not trusted (under runsc the code can write to the agent's stream), and results are cached.
            data = ev.get("data") or {}
            cost = len(orjson.dumps(data))
            if size + cost > OUTPUT_MAX:
                dropped.append(cost)
            elif update:  # a display of this run, replaced (this context is new: there is no other)
                results[:] = [data if i == ev["display_id"] else r for r, i in zip(results, ids, strict=True)]
            else:
                results.append(data)
                ids.append(ev.get("display_id"))
            size += cost

    deadline = s.exec_timeout_s + 10
    created = await sb.request("create_context", {"language": language, "context": cid}, deadline_s=deadline)
    if not created.get("ok"):
        return {"ok": False, "output": "", "error": created.get("error"), "results": [], "formats": []}
    try:
        done = await sb.request(
            "run_code",
            {
                "code": code,
                "language": language,
                "context": cid,
                "timeout_s": s.exec_timeout_s,
                "max_output_bytes": OUTPUT_MAX,
            },
            on_event,
            deadline_s=deadline,
        )
    finally:
        if sb.alive:
            await _quiet(sb.request("delete_context", {"context": cid}, deadline_s=deadline))
    formats = sorted({k for data in results for k in data})
    return {
        "ok": bool(done.get("ok")),
        "output": "".join(out)[:OUTPUT_MAX],
        "error": done.get("error"),
        "results": results,
        "formats": formats,
        "truncated": bool(done.get("truncated") or dropped or size > OUTPUT_MAX),
    }


async def _quiet(aw: Any) -> None:
    try:
        await aw
    except Exception:
        pass
