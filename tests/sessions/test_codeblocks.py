"""The incremental fence parser, fed literal replies split at every position."""

from __future__ import annotations

import pytest
from groundloop.sessions.codeblocks import CodeBlock, CodeBlockParser, normalize_language
from groundloop.sessions.policy import Policy, PolicyError


def parse_whole(text: str) -> list[CodeBlock]:
    p = CodeBlockParser()
    return p.feed(text) + p.finish()


def parse_split(text: str, cut: int) -> list[CodeBlock]:
    p = CodeBlockParser()
    return p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish()


def parse_chars(text: str) -> list[CodeBlock]:
    p = CodeBlockParser()
    out: list[CodeBlock] = []
    for ch in text:
        out += p.feed(ch)
    return out + p.finish()


REPLIES = {
    "python": (
        "Here is the code:\n```python\nprint('hi')\nx = 1\n```\nIt prints hi.",
        [("python", "print('hi')\nx = 1\n", True)],
    ),
    "py": ("```py\nprint(2)\n```", [("py", "print(2)\n", True)]),
    "js": ("Run:\n```js\nconsole.log(1)\n```\n", [("js", "console.log(1)\n", True)]),
    "javascript": (
        "```javascript\nconst a = [1,2];\nconsole.log(a)\n```\nok",
        [("javascript", "const a = [1,2];\nconsole.log(a)\n", True)],
    ),
    "untagged": ("```\nprint(3)\n```\n", [("", "print(3)\n", True)]),
    "tilde": ("~~~python\nprint('```')\n~~~\n", [("python", "print('```')\n", True)]),
    "unclosed": (
        "Start:\n```python\nfor i in range(3):\n    print(i)",
        [("python", "for i in range(3):\n    print(i)\n", False)],
    ),
    "two blocks": (
        "A\n```python\na = 1\n```\nB\n```python\nprint(a)\n```\nC",
        [("python", "a = 1\n", True), ("python", "print(a)\n", True)],
    ),
    "longer fence": (
        "````python\n```\nnot closed by three\n```\n````\n",
        [("python", "```\nnot closed by three\n```\n", True)],
    ),
    "indented fence": ("  ```python\n  if x:\n      y()\n  ```\n", [("python", "if x:\n    y()\n", True)]),
    "crlf": ("```python\r\nprint(1)\r\n```\r\n", [("python", "print(1)\n", True)]),
    "info words": ("```python title=demo.py\nprint(1)\n```", [("python", "print(1)\n", True)]),
    "inline not a fence": ("Use ```x``` inline.\n```bash\nls\n```\n", [("bash", "ls\n", True)]),
    "closing with spaces": ("```py\n1\n```   \nafter", [("py", "1\n", True)]),
    "empty block": ("```python\n```\n", [("python", "", True)]),
    "no code": ("Just words, no code.\nTwo ``backticks`` only.", []),
    "closing must match char": ("~~~py\n```\n~~~", [("py", "```\n", True)]),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_split_everywhere(name):
    text, expected = REPLIES[name]
    want = [(b.tag, b.code, b.closed) for b in parse_whole(text)]
    assert want == expected
    for cut in range(len(text) + 1):
        got = [(b.tag, b.code, b.closed) for b in parse_split(text, cut)]
        assert got == expected, f"split at {cut}: {text[:cut]!r} | {text[cut:]!r}"
    assert [(b.tag, b.code, b.closed) for b in parse_chars(text)] == expected


def test_block_is_returned_when_its_closing_line_ends():
    p = CodeBlockParser()
    assert p.feed("```python\nprint(1)\n") == []
    assert p.in_block
    assert p.feed("```") == []  # could still be ```` or ```x: wait for the line end
    blocks = p.feed("\nmore text")
    assert [b.code for b in blocks] == ["print(1)\n"]
    assert not p.in_block
    assert p.finish() == []


def test_indices_and_feed_after_finish():
    p = CodeBlockParser()
    blocks = p.feed("```py\na\n```\n```js\nb\n```\n")
    assert [b.index for b in blocks] == [0, 1]
    assert p.count == 2
    p.finish()
    with pytest.raises(RuntimeError, match="expected feed"):
        p.feed("x")


@pytest.mark.parametrize(
    ("tag", "default", "want"),
    [
        ("python", "javascript", "python"),
        ("py", "python", "python"),
        ("Python3", "python", "python"),
        ("js", "python", "javascript"),
        ("javascript", "python", "javascript"),
        ("node", "python", "javascript"),
        ("", "python", "python"),
        ("", "javascript", "javascript"),
        ("bash", "python", None),
        ("text", "python", None),
        ("json", "javascript", None),
    ],
)
def test_normalize_language(tag, default, want):
    assert normalize_language(tag, default) == want


def test_pandoc_style_tag():
    assert parse_whole("```{.python}\n1\n```")[0].tag == "python"


# ---- policy


def test_policy_off_by_default():
    assert not Policy().enabled
    assert Policy([]).check("import os; os.system('rm -rf /')", "python") is None


def test_policy_rejects_with_reason():
    pol = Policy([r"\bos\.system\(", r"javascript:child_process"])
    assert pol.enabled
    reason = pol.check("import os\nos.system('ls')\n", "python")
    assert reason is not None
    assert "os\\.system\\(" in reason and "line 2" in reason and "os.system('ls')" in reason
    assert pol.check("require('child_process')", "python") is None  # language-scoped rule
    assert "child_process" in pol.check("require('child_process')", "javascript")


def test_policy_bad_pattern():
    with pytest.raises(PolicyError, match="not a valid regular expression"):
        Policy(["(unclosed"])
