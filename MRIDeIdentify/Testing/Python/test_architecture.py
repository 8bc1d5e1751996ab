"""The engine's front ends import downwards only, and the settings module stays light.

The import graph is read from the source (every ``import``, at module level or inside a function, as
test_slicer_static reads it), so a lazy import that closes a circle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from typing import Dict, List, Set

from test_slicer_static import MODULE_DIR, _engine_files, _engine_imports, _module_name

# The rooms around the core: command line, batch, demo, one scan file to file, scan listing, settings, training and
# its data preparation.
FRONT_ENDS = {
    f"MRIDeIdentifyLib.{name}" for name in ("cli", "batch", "demo", "onescan", "scans", "settings", "prepare", "train")
}


def import_graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in _engine_files()}
    return {
        name: _engine_imports(path, ast.parse(path.read_text())) & set(files) - {name} for name, path in files.items()
    }


def cycles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[Set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_front_end_is_part_of_an_import_cycle():
    graph = import_graph()
    assert FRONT_ENDS <= set(graph)
    assert "MRIDeIdentifyLib.scans" in graph["MRIDeIdentifyLib.prepare"]
    assert "MRIDeIdentifyLib.prepare" in graph["MRIDeIdentifyLib.train"]
    assert "MRIDeIdentifyLib.train" not in graph["MRIDeIdentifyLib.prepare"], "preparation does not know the loop"
    circles = [sorted(c) for c in cycles(graph) if c & FRONT_ENDS]
    assert not circles, f"import cycles through the front ends: {circles}"
    assert not {name for name, targets in graph.items() if "MRIDeIdentifyLib.cli" in targets} - {
        "MRIDeIdentifyLib.__main__"
    }, "only __main__ may import the command line"


def test_settings_import_neither_torch_nor_simpleitk():
    """A front end (the Slicer panel before its dependencies are installed) can read the defaults."""
    code = (
        "import sys, MRIDeIdentifyLib.settings as s; print(s.Settings().margin_mm, "
        "sorted(m for m in ('torch', 'SimpleITK', 'numpy') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=MODULE_DIR,
        env={"PYTHONPATH": str(MODULE_DIR), "PATH": ""},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["3.0", "[]"]
