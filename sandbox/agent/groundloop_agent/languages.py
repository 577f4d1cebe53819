"""The languages of code contexts: which this sandbox has, how each one's worker starts, how a cell is framed.

``python`` and ``javascript``/``typescript`` workers read one JSON line per cell
(pyworker.py, jsworker.js); ``bash`` reads NUL-separated fields (bashworker.py).
TypeScript runs in the JavaScript worker, which transpiles each cell with the
``typescript`` package when node can require it (Debian's node-typescript, in
the standard image); the minimal image has none, and says so at hello.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys

from . import bashworker
from .common import RequestError

HERE = os.path.dirname(os.path.abspath(__file__))
LANGUAGES = ("python", "javascript", "typescript", "bash")
# Where node's global require looks (``require("module").globalPaths`` of Debian's node, and npm -g).
NODE_PATHS = ("/usr/share/nodejs", "/usr/lib/nodejs", "/usr/local/lib/node_modules", "/usr/lib/node_modules")


def _typescript() -> bool:
    return any(os.path.isfile(os.path.join(d, "typescript", "package.json")) for d in NODE_PATHS)


@functools.cache
def available() -> tuple[str, ...]:
    """The languages this sandbox runs (said at hello; the image does not change under the agent)."""
    langs = ["python"]
    if shutil.which("node"):
        langs.append("javascript")
        if _typescript():
            langs.append("typescript")
    if shutil.which("bash"):
        langs.append("bash")
    return tuple(langs)


def check(language: str) -> None:
    """Raise the request error of a language this sandbox cannot run."""
    if language not in LANGUAGES:
        raise RequestError("LanguageUnavailable", f"unsupported language {language!r} ({', '.join(LANGUAGES)})")
    if language not in available():
        raise RequestError(
            "LanguageUnavailable",
            f"this sandbox image has no {language} (it runs {', '.join(available())}); "
            "the standard image profile has every language",
        )


def argv(language: str) -> list[str]:
    if language == "python":
        # -P: the worker's own folder (the agent's modules) must not shadow the user's modules.
        return [sys.executable, "-u", "-P", os.path.join(HERE, "pyworker.py")]
    if language == "bash":
        return bashworker.argv(shutil.which("bash") or "/bin/bash")
    return ["node", os.path.join(HERE, "jsworker.js")]


def worker_env(language: str) -> dict:
    """What a worker of ``language`` is told in its environment besides the context's."""
    return {"GROUNDLOOP_LANGUAGE": language} if language == "typescript" else {}


def cell(language: str, code: str, n: int, env: dict | None) -> bytes:
    """One cell's frame to its worker."""
    if language == "bash":
        return bashworker.cell(code, n, env)
    cmd: dict = {"code": code, "n": n}
    if env:
        cmd["env"] = env
    return json.dumps(cmd).encode() + b"\n"


def refuse(language: str, code: str) -> RequestError | None:
    """The request error of a cell its worker cannot be given."""
    why = bashworker.check(code) if language == "bash" else None
    return RequestError("BadRequest", why) if why else None
