"""Reading metrics: an exposition's samples, and the PromQL the Grafana dashboard queries (shared by the
metrics, metrics-over-HTTP and deploy tests).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "groundloop.json"
NAME_RE = re.compile(r"\bgroundloop_[a-zA-Z0-9_]+")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def samples(text: str | bytes) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset(labels)): value} of an exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(text: str | bytes, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples(text).items() if n == name and want <= lab)


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and templating queries."""
    dash = json.loads(path.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query)
    return exprs


def resolve(name: str, families: dict[str, str]) -> str | None:
    """The exported family a PromQL series name belongs to (None: not exported)."""
    for family, kind in families.items():
        for suffix in SUFFIXES[kind]:
            if name == family + suffix:
                return family
    return None
