"""Incremental detection of fenced code blocks in a streamed Markdown reply.

Sans-I/O: feed the model's text deltas as they arrive, get back every code
block the moment its closing fence line is complete. No sockets, no clock.

The rules are CommonMark's, reduced to what a model's reply needs:

- A fence opens on a line that starts with at most three spaces, then three
  or more backticks (`````) or tildes (``~~~``), then an optional info string
  (a backtick fence's info string may not contain a backtick). The first word
  of the info string is the block's tag (``python``, ``js``, ...).
- The block closes on a line of at most three spaces, the same fence
  character repeated at least as many times as the opening, and nothing but
  whitespace after it. Its content is every line in between, with up to the
  opening fence's indentation removed from each.
- A block still open when the stream ends is returned by ``finish()`` with
  ``closed=False`` (a reply cut by ``max_tokens``, or a model that forgot the
  closing fence).

Because a line can only be classified once it is complete, a closing fence
is recognised when the newline after it arrives, or at ``finish()``.

``normalize_language`` maps a tag to the sandbox's language names: an empty
tag is the request's language, ``py``/``python3`` are ``python``,
``js``/``node``/``mjs`` are ``javascript``, and anything else (``bash``,
``text``, ``json``...) is None: shown to the user, never executed.
"""

from __future__ import annotations

from dataclasses import dataclass

_PYTHON = {"python", "py", "python3", "py3", "ipython", "pycon"}
_JAVASCRIPT = {"javascript", "js", "node", "nodejs", "mjs", "cjs", "ecmascript"}


@dataclass(frozen=True)
class CodeBlock:
    """One fenced block. ``tag`` is the lower-cased first word of the info string."""

    code: str
    tag: str
    info: str
    closed: bool = True
    index: int = 0  # 0-based position of the block in the reply


def normalize_language(tag: str, default: str) -> str | None:
    """The sandbox language a block tag means, or None for a non-runnable block."""
    tag = tag.strip().lower()
    if not tag:
        return default
    if tag in _PYTHON:
        return "python"
    if tag in _JAVASCRIPT:
        return "javascript"
    return None


def _tag_of(info: str) -> str:
    word = info.strip().split(maxsplit=1)[0] if info.strip() else ""
    # Pandoc-style attributes: ```{.python} or ```{python}
    word = word.strip("{}").lstrip(".")
    return word.lower()


class CodeBlockParser:
    """Feed text, receive complete code blocks.

    >>> p = CodeBlockParser()
    >>> p.feed("Here:\\n```py\\nprint(1)\\n")
    []
    >>> p.feed("```\\nDone.")
    [CodeBlock(code='print(1)\\n', tag='py', info='py', closed=True, index=0)]
    """

    def __init__(self) -> None:
        self._partial = ""  # the current, incomplete line
        # The open fence: (char, length, indent, info) or None outside a block.
        self._fence: tuple[str, int, int, str] | None = None
        self._lines: list[str] = []
        self._count = 0
        self._finished = False

    @property
    def in_block(self) -> bool:
        """True while inside an open fence."""
        return self._fence is not None

    @property
    def count(self) -> int:
        """How many blocks have been returned so far."""
        return self._count

    def feed(self, text: str) -> list[CodeBlock]:
        """Consume a text delta; return the blocks that closed within it."""
        if self._finished:
            raise RuntimeError("expected feed() before finish(), got feed() after finish()")
        if not text:
            return []
        out: list[CodeBlock] = []
        data = self._partial + text
        start = 0
        while True:
            nl = data.find("\n", start)
            if nl < 0:
                break
            block = self._line(data[start:nl])
            if block is not None:
                out.append(block)
            start = nl + 1
        self._partial = data[start:]
        return out

    def finish(self) -> list[CodeBlock]:
        """The stream ended: classify the last partial line, flush an unclosed block."""
        if self._finished:
            return []
        out: list[CodeBlock] = []
        if self._partial:
            block = self._line(self._partial)
            self._partial = ""
            if block is not None:
                out.append(block)
        if self._fence is not None:
            out.append(self._emit(closed=False))
        self._finished = True
        return out

    # ---- one complete line

    def _line(self, line: str) -> CodeBlock | None:
        if line.endswith("\r"):
            line = line[:-1]
        if self._fence is None:
            opening = _opening(line)
            if opening is not None:
                self._fence = opening
                self._lines = []
            return None
        char, length, indent, _ = self._fence
        if _is_closing(line, char, length):
            return self._emit(closed=True)
        self._lines.append(_dedent(line, indent))
        return None

    def _emit(self, closed: bool) -> CodeBlock:
        assert self._fence is not None
        info = self._fence[3]
        code = "".join(line + "\n" for line in self._lines)
        block = CodeBlock(code=code, tag=_tag_of(info), info=info, closed=closed, index=self._count)
        self._count += 1
        self._fence = None
        self._lines = []
        return block


def _indent_of(line: str) -> int:
    n = 0
    while n < len(line) and line[n] == " ":
        n += 1
    return n


def _opening(line: str) -> tuple[str, int, int, str] | None:
    indent = _indent_of(line)
    if indent > 3:
        return None
    rest = line[indent:]
    if not rest or rest[0] not in "`~":
        return None
    char = rest[0]
    length = len(rest) - len(rest.lstrip(char))
    if length < 3:
        return None
    info = rest[length:].strip()
    if char == "`" and "`" in info:
        return None  # inline code such as ```x```, not a fence
    return char, length, indent, info


def _is_closing(line: str, char: str, length: int) -> bool:
    indent = _indent_of(line)
    if indent > 3:
        return False
    rest = line[indent:].rstrip()
    return len(rest) >= length and rest == char * len(rest)


def _dedent(line: str, indent: int) -> str:
    if indent:
        return line[min(indent, _indent_of(line)) :]
    return line
