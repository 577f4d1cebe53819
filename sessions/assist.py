"""The grounded assist loop: model tokens and sandbox output, interleaved.

One ``AssistRunner`` per server. The session calls ``run()`` for each
``assist`` request, with an ``emit`` coroutine that sends a frame to the
client (awaiting it is the backpressure) and an ``execute`` coroutine that
runs code in the session's sandbox, streams its ``stdout``/``stderr``/
``result`` frames itself (tagged with the iteration), and returns
``{"ok", "output" (tail), "error"?, "duration_ms", "truncated"?}``.

A run is a sequence of tries, at most ``max_iterations`` (capped by
``settings.max_iterations``). One try:

1. ``messages.stream`` is called with the conversation so far. Each text
   delta is sent at once as a ``token`` frame (``text``, ``iteration``) and
   fed to an incremental ``CodeBlockParser``.
2. When a fenced block of the request's language closes (tag ``python``/
   ``py`` or ``javascript``/``js``; an untagged block is the request's
   language; other tags are never executed), a ``code`` frame is sent and
   the block is checked and executed at once, in a task, while the model
   keeps streaming: ``token`` and ``stdout`` frames interleave. Blocks of one
   reply run one after the other, in order. A block left open at the end of
   the stream is executed too (its syntax check catches a cut-off reply).
3. Checks before a run: the optional policy (``PolicyViolation``) and a
   syntax check (Python ``compile()``, JavaScript ``node --check``; skipped
   when node is not installed on the server, the sandbox then reports the
   error). A failed check is a failed try with the compiler's message, and
   the sandbox is not called.
4. When the stream has ended and the executions are over, the try's result
   is that of its LAST runnable block. An ``attempt`` frame (``iteration``,
   ``ok``, ``error``?, ``duration_ms``) closes every try that had code.

The loop ends when a try succeeds, when ``max_iterations`` tries have
failed, or when a reply has no runnable code block. A failed try (exception,
non-zero exit, timeout, policy, syntax error) is fed back as the next user
turn with the code, the error and the output tail (bounded, ``FEEDBACK_BYTES``).

``run()`` returns the extra fields of the ``done`` frame: ``ok`` (the last
executed try succeeded; a reply without any code at all is ``ok: true``),
``iterations`` (model calls made), ``code`` (the last executed block, or
None), ``output`` (its output tail), ``error`` (when not ok), ``usage``
(``input_tokens``, ``output_tokens``), ``timings`` (``ttft_ms`` of the first
call, ``generation_ms`` and ``execution_ms`` summed over the run), and
``cached: true`` on a cache hit. The cache (only with a ``cache`` given,
only for runs without a ``context``) holds the final code of a successful
run, keyed by the user (``scope``), the language and the prompt: a hit skips
the model but runs that code again in the caller's own session, so its
output is never another session's (the code was written from this user's
own feedback, and it reads this session's files). A hit whose run fails is
answered as it is and evicted, so the next request asks the model.

Model errors (overloaded, rate limited, authentication, network), after the
SDK's own retries, end the run with ``ok: false`` and an error named
``ModelOverloaded``, ``ModelRateLimited``, ``ModelAuthError``,
``ModelUnreachable``, ``ModelBadRequest`` or ``ModelError``; executions
still running are cancelled. Sandbox errors raised by ``execute`` propagate.

Cancellation: cancelling the task that runs ``run()`` closes the model
stream at once (the SDK's stream context manager closes the HTTP response),
cancels the executions (so ``execute`` interrupts the sandbox), and
``CancelledError`` propagates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .cache import ResultCache, code_key
from .codeblocks import CodeBlock, CodeBlockParser, normalize_language
from .policy import Policy
from .syntax import check_syntax

log = logging.getLogger("groundloop.assist")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Execute = Callable[[str, str, int], Awaitable[dict[str, Any]]]

DEFAULT_ITERATIONS = 3
FEEDBACK_BYTES = 4096  # output tail fed back to the model
FEEDBACK_CODE_BYTES = 16384
FEEDBACK_TRACEBACK_BYTES = 2048
UNAVAILABLE_MESSAGE = (
    "assist needs a model: set ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for another "
    "Anthropic-compatible endpoint) in the server's environment and restart it"
)
LANG_TAGS = {"python": "python", "javascript": "javascript"}
LANG_NAMES = {"python": "Python 3", "javascript": "JavaScript (Node.js)"}

SYSTEM_PROMPT = """You are a coding assistant whose code is executed for real. \
Every {tag} code block you write is run at once in a sandbox (a Linux container), \
and the user watches its output live.
- Write {name}. Put the program in a fenced code block tagged ```{tag}. \
The last complete code block of your reply is the one that counts, so end with the full program.
- Print what the user needs to see to stdout. Keep explanations short.
- Code runs in a persistent session: variables, imports and files from earlier runs may still exist.
- If the code fails, you will be shown the error and the end of its output; then reply with a complete \
corrected program in one code block."""


class LLMUnavailable(Exception):
    """No model is configured (protocol code ``llm_unavailable``)."""

    code = "llm_unavailable"


class ModelError(Exception):
    """A model call failed after the SDK's retries; becomes the ``done`` error."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message

    def as_error(self) -> dict[str, str]:
        return {"name": self.name, "message": self.message}


_MODEL_ERRORS = {
    "overloaded_error": ("ModelOverloaded", "the model API is overloaded"),
    "rate_limit_error": ("ModelRateLimited", "the model API rate limit was hit"),
    "authentication_error": ("ModelAuthError", "the model API refused the credentials (check ANTHROPIC_API_KEY)"),
    "permission_error": ("ModelAuthError", "the model API key lacks permission"),
    "invalid_request_error": ("ModelBadRequest", "the model API rejected the request"),
    "not_found_error": ("ModelBadRequest", "the model API does not know this model or endpoint"),
    "request_too_large": ("ModelBadRequest", "the request is too large for the model API"),
    "api_error": ("ModelError", "the model API failed"),
}
_STATUS_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def model_error(exc: BaseException) -> ModelError:
    """Map an SDK (or transport) exception to a named, readable ``ModelError``."""
    import anthropic

    if isinstance(exc, anthropic.APIConnectionError):
        kind = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "could not be reached"
        return ModelError("ModelUnreachable", f"the model API {kind} (check ANTHROPIC_BASE_URL): {exc}")
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        found = body.get("error")
        err: dict[str, Any] = found if isinstance(found, dict) else {}
        etype = err.get("type") or _STATUS_TYPES.get(exc.status_code) or "api_error"
        name, what = _MODEL_ERRORS.get(etype, ("ModelError", "the model API failed"))
        where = "in the middle of the stream" if exc.status_code == 200 else f"HTTP {exc.status_code}"
        detail = err.get("message") or str(exc)
        return ModelError(name, f"{what} ({where}, {etype}): {detail}")
    return ModelError("ModelUnreachable", f"the model stream broke: {type(exc).__name__}: {exc}")


def tail(text: str, limit: int) -> str:
    """The last ``limit`` bytes of ``text`` (UTF-8), marked when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return f"[... {len(data) - limit} bytes cut ...]\n" + data[-limit:].decode("utf-8", "ignore")


def feedback_message(code: str, language: str, result: dict[str, Any]) -> str:
    """The user turn that reports a failed try to the model. Bounded in size."""
    tag = LANG_TAGS[language]
    err = result.get("error") or {}
    parts = ["I ran your code and it failed."]
    if err:
        parts.append(f"Error: {err.get('name', 'Error')}: {err.get('message', '')}")
        if err.get("traceback"):
            parts.append(
                "Traceback:\n```\n" + tail(str(err["traceback"]), FEEDBACK_TRACEBACK_BYTES).rstrip("\n") + "\n```"
            )
    output = result.get("output") or ""
    if output:
        parts.append("End of its output:\n```\n" + tail(output, FEEDBACK_BYTES).rstrip("\n") + "\n```")
    elif result.get("ran"):
        parts.append("It printed nothing.")
    parts.append(f"The code was:\n```{tag}\n" + tail(code, FEEDBACK_CODE_BYTES).rstrip("\n") + "\n```")
    parts.append(f"Fix it and reply with the complete corrected program in one ```{tag} code block.")
    return "\n\n".join(parts)


def attempt_frame(rid: str, iteration: int, result: dict[str, Any]) -> dict[str, Any]:
    """The ``attempt`` frame that closes a try with ``result`` (a checked and executed block's)."""
    frame: dict[str, Any] = {
        "type": "attempt",
        "id": rid,
        "iteration": iteration,
        "ok": result["ok"],
        "duration_ms": round(result.get("duration_ms") or 0.0, 3),
    }
    if not result["ok"]:
        frame["error"] = result.get("error") or {"name": "Error", "message": "the code failed"}
    return frame


class _Try:
    """The blocks of one reply and their executions, run in order."""

    def __init__(self, iteration: int):
        self.iteration = iteration
        self.tasks: list[asyncio.Task[dict[str, Any]]] = []
        self.blocks: list[CodeBlock] = []

    @property
    def has_code(self) -> bool:
        return bool(self.tasks)


class AssistRunner:
    """Runs ``assist`` requests. See the module docstring for the contract."""

    def __init__(self, settings: Any, metrics: Any, client: Any = None, *, cache: ResultCache | None = None):
        self.settings = settings
        self.metrics = metrics
        self._client = client
        self._own_client = False
        self.policy = Policy(list(getattr(settings, "policy_patterns", None) or []))
        self.cache = cache

    # ---- the model client

    @property
    def available(self) -> bool:
        """False without a client and without a key in the environment."""
        if self._client is not None:
            return True
        return bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN"))

    def client(self) -> Any:
        """The injected client, or one built from the SDK's own environment."""
        if self._client is None:
            if not self.available:
                raise LLMUnavailable(UNAVAILABLE_MESSAGE)
            import anthropic

            self._client = anthropic.AsyncAnthropic()
            self._own_client = True
        return self._client

    async def aclose(self) -> None:
        """Close a client this runner built (an injected one belongs to its owner)."""
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None
            self._own_client = False

    # ---- one request

    async def run(
        self,
        *,
        rid: str,
        prompt: str,
        language: str,
        max_iterations: int | None,
        context: str | None,
        emit: Emit,
        execute: Execute,
        scope: str = "",
    ) -> dict[str, Any]:
        language = normalize_language(language or "", "python") or ""
        if language not in LANG_TAGS:
            raise ValueError("assist supports language python or javascript")
        client = self.client()
        cap = max(1, int(self.settings.max_iterations))
        tries = max(1, min(int(max_iterations or DEFAULT_ITERATIONS), cap))

        key = code_key(language, prompt, "assist", scope)
        if self.cache is not None and context is None:
            hit = self.cache.get(key)
            if hit is not None:
                return await self._rerun(key, hit, language, rid, emit, execute)

        usage = {"input_tokens": 0, "output_tokens": 0}
        timings: dict[str, Any] = {"ttft_ms": None, "generation_ms": 0.0, "execution_ms": 0.0}
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        system = SYSTEM_PROMPT.format(tag=LANG_TAGS[language], name=LANG_NAMES[language])
        last: dict[str, Any] | None = None  # the result of the last try that had code
        iterations = 0
        current: _Try | None = None
        try:
            for iteration in range(1, tries + 1):
                iterations = iteration
                current = _Try(iteration)
                try:
                    reply = await self._generate(
                        client, system, messages, language, current, rid, emit, execute, usage, timings
                    )
                except ModelError as exc:
                    await self._reap(current)
                    self._iterations_metric(iteration)
                    return self._fields(False, iterations, last, exc.as_error(), usage, timings)
                if not current.has_code:
                    break
                results = await asyncio.gather(*current.tasks)
                last = results[-1]
                timings["execution_ms"] += sum(r.get("duration_ms") or 0.0 for r in results)
                await emit(attempt_frame(rid, iteration, last))
                if last["ok"]:
                    break
                messages.append({"role": "assistant", "content": reply})
                messages.append({"role": "user", "content": feedback_message(last["code"], language, last)})
        finally:
            if current is not None:
                await self._reap(current)
        ok = last is None or bool(last["ok"])
        self._iterations_metric(iterations)
        error = None if ok else last and last.get("error")
        if error and "kind" not in error:  # the model's code failed a syntax check: the code's error
            error = {**error, "kind": "user"}
        fields = self._fields(ok, iterations, last, error, usage, timings)
        if ok and last is not None and self.cache is not None and context is None:
            self.cache.put(key, {"code": last["code"], "iterations": iterations})
        return fields

    async def _rerun(
        self, key: str, hit: dict[str, Any], language: str, rid: str, emit: Emit, execute: Execute
    ) -> dict[str, Any]:
        """A cache hit: the cached code runs again in the caller's session, the model is skipped."""
        iteration = hit["iterations"]
        await emit(
            {
                "type": "code",
                "id": rid,
                "code": hit["code"],
                "language": language,
                "iteration": iteration,
                "cached": True,
            }
        )
        res = await self._check_and_execute(None, hit["code"], language, iteration, execute)
        attempt = attempt_frame(rid, iteration, res)
        if not res["ok"]:
            assert self.cache is not None  # a hit came from it
            self.cache.pop(key)
        await emit(attempt)
        timings = {"ttft_ms": None, "generation_ms": 0.0, "execution_ms": res.get("duration_ms") or 0.0}
        fields = self._fields(
            res["ok"],
            iteration,
            res,
            None if res["ok"] else attempt["error"],
            {"input_tokens": 0, "output_tokens": 0},
            timings,
        )
        fields["cached"] = True
        return fields

    @staticmethod
    def _fields(
        ok: bool,
        iterations: int,
        last: dict[str, Any] | None,
        error: dict[str, Any] | None,
        usage: dict[str, int],
        timings: dict[str, Any],
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "ok": ok,
            "iterations": iterations,
            "code": last["code"] if last else None,
            "output": last.get("output", "") if last else "",
            "usage": dict(usage),
            "timings": {k: (round(v, 3) if v is not None else None) for k, v in timings.items()},
        }
        if not ok:
            fields["error"] = error or {"name": "Error", "message": "the code failed"}
        if last and last.get("truncated"):
            fields["truncated"] = True
        return fields

    # ---- one model call

    async def _generate(
        self,
        client: Any,
        system: str,
        messages: list[dict[str, Any]],
        language: str,
        current: _Try,
        rid: str,
        emit: Emit,
        execute: Execute,
        usage: dict[str, int],
        timings: dict[str, Any],
    ) -> str:
        """Stream one reply; start executions as blocks close; return the reply's text."""
        parser = CodeBlockParser()
        iteration = current.iteration
        pieces: list[str] = []
        t0 = time.monotonic()
        first: float | None = None
        manager = client.messages.stream(
            model=self.settings.model, max_tokens=self.settings.max_tokens, system=system, messages=messages
        )
        # SDK errors are told apart from errors of emit/execute: only the former are model errors.
        try:
            try:
                stream = await manager.__aenter__()
            except Exception as exc:
                raise model_error(exc) from exc
            try:
                while True:
                    try:
                        event = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as exc:
                        raise model_error(exc) from exc
                    if event.type != "text" or not event.text:
                        continue
                    if first is None:
                        first = time.monotonic()
                        if timings["ttft_ms"] is None:
                            timings["ttft_ms"] = (first - t0) * 1000
                    pieces.append(event.text)
                    await emit({"type": "token", "id": rid, "text": event.text, "iteration": iteration})
                    for block in parser.feed(event.text):
                        await self._on_block(block, language, current, rid, emit, execute)
                final = await stream.get_final_message()
            finally:
                # Closes the HTTP response at once, also when the task is being cancelled.
                await manager.__aexit__(None, None, None)
        except ModelError:
            self._model_metrics(t0, first, 0, 0)
            raise
        for block in parser.finish():
            await self._on_block(block, language, current, rid, emit, execute)
        timings["generation_ms"] += (time.monotonic() - t0) * 1000
        u = getattr(final, "usage", None)
        n_in = int(getattr(u, "input_tokens", 0) or 0)
        n_out = int(getattr(u, "output_tokens", 0) or 0)
        usage["input_tokens"] += n_in
        usage["output_tokens"] += n_out
        self._model_metrics(t0, first, n_in, n_out)
        return "".join(pieces)

    def _model_metrics(self, t0: float, first: float | None, n_in: int, n_out: int) -> None:
        """One model call ended: time to first token, generation time, tokens."""
        now = time.monotonic()
        self.metrics.model_call_done(None if first is None else first - t0, now - t0, n_in, n_out)

    def _iterations_metric(self, n: int) -> None:
        self.metrics.assist_done(n)

    async def _on_block(
        self, block: CodeBlock, language: str, current: _Try, rid: str, emit: Emit, execute: Execute
    ) -> None:
        if normalize_language(block.tag, language) != language or not block.code.strip():
            return  # another language, output samples, shell snippets: shown, not run
        await emit(
            {
                "type": "code",
                "id": rid,
                "code": block.code,
                "language": language,
                "iteration": current.iteration,
                "block": block.index,
            }
        )
        prev = current.tasks[-1] if current.tasks else None
        current.blocks.append(block)
        current.tasks.append(
            asyncio.create_task(
                self._check_and_execute(prev, block.code, language, current.iteration, execute),
                name=f"assist-exec-{rid}-{current.iteration}-{block.index}",
            )
        )

    # ---- checks and execution

    async def _check_and_execute(
        self, prev: asyncio.Task | None, code: str, language: str, iteration: int, execute: Execute
    ) -> dict[str, Any]:
        if prev is not None:
            await asyncio.wait([prev])  # blocks of one reply run in order; prev's outcome is its own
        t0 = time.monotonic()
        base = {"code": code, "language": language}
        reason = self.policy.check(code, language)
        if reason is not None:
            return dict(
                base,
                ok=False,
                output="",
                duration_ms=0.0,
                ran=False,
                error={"name": "PolicyViolation", "message": reason, "kind": "request"},
            )
        syntax = await check_syntax(code, language)
        if syntax is not None:
            return dict(base, ok=False, output="", ran=False, duration_ms=(time.monotonic() - t0) * 1000, error=syntax)
        res = await execute(code, language, iteration)
        out = dict(
            base,
            ok=bool(res.get("ok")),
            output=res.get("output") or "",
            ran=True,
            duration_ms=float(res.get("duration_ms") or (time.monotonic() - t0) * 1000),
        )
        if res.get("error"):
            out["error"] = res["error"]
        elif not out["ok"]:
            out["error"] = {"name": "Error", "message": "the code failed"}
        if res.get("truncated"):
            out["truncated"] = True
        return out

    @staticmethod
    async def _reap(current: _Try) -> None:
        """Cancel the executions still running (after a model error or a cancel) and wait for them."""
        pending = [t for t in current.tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        # Retrieve exceptions of finished tasks so none is reported as never retrieved.
        for t in current.tasks:
            if t.done() and not t.cancelled():
                t.exception()
