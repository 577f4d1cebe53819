"""groundloop Python worker: one persistent namespace, driven by the agent.

Commands arrive as JSON lines on fd GROUNDLOOP_CMD_FD (``{"code":..,"n":..}``);
answers leave as JSON lines on fd GROUNDLOOP_RES_FD: zero or more
``{"t":"result","data":{mime: value},"main":bool}`` then one
``{"t":"done","ok":bool,"error"?:{name,message,traceback}}``.
The user's stdout and stderr are this process's own fds 1 and 2 (pipes read by
the agent), unbuffered, so every line leaves as it is written. Everything is
flushed before an answer is written, which is what lets the agent order output
before results.
"""

import ast
import base64
import builtins
import io
import json
import linecache
import os
import sys
import traceback
import types

# What a zygote imports before it forks workers (zygote.py): the modules most cells import, so a
# forked worker has them already. Nothing that starts a thread (a fork keeps only the forking
# thread). Extend it here: one tuple, read by the zygote at its start. These take ~0.1 s and 2 MiB.
# IPython is not in it while the worker does not use it: measured in the standard image, importing it
# takes 1.5 to 2 s of CPU (on this shared machine) and 40 MiB more in every zygote, i.e. in every
# sandbox the warm pool starts. Once cells run through InteractiveShell, add "IPython" here: each
# context then forks with it loaded instead of importing it at its first cell.
PRELOAD = (
    "json", "re", "math", "random", "collections", "itertools", "functools", "operator", "string",
    "typing", "dataclasses", "enum", "heapq", "bisect", "copy", "fractions", "decimal", "statistics",
    "datetime", "hashlib", "textwrap", "inspect", "traceback", "linecache", "io", "ast", "base64",
)  # fmt: skip

CMD_FD = RES_FD = -1
NS: dict = {}
_STDIO: dict = {}
_STREAMS: dict = {}


def preload(names=PRELOAD):
    """Import ``names`` (the zygote, before its first fork); one that fails is skipped."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module the image lacks
            pass


def start(cmd_fd, res_fd):
    """Become the worker: a fresh ``__main__`` namespace on the given pipes. Run once per process,
    at its start (``python pyworker.py``) or in a zygote's child right after the fork."""
    global CMD_FD, RES_FD, NS, FORKED, _STDIO, _STREAMS
    CMD_FD, RES_FD = cmd_fd, res_fd
    try:  # the first to go when the sandbox runs out of memory
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_module
    NS = main_module.__dict__
    sys.argv = [""]
    if "" not in sys.path:
        sys.path.insert(0, "")
    # Copies of the cell's stdio, to give every cell back what an earlier one closed or redirected
    # (os.close(1), os.dup2(x, 1), sys.stdout.close()), as Jupyter's kernels do. Not inherited.
    _STDIO = {fd: os.dup(fd) for fd in (0, 1, 2)}
    _STREAMS = {"stdout": sys.stdout, "stderr": sys.stderr}
    FORKED = False
    os.register_at_fork(after_in_child=_forked)


def restore_stdio():
    flush_stdio()  # what the cell wrote goes where the cell sent it
    for fd, saved in _STDIO.items():
        try:
            os.dup2(saved, fd)
        except OSError:
            pass
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        if stream is not None and not getattr(stream, "closed", False):
            continue
        orig = _STREAMS[name]
        if orig.closed:  # a new one on the same descriptor, line by line as python -u writes
            orig = _STREAMS[name] = io.TextIOWrapper(
                io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
            )
        setattr(sys, name, orig)


FORKED = False


def _forked():
    global FORKED
    FORKED = True


def only_the_worker():
    """A fork of the worker made by user code (os.fork, multiprocessing) must never speak on the
    worker's pipes. This guards against accidents, not malice: the cell's own code can write to
    these pipes anyway, and only confuses its own session by doing so."""
    if FORKED:
        os._exit(0)


def flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced by the cell
            pass


def send(obj):
    only_the_worker()
    flush_stdio()
    data = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode("utf-8", "replace")
    view = memoryview(data)
    while view:
        view = view[os.write(RES_FD, view) :]


def bundle(value):
    data = {}
    try:
        data["text/plain"] = repr(value)
    except BaseException as exc:  # a broken __repr__ must not break the run
        data["text/plain"] = f"<repr failed: {type(exc).__name__}: {exc}>"
    if not isinstance(value, type):
        for meth, mime in (
            ("_repr_html_", "text/html"),
            ("_repr_markdown_", "text/markdown"),
            ("_repr_svg_", "image/svg+xml"),
            ("_repr_png_", "image/png"),
            ("_repr_jpeg_", "image/jpeg"),
            ("_repr_json_", "application/json"),
        ):
            fn = getattr(value, meth, None)
            if not callable(fn):
                continue
            try:
                out = fn()
            except Exception:
                continue
            if isinstance(out, tuple):
                out = out[0]
            if out is None:
                continue
            if isinstance(out, (bytes, bytearray)):
                out = base64.b64encode(out).decode()
            data[mime] = out
    if "application/json" not in data and isinstance(value, (dict, list)):
        try:
            # NaN and Infinity are not JSON: the server's strict reader would refuse the frame (and lose the
            # sandbox), so such a value is shown as text/plain only.
            json.dumps(value, allow_nan=False)
            data["application/json"] = value
        except (TypeError, ValueError):
            pass
    return data


def send_figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        import io

        for num in plt.get_fignums():
            buf = io.BytesIO()
            plt.figure(num).savefig(buf, format="png", bbox_inches="tight")
            send(
                {
                    "t": "result",
                    "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": f"<Figure {num}>"},
                    "main": False,
                }
            )
        plt.close("all")
    except Exception as exc:
        print(f"groundloop: could not render figures: {exc}", file=sys.stderr)


def error_of(exc, filename):
    tb = exc.__traceback__
    # Hide the worker's own frames: start at the first frame of the cell.
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        tb = None
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"name": type(exc).__name__, "message": str(exc), "traceback": text}


class CellError(Exception):
    """The cell failed; carries the error dict."""


def run(code, n):
    """Run one cell; return the MIME bundle of its last expression (or None)."""
    filename = f"<cell-{n}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", flags=flags) if tree.body else None
        tail = compile(last, filename, "eval", flags=flags) if last is not None else None
    except (SyntaxError, ValueError, OverflowError) as exc:
        raise CellError(error_of(exc, filename)) from None
    try:
        if body is not None:
            _exec(body)
        value = _exec(tail) if tail is not None else None
    except BaseException as exc:  # KeyboardInterrupt and SystemExit included
        raise CellError(error_of(exc, filename)) from None
    finally:
        send_figures()
    if value is not None:
        NS["_"] = value
        return bundle(value)
    return None


def _exec(code):
    import inspect

    if code.co_flags & inspect.CO_COROUTINE:
        import asyncio

        return asyncio.run(eval(code, NS))
    return eval(code, NS)


def read_commands():
    buf = b""
    while True:
        only_the_worker()
        try:
            chunk = os.read(CMD_FD, 1 << 16)
        except KeyboardInterrupt:  # a late SIGINT while idle
            continue
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


def main():
    for cmd in read_commands():
        try:
            try:
                result = run(cmd.get("code", ""), cmd.get("n", 0))
            except CellError as exc:
                restore_stdio()
                send({"t": "done", "ok": False, "error": exc.args[0]})
                continue
            restore_stdio()
            # The main result rides on the done answer: one write, one read.
            send({"t": "done", "ok": True, "result": result} if result is not None else {"t": "done", "ok": True})
        except KeyboardInterrupt:
            restore_stdio()
            send(
                {
                    "t": "done",
                    "ok": False,
                    "error": {"name": "KeyboardInterrupt", "message": "interrupted", "traceback": ""},
                }
            )


if __name__ == "__main__":
    start(int(os.environ.pop("GROUNDLOOP_CMD_FD")), int(os.environ.pop("GROUNDLOOP_RES_FD")))
    main()
