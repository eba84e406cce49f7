"""The local mesh library stays free of CLI code, and `make run` passes options through."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from tests.conftest import REPO


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_localmesh_imports_nothing_from_the_cli():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p)
                                                  if m.startswith("services.cli"))
                 for p in (REPO / "services" / "localmesh").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_make_run_passes_args_to_meshserve_up():
    out = subprocess.run(["make", "-n", "run", 'ARGS=--base-port 19000 --servers 1'],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "meshserve up --demo --base-port 19000 --servers 1" in out.stdout
