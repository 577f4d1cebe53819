"""An optional code policy for ``assist``: forbidden patterns, checked before a run.

Off by default (``GROUNDLOOP_POLICY_PATTERNS`` empty). Each pattern is a Python
regular expression searched in the code with ``re.MULTILINE``; an optional
``language:`` prefix (``python:`` or ``javascript:``) limits it to one
language. The first match rejects the code with a reason that names the
pattern and the offending line, so both the user and the model can see why.

The policy is a guard rail for model-written code, not a security boundary:
the sandbox is the boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LANGS = ("python", "javascript")


class PolicyError(ValueError):
    """A pattern in the configuration is not a valid regular expression."""


@dataclass(frozen=True)
class Rule:
    source: str
    regex: re.Pattern[str]
    language: str | None


class Policy:
    """Forbidden patterns. ``check`` returns None when the code may run, else the reason."""

    def __init__(self, patterns: list[str] | tuple[str, ...] = ()):
        rules: list[Rule] = []
        for raw in patterns:
            raw = raw.strip()
            if not raw:
                continue
            language = None
            prefix, sep, rest = raw.partition(":")
            if sep and prefix in _LANGS:
                language, raw = prefix, rest
            try:
                rules.append(Rule(raw, re.compile(raw, re.MULTILINE), language))
            except re.error as exc:
                raise PolicyError(f"policy pattern {raw!r} is not a valid regular expression: {exc}") from None
        self.rules = tuple(rules)

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    def check(self, code: str, language: str) -> str | None:
        for rule in self.rules:
            if rule.language is not None and rule.language != language:
                continue
            m = rule.regex.search(code)
            if m is None:
                continue
            line_no = code.count("\n", 0, m.start()) + 1
            line = code.splitlines()[line_no - 1].strip() if code.splitlines() else ""
            if len(line) > 200:
                line = line[:200] + "..."
            return (
                f"the code matches the forbidden pattern `{rule.source}` of the server's policy "
                f"at line {line_no}: {line}"
            )
        return None
