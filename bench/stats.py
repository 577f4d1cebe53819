"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import statistics


def pct(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, nearest rank."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(samples: list[float]) -> dict[str, float]:
    return {
        "p50": pct(samples, 50) * 1e3,
        "p99": pct(samples, 99) * 1e3,
        "mean": statistics.fmean(samples) * 1e3 if samples else float("nan"),
        "n": len(samples),
    }


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, what: str, value: str, goal: str = "") -> None:
        self.rows.append((what, value, goal))
        print(f"  {what:<58} {value:<28} {goal}", flush=True)

    def render(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        v = max(len(r[1]) for r in self.rows)
        lines = [f"| {'measure':<{w}} | {'result':<{v}} | goal |", f"|{'-' * (w + 2)}|{'-' * (v + 2)}|------|"]
        lines += [f"| {a:<{w}} | {b:<{v}} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)
