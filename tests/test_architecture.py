"""The direction of imports between the stages (STYLE.md 16: drivers above the core).

Every `import` and `from ... import` in a stage's files -- at the top or inside a function
-- may name only the stages below it:

    compiler (the core)   <- frontends, passes, dsl, backends   <- autopar (the drivers)

The runtime generated programs import stands apart: it may read the core's collective
table (a standard-library-only module) and nothing else of autopar.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# folder -> the autopar packages its files may import
ALLOWED = {
    "compiler": {"autopar.compiler"},
    "frontends": {"autopar.compiler", "autopar.frontends"},
    "passes": {"autopar.compiler", "autopar.passes"},
    "dsl": {"autopar.compiler", "autopar.passes", "autopar.dsl"},
    "backends": {"autopar.compiler", "autopar.backends"},
    # the runtime reads the compiler's torch-only modules: the collective table, buckets, the experts math
    "backends/runtime": {"autopar.compiler.collectives", "autopar.compiler.buckets", "autopar.compiler.moe", "autopar.backends.runtime"},
}


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if node.module == "autopar" or node.module.endswith(".runtime")]
    return out


def stage_of(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    return "backends/runtime" if rel.startswith("backends/runtime/") else rel.split("/")[0]


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_what_lies_below(stage):
    folder = ROOT / stage
    files = sorted(folder.rglob("*.py"))
    assert files, f"no python files under {stage}/"
    bad = []
    for f in files:
        if stage_of(f) != stage:
            continue
        for line, name in imports_of(f):
            if not name.startswith("autopar"):
                continue
            if name in ("autopar", "autopar.backends") and stage.startswith("backends"):
                continue              # `from autopar.backends import runtime as rt`
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[stage]):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)
