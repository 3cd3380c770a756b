"""The traced-graph cache (frontends/cache.py): a hit gives the graph a fresh trace gives,
and anything the trace depends on -- the model's code, attributes, tensors, inputs, mode --
misses."""
import importlib.util
import json
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from autopar.compiler.interpret import max_abs_error
from autopar.compiler.ir import print_graph
from autopar.compiler.ops import REGISTRY
from autopar.frontends import cache
from autopar.frontends.tracing import trace
from autopar.pipeline import load_model


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTOPAR_TRACE_CACHE", raising=False)
    return tmp_path / "cache" / "traces"


def same(a, b):
    assert print_graph(a) == print_graph(b)
    assert (a.notes, a.input_sizes, a.aliases) == (b.notes, b.input_sizes, b.aliases)


def cached(g) -> bool:
    return getattr(g, "trace_cached", False)


def test_a_hit_is_the_graph_a_trace_gives_and_runs():
    model, inputs, name = load_model("examples/gpt.py:build")
    for symbolic in (False, True):
        first = trace(model, inputs, name=name, symbolic=symbolic)
        again = trace(model, inputs, name=name, symbolic=symbolic)
        assert not cached(first) and cached(again)
        same(first, again)
        err, scale = max_abs_error(model, again, inputs)
        assert err <= 1e-5 * max(1.0, scale)
    # sizes read from the batch survive as expressions
    assert any(getattr(s, "expr", None) for v in again.values() for s in v.shape)


class Scaled(nn.Module):
    def __init__(self, scale=2.0, act=torch.tanh):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = scale          # a plain attribute: not in repr(model)
        self.act = act

    def forward(self, x, y):
        return nn.functional.mse_loss(self.act(self.lin(x)) * self.scale, y)


def test_what_the_trace_depends_on_misses():
    torch.manual_seed(0)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    base = trace(Scaled(), (x, y))
    assert cached(trace(Scaled(), (x, y)))            # new weights, same graph: a hit
    for model, inputs in [(Scaled(scale=3.0), (x, y)),
                          (Scaled(act=torch.sigmoid), (x, y)),
                          (Scaled(), (torch.randn(6, 8), torch.randn(6, 8))),
                          (Scaled().double(), (x.double(), y.double()))]:
        g = trace(model, inputs)
        assert not cached(g)
        assert print_graph(g) != print_graph(base)
    m = Scaled()
    m.lin.weight.requires_grad_(False)                # frozen: another graph
    assert not cached(trace(m, (x, y)))
    assert not cached(trace(Scaled(), (x, y), mode="fx"))


def factory(power):
    class Pow(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return (self.lin(x) ** power).sum()
    return Pow


def test_a_class_made_in_a_factory_differs_by_what_it_closes_over():
    x = torch.randn(2, 4)
    a = trace(factory(2)(), (x,))
    b = trace(factory(3)(), (x,))
    assert not cached(b) and print_graph(a) != print_graph(b)
    assert cached(trace(factory(3)(), (x,)))


def load_file_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_an_edit_to_the_models_source_misses(tmp_path):
    src = tmp_path / "usermodel.py"
    body = ("import torch.nn as nn\n\n"
            "def act(t):\n    return t.{}()\n\n"
            "class M(nn.Module):\n"
            "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(4, 4)\n\n"
            "    def forward(self, x):\n        return act(self.lin(x)).sum()\n")
    src.write_text(body.format("relu"))
    try:
        mod = load_file_module(src, "usermodel_cache_test")
        x = torch.randn(2, 4)
        first = trace(mod.M(), (x,))
        assert cached(trace(mod.M(), (x,)))
        # a helper beside the class changes; the class itself does not
        src.write_text(body.format("sigmoid") + "\n")
        mod = load_file_module(src, "usermodel_cache_test")
        g = trace(mod.M(), (x,))
        assert not cached(g)
        assert "sigmoid" in print_graph(g) and "sigmoid" not in print_graph(first)
    finally:
        sys.modules.pop("usermodel_cache_test", None)


class Masked(nn.Module):
    """A tensor attribute (not a buffer): export lifts it as a constant of the graph."""

    def __init__(self, k=0):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mask = torch.tril(torch.ones(4, 4), diagonal=k)

    def forward(self, x):
        return (self.lin(x) * self.mask).sum()


def test_tensor_constants_are_stored_and_keyed_by_value(cache_dir):
    x = torch.randn(4, 4)
    first = trace(Masked(), (x,))
    if not first.constants:
        pytest.fail("export did not lift the mask: this test no longer covers constants")
    again = trace(Masked(), (x,))
    assert cached(again)
    assert list(cache_dir.glob("*.safetensors"))
    for k, v in first.constants.items():
        assert torch.equal(again.constants[k], v)
    model = Masked()
    err, scale = max_abs_error(model, trace(model, (x,)), (x,))
    assert err <= 1e-5 * max(1.0, scale)
    assert not cached(trace(Masked(k=1), (x,)))       # another mask: another graph


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.i0(self.lin(x)).sum()


def test_an_opaque_op_is_registered_and_warned_again_on_a_hit():
    x = torch.randn(2, 4)
    REGISTRY.pop("special_i0", None)                   # as in a fresh process
    with pytest.warns(UserWarning, match="'special_i0'.*no sharding rule"):
        first = trace(Opaque(), (x,))
    # another fresh process: only the cache entry knows the op
    REGISTRY.pop("special_i0", None)
    with pytest.warns(UserWarning, match="'special_i0'.*no sharding rule"):
        again = trace(Opaque(), (x,))
    assert cached(again) and "special_i0" in REGISTRY
    same(first, again)
    model = Opaque()
    err, scale = max_abs_error(model, trace(model, (x,)), (x,))
    assert err <= 1e-5 * max(1.0, scale)


def test_a_broken_entry_is_traced_again(cache_dir):
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    first = trace(Scaled(), (x, y))
    (entry,) = cache_dir.glob("*.json")
    entry.write_text(entry.read_text()[:100])          # truncated
    g = trace(Scaled(), (x, y))
    assert not cached(g)
    same(first, g)
    data = json.loads(entry.read_text())                # rewritten whole
    data["graph"]["values"][0][2] = "torch.nonsense"
    entry.write_text(json.dumps(data))
    assert not cached(trace(Scaled(), (x, y)))
    assert cached(trace(Scaled(), (x, y)))


def test_the_cache_can_be_turned_off(cache_dir, monkeypatch):
    monkeypatch.setenv("AUTOPAR_TRACE_CACHE", "0")
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    trace(Scaled(), (x, y))
    assert not cached(trace(Scaled(), (x, y)))
    assert not cache_dir.exists()


def test_the_key_is_the_same_in_another_process(tmp_path):
    import subprocess
    code = ("import sys; from autopar.pipeline import load_model; from autopar.frontends import cache\n"
            "for spec in ('examples/gpt.py:build', 'tests/models/hf_zoo.py:gpt2'):\n"
            "    m, i, n = load_model(spec); print(cache.key_of(m, i, 'export', n, False))\n")
    keys = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout.split()
            for seed in ("1", "2")]
    assert len(keys[0]) == 2 and keys[0] == keys[1]


def test_the_folder_keeps_the_most_recently_used_entries(cache_dir, monkeypatch):
    """Each store evicts the least recently used entries beyond the count and byte caps (a
    hit is a use), never the entry just stored, and a crashed writer's old temporary file."""
    import os
    import time
    from autopar.compiler.errors import InputError
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    models = [Scaled(scale=float(k)) for k in range(3)]
    keys = []

    def stored(m):                                      # trace `m`, note its new entry
        before = {p.stem for p in cache_dir.glob("*.json")}
        trace(m, (x, y))
        keys.append(({p.stem for p in cache_dir.glob("*.json")} - before).pop())
    for k, m in enumerate(models[:2]):
        stored(m)
        os.utime(cache_dir / f"{keys[-1]}.json", (1000 + k, 1000 + k))     # stored in this order
    assert cached(trace(models[0], (x, y)))            # the older one used again: now the newest
    stale = cache_dir / "left.tmp"
    stale.write_text("")
    os.utime(stale, (time.time() - 2 * cache.STALE_TMP_S,) * 2)
    fresh = cache_dir / "writing.tmp"
    fresh.write_text("")
    stored(models[2])                                  # a third: the least recently used goes
    assert {p.stem for p in cache_dir.glob("*.json")} == {keys[0], keys[2]}
    assert not stale.exists() and fresh.exists()
    assert cached(trace(models[0], (x, y))) and not cached(trace(models[1], (x, y)))
    # a byte cap below two entries keeps one: the one just stored
    size = max(p.stat().st_size for p in cache_dir.glob("*.json"))
    monkeypatch.setenv("AUTOPAR_TRACE_CACHE_MB", str(1.5 * size / 2**20))
    trace(Scaled(scale=9.0), (x, y))
    assert len(list(cache_dir.glob("*.json"))) == 1
    monkeypatch.setenv("AUTOPAR_TRACE_CACHE_MB", "lots")
    with pytest.raises(InputError, match="AUTOPAR_TRACE_CACHE_MB='lots'"):
        cache.evict(cache_dir)


def test_ranks_tracing_the_same_model_at_once_trace_it_once(monkeypatch):
    """The ranks of a job that compiles in its own loop all trace the same model at start:
    one traces it (a lock per key), the others wait and read its graph."""
    import threading
    from autopar.frontends import tracing
    real, traced = tracing._trace, []

    def counted(*args):
        traced.append(1)
        return real(*args)
    monkeypatch.setattr(tracing, "_trace", counted)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    graphs = []
    ranks = [threading.Thread(target=lambda: graphs.append(trace(Scaled(scale=3.0), (x, y)))) for _ in range(3)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert len(traced) == 1 and len(graphs) == 3
    assert sorted(cached(g) for g in graphs) == [False, True, True]
    for g in graphs[1:]:
        same(graphs[0], g)
