"""docs/code.md's code map is the truth about the imports: every normsweep module a module imports (at the top,
under TYPE_CHECKING or inside a function) is listed in its row, and those imports form no cycle. And the cheap
paths stay cheap: --help, Hydra's composition errors and a refused value import no torch."""
import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO

SOURCES = {p.stem: p for p in (REPO / "normsweep").glob("*.py") if p.stem != "__init__"}
SOURCES.update({p.stem: p for p in (REPO / "hydra_plugins" / "normsweep_launcher").glob("*.py") if p.stem != "__init__"})
SOURCES["run"] = REPO / "run.py"


def imported(path) -> set[str]:
    """The normsweep modules a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "normsweep":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("normsweep."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("normsweep.")}
    return found


def code_map() -> dict[str, set[str]]:
    """module -> the normsweep modules its row of docs/code.md may import (the names in backticks)."""
    rows = {}
    for line in (REPO / "docs" / "code.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0].endswith(".py`"):
            module = cells[0].strip("`").rsplit("/", 1)[-1][:-3]
            rows[module] = set(re.findall(r"`([a-z_]+)`", cells[2])) & set(SOURCES)
    return rows


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_import_is_in_the_code_map(module):
    rows = code_map()
    assert module in rows, f"docs/code.md has no row for {module}"
    assert imported(SOURCES[module]) <= rows[module], f"{module} imports {sorted(imported(SOURCES[module]) - rows[module])}"


def test_the_imports_form_no_cycle():
    graph = {module: imported(path) & set(SOURCES) for module, path in SOURCES.items()}

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        for other in graph[module]:
            visit(other, path + [module])

    for module in graph:
        visit(module, [])


@pytest.mark.parametrize("args", [["--help"], ["batch_size=0"], ["norm=bm"]])
def test_help_and_refusals_import_no_torch(tmp_path, args):
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    modules = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert modules and not [m for m in modules if m.split(".")[0] == "torch"]
    assert proc.returncode == (0 if args == ["--help"] else 2)
