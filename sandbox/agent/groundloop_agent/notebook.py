"""Jupyter-grade cells for the Python worker: IPython's own machinery when the image has it.

The worker (pyworker.py) compiles and runs plain Python itself, as before: that is the lean path of a
warm ``1 + 1`` (IPython's ``run_cell`` costs about 2 ms a cell, its formatter half a millisecond for an
int; docs/performance.md). This module adds, from IPython (standard image profile):

- the cell transformations (``!cmd``, ``%magic``, ``%%cell magic``, ``x = !cmd``, indented cells,
  single-line automagic such as ``ls``), used only for a cell that is not plain Python;
- the display publisher (``display()``, ``IPython.display.*``, ``_ipython_display_``) and the formatters
  (``_repr_html_``, ``_repr_svg_``, ``_repr_latex_``, ``_repr_mimebundle_``..., pandas' tables);
- matplotlib's inline backend (``%matplotlib inline``): a figure is sent as ``image/png`` when shown and
  when the cell ends, and as SVG too when asked (``%config InlineBackend.figure_formats = ['png', 'svg']``).

The shell is made on first need (a ``display()``, a magic, a value that is not a plain builtin, an
``import IPython`` or ``import matplotlib.pyplot``): importing IPython takes a few hundred milliseconds,
which a context's first plain cell should not pay. ``preload()`` does that import ahead, for a process
that forks workers; a worker that finds IPython already imported makes its shell at once.

Without IPython (minimal image) the same entry points do what they can by hand: indented cells are
dedented, ``display()`` sends a bundle, values are formatted by their ``_repr_*_`` methods.
"""

from __future__ import annotations

import ast
import base64
import builtins
import importlib.util
import io
import json
import sys

# repr() is what IPython's pretty printer shows for these too: no need to load or ask the shell.
PLAIN = frozenset({int, float, complex, bool, str, bytes, type(None)})
# Containers whose repr is short print the same through IPython's pretty printer (it wraps at 79).
SHORT_CONTAINERS = frozenset({list, tuple, dict})
WIDTH = 79
# IPython's line magics and shell aliases that make sense alone on a line (``%lsmagic`` lists them all).
AUTOMAGIC = frozenset(
    "alias autoawait automagic bookmark cat cd clear colors conda config cp dhist dirs env hist history killbgscripts "
    "ldir less lf lk ll ls lsmagic lx magic man matplotlib mkdir more mv pip popd pprint precision pushd pwd "
    "quickref rehashx reset rm rmdir sc tb who who_ls whos xmode".split()
)
INLINE = "module://matplotlib_inline.backend_inline"

_send = None  # the worker's answer writer
_send_display = None  # the same, waiting for the agent's acknowledgement (keeps results and output in order)
_main = None  # the user's __main__ module
_shell = None
_making = False
_has_ipython: bool | None = None
_inline = False  # matplotlib's inline backend is active (it sends the figures itself)
_hooks_busy: set[str] = set()


def preload() -> None:
    """Import the IPython machinery a shell needs, ahead of any worker (for a zygote that forks them)."""
    if has_ipython():
        from IPython import display  # noqa: F401
        from IPython.core import displayhook, displaypub, formatters, interactiveshell  # noqa: F401


def has_ipython() -> bool:
    global _has_ipython
    if _has_ipython is None:
        try:
            _has_ipython = importlib.util.find_spec("IPython") is not None
        except (ImportError, ValueError):
            _has_ipython = False
    return _has_ipython


def install(main_module, send, send_display=None) -> None:
    """Set up the worker: ``display`` as a builtin (as in IPython), the import hooks, the shell when
    IPython is already imported (preloaded)."""
    global _send, _send_display, _main
    _send, _send_display, _main = send, send_display or send, main_module
    builtins.display = display
    if has_ipython():  # asked before the hooks are in place: they would answer this search too
        sys.meta_path.insert(0, _ImportHooks())
        if "IPython" in sys.modules:
            shell()


# ---- the shell


def shell():
    """The IPython shell of this worker, made on first use; None without IPython."""
    global _shell, _making
    if _shell is None and has_ipython() and not _making:
        _making = True  # making it imports IPython, which calls here again (the import hook)
        try:
            _shell = _make_shell()
        finally:
            _making = False
    return _shell


def _make_shell():
    from IPython.core.interactiveshell import InteractiveShell

    if InteractiveShell.initialized():  # made by the user's code first: theirs is the one
        return InteractiveShell.instance()
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from traitlets import Type
    from traitlets.config import Config

    class Publisher(DisplayPublisher):
        """display() and friends: each call is a result frame, at once (so it comes while the cell runs)."""

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            send_bundle(data, False, (transient or {}).get("display_id"), update)

        def clear_output(self, wait=False):
            _send_display({"t": "clear", "wait": bool(wait)})

    class Hook(DisplayHook):
        """The value of a cell IPython runs itself (``%run -i``, ``%%time``'s cell...): a result, no prompt."""

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            send_bundle(format_dict, False)

    class Shell(InteractiveShell):
        display_pub_class = Type(Publisher)
        displayhook_class = Type(Hook)

        def system(self, cmd):
            # The worker's stdout and stderr are the request's pipes: a child writing to them directly
            # streams line by line (IPython's default runs it under a pty through pexpect).
            return self.system_raw(cmd)

        def enable_gui(self, gui=None):
            pass  # no GUI event loop in a sandbox

    config = Config()
    config.HistoryManager.enabled = False  # no SQLite file, no saving thread
    config.InteractiveShell.colors = "NoColor"
    ns = _main.__dict__
    # IPython adds In, Out, exit, quit... to the namespace: a name the user already bound keeps its value,
    # and exit()/quit() keep ending the cell with SystemExit, as in a context made before the shell.
    kept = {k: ns[k] for k in ("In", "Out", "_", "__", "___", "_ih", "_oh", "_dh", "open", "exit", "quit") if k in ns}
    sh = Shell.instance(config=config, user_module=_main)
    for name in ("exit", "quit"):
        ns.pop(name, None)
    ns.update(kept)
    return sh


# ---- cells


def transform(code: str) -> str | None:
    """The Python of a cell that did not parse: dedented, or IPython's transformation of it. None: no help."""
    import textwrap

    dedented = textwrap.dedent(code)
    if dedented != code:
        try:
            ast.parse(dedented)
            return dedented  # an indented cell: no need to wake IPython for it
        except SyntaxError:
            pass
    sh = shell()
    if sh is None:
        return None
    return sh.transform_cell(code)


def automagic(tree: ast.Module, ns: dict) -> bool:
    """A one-name cell such as ``ls`` or ``pwd`` that IPython runs as a magic (when the name is free)."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr) or not isinstance(tree.body[0].value, ast.Name):
        return False
    name = tree.body[0].value.id
    if name not in AUTOMAGIC or name in ns or hasattr(builtins, name) or not has_ipython():
        return False  # a typo's NameError does not wait for IPython to load
    return shell().find_magic(name) is not None


def quiet(code: str) -> bool:
    """A cell ending with ``;`` shows no value (as in IPython), a comment after it allowed."""
    last = code.rstrip().rsplit("\n", 1)[-1]
    if ";" not in last:
        return False
    if last.endswith(";"):
        return True
    import tokenize

    try:
        skip = (tokenize.COMMENT, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT)
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(last).readline) if t.type not in skip]
    except (tokenize.TokenError, SyntaxError):
        return False
    return bool(tokens) and tokens[-1].string == ";"


def pre_execute() -> None:
    if _shell is not None:
        _shell.events.trigger("pre_execute")


def has_post_execute() -> bool:
    return _shell is not None and bool(_shell.events.callbacks.get("post_execute"))


def post_execute() -> None:
    """The cell ended (well or not): the inline backend sends the figures it drew; without it, open
    pyplot figures are sent as PNG and closed."""
    if _shell is not None:
        try:
            _shell.events.trigger("post_execute")
        except Exception as exc:  # IPython prints and goes on; a callback's failure is not the cell's
            print(f"groundloop: a post_execute callback failed: {exc!r}", file=sys.stderr)
    if not _inline:
        _send_open_figures()


def value_bundle(value) -> dict | None:
    """The MIME bundle of a cell's value (None when it shows nothing)."""
    kind = type(value)
    if kind in PLAIN and not (kind is float and _shell is not None and _float_precision()):
        return {"text/plain": repr(value)}
    if kind in SHORT_CONTAINERS:
        data = None
        text = _repr(value)
        # Wrapped as IPython wraps it once the shell exists; a long list alone does not make the shell.
        if (len(text) > WIDTH or "\n" in text) and _shell is not None:
            data = _format(value)
        data = data or {"text/plain": text}
        _add_json(data, value)
        return data
    if shell() is not None:
        return _format(value)
    return fallback_bundle(value)


def _float_precision() -> bool:
    return bool(_shell.display_formatter.formatters["text/plain"].float_precision)


def _format(value) -> dict | None:
    data, _ = _shell.display_formatter.format(value)
    return plain(data) if data else None


def send_bundle(data, main: bool, display_id=None, update: bool = False) -> None:
    """A result; with ``display_id``, a display that a later one with ``update`` replaces."""
    data = plain(data)
    if data:
        msg = {"t": "result", "data": data, "main": main}
        if isinstance(display_id, str) and display_id:
            msg["display_id"] = display_id
            if update:
                msg["update"] = True
        _send_display(msg)


def plain(data) -> dict:
    """A bundle fit for JSON: bytes as base64 (images) or text."""
    out = {}
    for mime, value in (data or {}).items():
        if isinstance(value, (bytes, bytearray)):
            if mime.startswith("text/") or mime.endswith(("+xml", "+json")) or mime == "application/json":
                value = bytes(value).decode("utf-8", "replace")
            else:
                value = base64.b64encode(value).decode()
        out[str(mime)] = value
    return out


# ---- display(): IPython's when it is there, a bundle by hand when not


def display(*objs, include=None, exclude=None, metadata=None, transient=None, display_id=None, raw=False, **kwargs):
    """IPython's ``display`` (the shell is made on first use); without IPython, one result per object."""
    if shell() is not None:
        from IPython.display import display as ipython_display

        return ipython_display(
            *objs,
            include=include,
            exclude=exclude,
            metadata=metadata,
            transient=transient,
            display_id=display_id,
            raw=raw,
            **kwargs,
        )
    for obj in objs:
        bundle = obj if raw and isinstance(obj, dict) else fallback_bundle(obj)
        send_bundle(bundle, False, display_id, bool(kwargs.get("update")))
    return None


_REPRS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)


def fallback_bundle(value) -> dict:
    """A value's bundle from its ``_repr_*_`` methods, as IPython's formatters would make it."""
    data = {"text/plain": _repr(value)}
    if isinstance(value, type):
        return data
    fn = getattr(value, "_repr_mimebundle_", None)
    if callable(fn):
        try:
            out = fn(include=None, exclude=None)
            if isinstance(out, tuple):
                out = out[0]
            if isinstance(out, dict):
                data.update(plain(out))
        except Exception:
            pass
    for meth, mime in _REPRS:
        fn = getattr(value, meth, None)
        if mime in data or not callable(fn):
            continue
        try:
            out = fn()
        except Exception:
            continue
        if isinstance(out, tuple):
            out = out[0]
        if out is not None:
            data.update(plain({mime: out}))
    _add_json(data, value)
    return data


def _repr(value) -> str:
    try:
        return repr(value)
    except BaseException as exc:  # a broken __repr__ must not break the run
        return f"<repr failed: {type(exc).__name__}: {exc}>"


def _add_json(data: dict, value) -> None:
    if "application/json" not in data and isinstance(value, (dict, list)):
        try:
            # NaN and Infinity are not JSON: the server's strict reader would refuse the frame (and lose the
            # sandbox), so such a value is shown as text/plain only.
            json.dumps(value, allow_nan=False)
            data["application/json"] = value
        except (TypeError, ValueError, RecursionError):
            pass


# ---- matplotlib


def _send_open_figures() -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        for num in plt.get_fignums():
            buf = io.BytesIO()
            plt.figure(num).savefig(buf, format="png", bbox_inches="tight")
            send_bundle({"image/png": buf.getvalue(), "text/plain": f"<Figure {num}>"}, False)
        plt.close("all")
    except Exception as exc:
        print(f"groundloop: could not render figures: {exc}", file=sys.stderr)


def _after_pyplot() -> None:
    """pyplot was just imported: unless the user chose a backend, use the inline one (``%matplotlib inline``)."""
    global _inline
    import matplotlib

    if str(matplotlib.rcParams["backend"]).lower() != "agg" or importlib.util.find_spec("matplotlib_inline") is None:
        return
    sh = shell()
    if sh is None:
        return
    try:
        sh.enable_matplotlib("inline")
        _inline = True
    except Exception as exc:
        print(
            f"groundloop: matplotlib's inline backend is unavailable ({exc!r}); figures come at the end of the cell",
            file=sys.stderr,
        )


# Run after the module of that name is imported (by the user's code or a library's).
_AFTER = {"IPython": shell, "matplotlib.pyplot": _after_pyplot}


class _ImportHooks:  # a meta path finder (importlib.abc would cost the worker's start 18 ms of imports)
    """Calls ``_AFTER[name]`` once the module ``name`` has run (the import machinery has no such hook)."""

    def find_spec(self, name, path, target=None):
        after = _AFTER.get(name)
        if after is None or name in _hooks_busy:
            return None
        _hooks_busy.add(name)
        try:
            spec = importlib.util.find_spec(name)  # the other finders: this one says None while busy
        finally:
            _hooks_busy.discard(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                after()
            except Exception as exc:
                print(f"groundloop: set-up after importing {name} failed: {exc!r}", file=sys.stderr)

        loader.exec_module = exec_module
        return spec
