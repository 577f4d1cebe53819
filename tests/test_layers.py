"""The layer rule and the package's shape, checked without running anything.

- Layers one way: server/ over sessions/ over sandbox/. An import scan (ast, every .py of the
  three folders, imports under ``if TYPE_CHECKING`` included) finds no import upwards and no
  cycle between the three.
- Tests share code through tests/support/ only: none imports conftest.py or another test module.
- The wheel installs the three folders as groundloop.server, groundloop.sessions and
  groundloop.sandbox (with the agent's .py and .js files), and nothing at the top level.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("server", "sessions", "sandbox")  # top to bottom
BELOW = {"server": {"sessions", "sandbox"}, "sessions": {"sandbox"}, "sandbox": set()}


def _imports(path: Path, layer: str, root: Path = ROOT) -> set[str]:
    """The groundloop layers a module imports (relative imports resolved within its own package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                rel = path.relative_to(root).parts
                if node.level > len(rel) - 1:
                    found.add("<outside>")
                    continue
                found.add(layer)
                continue
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "groundloop" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] in LAYERS:
                found.add("<top-level " + parts[0] + ">")
    return found


@functools.cache
def _graph() -> dict[str, dict[str, set[str]]]:
    """layer -> {module path: layers it imports}"""
    graph: dict[str, dict[str, set[str]]] = {}
    for layer in LAYERS:
        files = sorted((ROOT / layer).rglob("*.py"))
        assert files, layer
        graph[layer] = {str(p.relative_to(ROOT)): _imports(p, layer) for p in files}
    return graph


def test_layers_import_only_downwards():
    bad = []
    for layer, modules in _graph().items():
        for module, imported in modules.items():
            for other in imported - {layer}:
                if other not in BELOW[layer]:
                    bad.append(f"{module} imports {other}")
    assert not bad, bad


def test_no_cycle_between_the_layers():
    edges = {layer: set().union(*_graph()[layer].values()) - {layer} for layer in LAYERS}
    edges = {k: {v for v in vs if v in LAYERS} for k, vs in edges.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges[start]:
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert not [layer for layer in LAYERS if reaches(layer, layer, set())]


def test_the_scan_sees_an_upward_import(tmp_path):
    """The scanner itself: an upward import and a relative import out of the package are caught."""
    (tmp_path / "sandbox").mkdir()
    probe = tmp_path / "sandbox" / "probe.py"
    probe.write_text("from groundloop.sessions import protocol\nfrom ..server import app\nimport server.app\n")
    assert _imports(probe, "sandbox", tmp_path) == {"sessions", "<outside>", "<top-level server>"}


def _test_imports_outside_support(path: Path) -> list[str]:
    """Modules of the test tree a test file imports other than the support package: conftest, test_*."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
    return sorted(name for name in names if name.split(".")[0] == "conftest" or name.split(".")[0].startswith("test_"))


def test_tests_share_code_through_the_support_package_only():
    """conftest.py holds fixtures and hooks; what tests import lives in tests/support/ (importlib mode
    would not find a test module or conftest anyway, but only on the run that imports it)."""
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert ROOT / "tests" / "conftest.py" in files
    bad = {str(p.relative_to(ROOT)): found for p in files if (found := _test_imports_outside_support(p))}
    assert not bad, bad


def test_the_test_import_scan_sees_conftest_and_test_modules(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "from conftest import run_server\nimport test_metrics\nfrom test_fleet import free_port\n"
        "from support.env import IMAGE\nfrom .sibling import x\n"
    )
    assert _test_imports_outside_support(probe) == ["conftest", "test_fleet", "test_metrics"]


def test_labelled_metrics_are_updated_only_through_the_helpers():
    """``x.metric.labels(...)`` appears in server/metrics.py only: elsewhere the label-safe helpers are used."""
    bad = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if path == ROOT / "server" / "metrics.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "labels"
                    and isinstance(node.func.value, ast.Attribute)
                ):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_metric_label_sets_come_from_the_wire_contract():
    from groundloop.server import metrics
    from groundloop.sessions.errors import ERROR_CODES
    from groundloop.sessions.protocol import EXECUTIONS, SPECS

    assert metrics.ERROR_CODES == tuple(ERROR_CODES)
    assert set(metrics.REQUEST_TYPES) == set(SPECS) | {"validate_code", "rejected"}
    assert set(metrics.FIRST_OUTPUT_KINDS) == set(EXECUTIONS) and "assist" in metrics.FIRST_OUTPUT_KINDS
    m = metrics.Metrics()
    m.first_output_seen("assist", 0.1)
    m.first_output_seen("not a type", 0.1)
    text = m.exposition().decode()
    assert 'groundloop_first_output_seconds_count{kind="assist"} 1.0' in text
    assert 'groundloop_first_output_seconds_count{kind="other"} 1.0' in text


@pytest.mark.slow
def test_the_wheel_holds_the_namespace_and_nothing_at_the_top(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("groundloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"groundloop"} | {n.split("/")[0] for n in names if ".dist-info" in n.split("/")[0]}, tops
    for layer in LAYERS:
        assert f"groundloop/{layer}/__init__.py" in names
        assert not any(n.startswith(layer + "/") for n in names)
    assert "groundloop/server/app.py" in names and "groundloop/sessions/session.py" in names
    agent = {n for n in names if n.startswith("groundloop/sandbox/agent/")}
    on_disk = {
        f"groundloop/sandbox/agent/{p.name}"
        for p in (ROOT / "sandbox" / "agent").iterdir()
        if p.suffix in (".py", ".js")
    }
    assert on_disk and on_disk <= agent, on_disk - agent
