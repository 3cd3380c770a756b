"""Shared fixtures: example loading (traced once per session) and golden-file checks.

Golden files regenerate with `pytest --update-golden` or `UPDATE_GOLDEN=1`; a mismatch
fails with a unified diff."""
from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/* from the current output")


def load_example(name: str):
    """Import examples/<name>.py by path (as the CLI does) and return the module."""
    mod_name = f"autopar_example_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example():
    return load_example


_traced: dict = {}


@pytest.fixture(scope="session")
def traced():
    """traced(name, mode="export") -> (model, inputs, lowered graph, prepared graph), cached.
    The prepared graph is what every entry point plans: pruned, fused projections cut."""
    from autopar.frontends.tracing import trace
    from autopar.compiler.verify import verify
    from autopar.passes.prepare import prepare

    def get(name: str, mode: str = "export"):
        key = (name, mode)
        if key not in _traced:
            model, inputs = load_example(name).build()
            g = verify(trace(model, inputs, mode=mode, name=name))
            _traced[key] = (model, inputs, g, verify(prepare(g)))
        return _traced[key]
    return get


@pytest.fixture
def golden(request):
    """golden(relative_path, text): compare with tests/golden/<relative_path>."""
    update = request.config.getoption("--update-golden") or os.environ.get("UPDATE_GOLDEN") == "1"

    def check(rel: str, text: str):
        path = GOLDEN / rel
        if update or not path.exists():
            if not update and os.environ.get("CI"):
                pytest.fail(f"golden file {rel} is missing; run pytest --update-golden and commit it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return
        want = path.read_text()
        if want != text:
            diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                                f"golden/{rel}", "actual", n=2))
            pytest.fail(f"output differs from golden/{rel} (regenerate with "
                        f"pytest --update-golden if the change is intended):\n{diff}")
    return check


@pytest.fixture(autouse=True)
def forget_temporary_specs():
    """A SPEC a test loads from its temporary folder stays in sys.modules (as
    autopar_spec_<name>), and the trace cache keys every graph on the imported user modules
    outside this repo (path, size, mtime): one left behind would make every later trace of
    the session miss the cache and export again. Drop them after each test."""
    yield
    root = str(ROOT)
    for name in [n for n in sys.modules if n.startswith("autopar_spec_")]:
        f = getattr(sys.modules[name], "__file__", None)
        if f and not str(pathlib.Path(f).resolve()).startswith(root):
            del sys.modules[name]
