"""groundloop Python worker: one persistent namespace, driven by the agent.

Commands arrive as JSON lines on fd GROUNDLOOP_CMD_FD (``{"code":..,"n":..,"env"?:{..}}``: env is set
for the cell only);
answers leave as JSON lines on fd GROUNDLOOP_RES_FD: zero or more
``{"t":"result","data":{mime: value},"main":bool,"ack":true}`` (each waits for the agent's
empty line on the command fd) then one
``{"t":"done","ok":bool,"error"?:{name,message,traceback},"result"?:{mime: value}}``.
Cells are notebook cells: notebook.py brings IPython's machinery when the image has it.
The user's stdout and stderr are this process's own fds 1 and 2 (pipes read by
the agent), unbuffered, so every line leaves as it is written. Everything is
flushed before an answer is written, which is what lets the agent order output
before results.
"""

import ast
import builtins
import importlib.util
import io
import json
import linecache
import os
import sys
import traceback
import types

CO_COROUTINE = 0x0080  # inspect.CO_COROUTINE, without importing inspect
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
_main = types.ModuleType("__main__")  # the cell's module, made by start()
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
    if not NB.has_ipython():  # found, it is answered once here for every fork; not found, each worker looks
        NB._has_ipython = None  # again (a `pip install ipython` after the sandbox started)


WARM_CELL = "values = [i * i for i in range(4)]\nsum(values) + len(str(values))"


def warm():
    """In a zygote's spare, before anyone waits for it: go once through what a first cell does (parse,
    compile, run, its value's bundle, the answer's JSON) in a namespace thrown away after. The pages
    that touches are the zygote's, shared copy-on-write: the copies are taken here, while the spare
    is idle, instead of in the first cell of the context that claims it (0.5 ms of it, measured)."""
    ns = {"__builtins__": builtins}
    try:
        tree = ast.parse(WARM_CELL, "<warm>", "exec")
        last = ast.Expression(tree.body.pop().value)
        eval(compile(tree, "<warm>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
        value = eval(compile(last, "<warm>", "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), ns)
        NB.quiet(WARM_CELL)
        bundle = NB.value_bundle(value)
        json.dumps({"t": "done", "ok": True, "result": bundle}, ensure_ascii=False, default=str).encode()
    except Exception:  # a warm-up only: the first cell would meet the same trouble, and say it
        pass


_PREPARED = False


def prepare():
    """What makes this process the worker but its pipes: a fresh ``__main__`` namespace. A zygote's spare
    does this before it is claimed (off the path of the context that claims it); ``start`` does it otherwise."""
    global NS, _main, _PREPARED
    main_module = types.ModuleType("__main__")
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = _main = main_module
    NS = main_module.__dict__
    sys.argv = [""]
    if "" not in sys.path:
        sys.path.insert(0, "")
    os.register_at_fork(after_in_child=_forked)
    _PREPARED = True


def start(cmd_fd, res_fd):
    """Become the worker on the given pipes. Run once per process, at its start (``python pyworker.py``)
    or in a zygote's child when it is claimed."""
    global CMD_FD, RES_FD, FORKED, _STDIO, _STREAMS
    if not _PREPARED:
        prepare()
    # Here, not in prepare(): a spare is not dumpable until it is claimed, and the kernel then gives its
    # /proc files to root, so the write would fail (silently) and forked workers keep the zygote's 0.
    try:  # the first to go when the sandbox runs out of memory
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    CMD_FD, RES_FD = cmd_fd, res_fd
    # The worker's own: a process a cell starts (os.system("server &")) must not hold the answer pipe open
    # after the worker ends (the agent would see its end late), nor read the next cells.
    os.set_inheritable(cmd_fd, False)
    os.set_inheritable(res_fd, False)
    # Copies of the cell's stdio, to give every cell back what an earlier one closed or redirected
    # (os.close(1), os.dup2(x, 1), sys.stdout.close()), as Jupyter's kernels do. Not inherited.
    _STDIO = {fd: os.dup(fd) for fd in (0, 1, 2)}
    _STREAMS = {"stdout": sys.stdout, "stderr": sys.stderr}
    FORKED = False


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


def _notebook():
    """notebook.py, loaded by path: the worker's folder is not on sys.path (-P), and a user's module named
    ``notebook`` (Jupyter's) must not meet it. A parent that imported it ahead (preload) is reused."""
    mod = sys.modules.get("groundloop_agent.notebook")
    if mod is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notebook.py")
        spec = importlib.util.spec_from_file_location("groundloop_agent.notebook", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod


NB = _notebook()


def parse(code, filename):
    """The cell's syntax tree; a cell that is not plain Python (``!ls``, ``%time``, indented lines) is
    transformed first (notebook.transform). Returns (tree, the code that runs)."""
    try:
        tree = ast.parse(code, filename, "exec")
    except SyntaxError as exc:
        try:
            fixed = NB.transform(code)
        except Exception:
            fixed = None
        if fixed is None or fixed == code:
            if NB.has_ipython() or not any(line.lstrip()[:1] in ("!", "%") for line in code.splitlines()):
                raise
            raise SyntaxError(
                f"{exc.msg} (`!` and `%` lines need IPython, which this sandbox image does not have)",
                (exc.filename, exc.lineno, exc.offset, exc.text),
            ) from None
        return ast.parse(fixed, filename, "exec"), fixed
    if NB.automagic(tree, NS):
        fixed = NB.transform(code)
        return ast.parse(fixed, filename, "exec"), fixed
    return tree, code


def run(code, n):
    """Run one cell; return the MIME bundle of its last expression (or None)."""
    filename = f"<cell-{n}>"
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        tree, source = parse(code, filename)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", flags=flags) if tree.body else None
        tail = compile(last, filename, "eval", flags=flags) if last is not None else None
    except (SyntaxError, ValueError, OverflowError) as exc:
        linecache.cache.setdefault(filename, (len(code), None, code.splitlines(True), filename))
        raise CellError(error_of(exc, filename)) from None
    if (body is not None and body.co_flags & CO_COROUTINE) or (tail is not None and tail.co_flags & CO_COROUTINE):
        _event_loop()  # before the cell's first line: a task it makes before its first await joins this loop
    NB.pre_execute()
    try:
        if body is not None:
            _exec(body)
        value = _exec(tail) if tail is not None else None
        if value is not None and not NB.quiet(source):
            NS["_"] = value
            bundle = NB.value_bundle(value)
            if bundle and NB.has_post_execute():
                # What runs when the cell ends (the inline backend's figures) comes after the value, as in Jupyter.
                send({"t": "result", "data": bundle, "main": True})
                return None
            return bundle
        return None
    except BaseException as exc:  # KeyboardInterrupt and SystemExit included
        raise CellError(error_of(exc, filename)) from None
    finally:
        NB.post_execute()


_loop = None


def _event_loop():
    """One event loop for the context's life, as in IPython: a task a cell starts lives on into the next."""
    global _loop
    if _loop is None or _loop.is_closed():
        import asyncio

        _loop = asyncio.new_event_loop()
    import asyncio

    asyncio.set_event_loop(_loop)  # asyncio.run() in an earlier cell unsets it
    return _loop


def _exec(code):
    if code.co_flags & CO_COROUTINE:
        return _event_loop().run_until_complete(eval(code, NS))
    return eval(code, NS)


_cmd_buf = b""


def _cmd_line(interruptible):
    """The next line the agent wrote on the command pipe (None at its end)."""
    global _cmd_buf
    while b"\n" not in _cmd_buf:
        only_the_worker()
        try:
            chunk = os.read(CMD_FD, 1 << 16)
        except KeyboardInterrupt:  # a late SIGINT while idle
            if interruptible:
                raise
            continue
        if not chunk:
            return None
        _cmd_buf += chunk
    line, _cmd_buf = _cmd_buf.split(b"\n", 1)
    return line


def send_display(obj):
    """Send a result that is not the cell's value and wait for the agent's acknowledgement (an empty line):
    by then the agent has sent on what the cell printed before it, so what it prints next comes after."""
    send(dict(obj, ack=True))
    while True:
        line = _cmd_line(interruptible=True)
        if not line:  # the acknowledgement, or the pipe's end (the agent is going away)
            return


def read_commands():
    while True:
        line = _cmd_line(interruptible=False)
        if line is None:
            return
        if line:  # an empty line is a late acknowledgement (of a display an interrupt cut short)
            yield json.loads(line)


def run_env(env):
    """Set a run's own environment (``env`` of the command); returns what puts it back. A None value unsets
    the name for good (the session dropped it): it is not put back."""
    if not env:
        return None
    saved = {k: os.environ.get(k) for k, v in env.items() if v is not None}
    restore_env(env)
    return saved


def restore_env(saved):
    for k, v in (saved or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def main():
    NB.install(_main, send, send_display)
    for cmd in read_commands():
        saved = run_env(cmd.get("env"))
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
        finally:
            restore_env(saved)


if __name__ == "__main__":
    start(int(os.environ.pop("GROUNDLOOP_CMD_FD")), int(os.environ.pop("GROUNDLOOP_RES_FD")))
    main()
