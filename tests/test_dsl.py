"""The plan DSL: the catalogue of malformed files (each its own named error, with line,
column and caret), mutation fuzzing (nothing but PlanFileError escapes), the example plans,
`write_plan` round trips, and `autopar check-plan`.

Each example model is traced once per session (conftest's `traced`)."""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import random
import re
import warnings
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autopar.compiler.plan import Plan
from autopar.compiler.sharding import (Pin, derive_layouts, enumerate_strategies, node_annotations,
                                       producer_key, source_annotation)
from autopar.dsl import PlanFileError, load_plan, parse_plan, resolve, write_plan
from autopar.dsl import errors as E
from autopar.dsl.emit import compact, format_bytes, pin_layout
from autopar.compiler.patterns import generalize, matches, module_outputs

ROOT = pathlib.Path(__file__).resolve().parent.parent
BAD = pathlib.Path(__file__).resolve().parent / "dsl_bad"
PLANS = ROOT / "examples" / "plans"
DEVICES = ["a100-80g", "cpu", "h100", "h200", "mi250x"]
# example plan -> the model it is written for
PLAN_MODELS = {"tensor_parallel_mlp": "mlp", "megatron_gpt": "gpt", "gpt_blocks": "gpt",
               "zero3_llama": "llama", "recompute_gpt": "gpt", "lora_gpt": "lora",
               "pipeline_gpt": "gpt", "data_parallel_gpt": "gpt"}


@pytest.fixture(scope="module")
def graph(traced):
    """graph(name) -> the pruned graph of examples/<name>.py, traced once."""
    return lambda name: traced(name)[3]


# ---- the catalogue of syntax examples ------------------------------------------------------------

@pytest.mark.parametrize("cls,example", [(cls, ex) for cls, exs in E.SYNTAX_EXAMPLES.items() for ex in exs],
                         ids=lambda x: x.__name__ if isinstance(x, type) else repr(x))
def test_catalogue_example_raises_its_class(cls, example):
    with pytest.raises(E.PlanSyntaxError) as info:
        parse_plan(example)
    assert type(info.value) is cls, str(info.value)


# ---- malformed plan files: each its own named error, at its line and column -----------------------

EXPECT = re.compile(r"# expect: (\w+) at (?:(\S+):)?(\d+):(\d+)")


def bad_files():
    return sorted(p for p in BAD.glob("*.plan"))


@pytest.mark.parametrize("path", bad_files(), ids=lambda p: p.stem)
def test_bad_plan_file(path, graph):
    m = EXPECT.search(path.read_text())
    assert m, f"{path.name} needs a '# expect: Class at line:col' header"
    cls_name, file, line, col = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    with pytest.raises(PlanFileError) as info:
        resolve(load_plan(str(path)), graph("gpt"), devices=DEVICES)
    e = info.value
    assert type(e).__name__ == cls_name, str(e)
    assert (e.line, e.column) == (line, col), str(e)
    assert pathlib.Path(e.file).resolve() == (BAD / file if file else path).resolve()
    text = str(e)
    # file:line:col, the class, the source line, a caret under the column, a fix
    assert text.startswith(f"{e.file}:{line}:{col}: {cls_name}: ")
    src, caret = text.splitlines()[1:3]
    assert src.startswith(f"{line:5d} | ")
    assert caret.index("^") - caret.index("|") - 2 == len(e.text.split("\n")[line - 1][:col - 1].expandtabs())
    assert "\n  fix: " in text


def test_catalogue_is_large_and_distinct():
    files = bad_files()
    classes = {EXPECT.search(p.read_text()).group(1) for p in files}
    assert len(files) >= 20 and len(classes) >= 20, (len(files), len(classes))
    for name in classes:                     # every class named is a PlanFileError
        assert issubclass(getattr(E, name), PlanFileError)


def test_all_errors_are_user_errors():
    from autopar.compiler import errors
    assert issubclass(E.UnknownAxis, errors.UserError)
    assert issubclass(E.BadMeshAxis, errors.UserError)


def test_error_messages_suggest_fixes(graph):
    def err(text):
        with pytest.raises(PlanFileError) as info:
            resolve(parse_plan(text), graph("gpt"))
        return str(info.value)

    assert "did you mean \"transformer.h.*.mlp.c_fc.weight\"" in err(
        'mesh tp=4\nlayout "transformer.h.*.mlp.c_fc.weights" { tp: S(0) }')
    assert "use one of the mesh axes dp, tp" in err('mesh dp=2, tp=4\nlayout "transformer.wte.weight" { pt: R }')
    assert "did you mean S(0)?" in err('mesh tp=4\nlayout "transformer.wte.weight" { tp: Shard(0) }')
    assert "partial sum" in err('mesh tp=4\nlayout "transformer.wte.weight" { tp: P }')
    assert 'write output of "transformer.h.0.mlp"' in err('mesh tp=4\nreplicate "transformer.h.0.mlp"')
    assert "did you mean 'memory'?" in err("mesh tp=4\nmemroy 80GB")
    assert "the model's inputs are idx, targets" in err('mesh tp=4\nreplicate input "tokens"')
    assert "(dims 0)" in err('mesh tp=128\nlayout "transformer.h.0.mlp.c_fc.weight" { tp: S(1) }')


# ---- the language: selections, includes, overrides ----------------------------------------------

def test_patterns():
    assert matches("transformer.h.*.mlp.c_fc.weight", "transformer.h.11.mlp.c_fc.weight")
    assert not matches("transformer.h.*", "transformer.h.0.mlp")
    assert matches("transformer.**", "transformer.h.0.mlp")
    assert matches("transformer.h.*.ln_?.*", "transformer.h.0.ln_1.bias")
    assert matches("layers.[!0].*", "layers.1.ffn_norm") and not matches("layers.[!0].*", "layers.0.ffn_norm")
    assert generalize("transformer.h.12.mlp") == "transformer.h.*.mlp"


def test_module_outputs(graph):
    outs = module_outputs(graph("gpt"))
    assert outs["transformer.h.0.mlp.c_fc"].name == "linear_2"
    assert outs["transformer.h.0.mlp"].name == "linear_3"         # c_proj's output leaves the MLP
    assert outs["transformer.h.0"].name == "add_2"                # the residual sum
    lora = module_outputs(graph("lora"))
    assert lora["transformer.h.0.attn.c_attn"].name == "add_1"    # base + scaled adapter


def test_megatron_example(graph):
    spec = resolve(load_plan(str(PLANS / "megatron_gpt.plan")), graph("gpt"), devices=DEVICES)
    assert spec.mesh == {"dp": 2, "tp": 4} and spec.zero == 1 and spec.dp_axis == "dp"
    assert spec.memory_limit == 80e9 and spec.device == "h100" and spec.objective == "time"
    pins = {p.value: p for p in spec.pins}
    # the fused q/k/v weight may be cut into pieces (passes/unfuse.py): its name pins them all
    c_attn = [v for v in pins if re.fullmatch(r"transformer\.h\.1\.attn\.c_attn\.weight(\.\d+)?", v)]
    assert c_attn and all(pins[v].layout == (None, "S(0)") for v in c_attn)
    assert pins["transformer.h.0.mlp.c_proj.weight"].layout == (None, "S(1)")
    c_fc = module_outputs(graph("gpt"))["transformer.h.0.mlp.c_fc"].name
    assert pins[c_fc].layout == (None, "S(2)")
    assert pins["idx"].layout == ("S(0)", "R")
    assert pins["transformer.h.0.ln_1.bias"].layout == ("R", "R")
    # origins point at the statement, in the included file where it was written
    line = next(i for i, text in enumerate((PLANS / "gpt_blocks.plan").read_text().splitlines(), 1)
                if text.startswith('layout "transformer.h.*.attn.c_attn.weight"'))
    assert re.search(rf"gpt_blocks\.plan:{line}:1$", pins[c_attn[0]].origin)
    assert spec.files[1].endswith("gpt_blocks.plan")
    assert any("include" not in c and f"gpt_blocks.plan:{line}:1" in c for c in spec.constraints)


def test_every_example_plan_resolves(graph):
    for path in sorted(PLANS.glob("*.plan")):
        spec = resolve(load_plan(str(path)), graph(PLAN_MODELS[path.stem]),
                       mesh={"dp": 2, "tp": 4} if path.stem == "gpt_blocks" else None, devices=DEVICES)
        assert spec.pins, path.name
        # the normalised form is itself a plan file meaning the same pins
        again = resolve(parse_plan(spec.format()), graph(PLAN_MODELS[path.stem]))
        assert {(p.value, p.layout) for p in again.pins} == {(p.value, p.layout) for p in spec.pins}
        assert again.mesh == spec.mesh and again.zero == spec.zero
        assert again.recompute_modules == spec.recompute_modules


def test_recompute_and_lora_examples(graph):
    spec = resolve(load_plan(str(PLANS / "recompute_gpt.plan")), graph("gpt"))
    assert spec.recompute == ["transformer.h.*"]
    assert spec.recompute_modules == ["transformer.h.0", "transformer.h.1"]
    assert spec.memory_limit == 2 * 2**20
    lora = resolve(load_plan(str(PLANS / "lora_gpt.plan")), graph("lora"))
    pinned = {p.value for p in lora.pins}
    assert "transformer.h.0.attn.c_attn.base.weight" in pinned
    assert "transformer.h.0.attn.c_attn.lora_A" not in pinned
    assert "transformer.h.1.attn.c_proj.lora_B" in lora.free


def test_auto_releases_and_axes_merge(graph):
    g = graph("gpt")
    text = """mesh dp=2, tp=4
    layout "transformer.h.*.mlp.c_fc.weight" { tp: S(0) }
    layout "transformer.h.*.mlp.c_fc.weight" { dp: R }          # another axis: merges
    auto "transformer.h.1.mlp.c_fc.weight"                      # release block 1 ...
    layout "transformer.h.1.mlp.c_fc.weight" { tp: S(1) }       # ... and pin it differently
    layout "transformer.h.0.mlp.c_fc.bias" { tp: S(0), dp: auto }
    """
    pins = {p.value: p.layout for p in resolve(parse_plan(text), g).pins}
    assert pins["transformer.h.0.mlp.c_fc.weight"] == ("R", "S(0)")
    assert pins["transformer.h.1.mlp.c_fc.weight"] == (None, "S(1)")
    assert pins["transformer.h.0.mlp.c_fc.bias"] == (None, "S(0)")


def test_whitespace_insensitive_and_tied_names(graph):
    one_line = ('mesh dp=2,tp=4 zero 3 layout "lm_head.weight"{tp:S(0)} replicate "transformer.wpe.weight" '
                'minimize memory')
    spec = resolve(parse_plan(one_line), graph("gpt"))
    assert spec.zero == 3 and spec.dp_axis == "dp" and spec.objective == "memory"
    # lm_head.weight is tied to the token embedding: the pin lands on the real parameter
    assert spec.pin("transformer.wte.weight").layout == (None, "S(0)")
    with pytest.raises(E.ConflictingPins):
        resolve(parse_plan(one_line + '\nlayout "transformer.wte.weight" { tp: S(1) }'), graph("gpt"))


def test_mesh_from_the_command_line(graph):
    spec = resolve(parse_plan('replicate "transformer.wpe.weight"'), graph("gpt"), mesh={"dp": 8})
    assert spec.mesh == {"dp": 8} and spec.pins[0].layout == ("R",)
    with pytest.raises(E.MeshMismatch):
        resolve(parse_plan("mesh dp=4"), graph("gpt"), mesh={"dp": 8})


def test_negative_dims_and_size_one_axes(graph):
    spec = resolve(parse_plan('mesh dp=1, tp=4\nlayout "transformer.wte.weight" { dp: S(0), tp: S(-1) }'),
                   graph("gpt"))
    assert spec.pins[0].layout == ("R", "S(1)")      # an axis of size 1 splits nothing


# ---- mutation fuzzing: nothing but PlanFileError escapes -----------------------------------------

SNIPPETS = ['"', "{", "}", ",", ":", "(", ")", "=", "#", "\n", " ", "\t", "\r", "S(", "S(9)", "P", "R",
            "auto", "*", "**", "?", "[", "]", "[!", "-1", "99", "0", "2.5", "include ", 'include "',
            "mesh ", "layout ", "output of ", "input ", "value ", "zero ", "over", "dp", "tp", "pp",
            "memory ", "GB", "minimize ", "recompute ", "replicate ", "é", "\x00", "\u2028",
            "999999999999999999999999999999", "transformer.h.*", "gpt_blocks.plan", "..", "/",
            "checkpoint ", "every 0 steps ", 'to "c" ', "keep ", " async", "resume ", 'from "c"',
            "overlap ", "off", "bucket 25MB ", "first ", "prefetch "]


@st.composite
def mutated(draw):
    path = draw(st.sampled_from(sorted(PLANS.glob("*.plan"))))
    text = path.read_text()
    if draw(st.booleans()):                      # comments absorb mutations: drop them
        text = re.sub(r"#[^\n]*", "", text)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "swap", "tokens"]))
        i = draw(st.integers(0, max(len(text) - 1, 0)))
        if kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 4)):]
        elif kind == "insert":
            piece = draw(st.one_of(st.sampled_from(SNIPPETS), st.characters(), st.text(max_size=3)))
            text = text[:i] + piece + text[i:]
        elif kind == "swap" and len(text) > 1:
            j = draw(st.integers(0, len(text) - 1))
            chars = list(text)
            chars[i], chars[j] = chars[j], chars[i]
            text = "".join(chars)
        else:                                    # shuffle, drop or duplicate whole tokens
            tokens = text.split(" ")
            a = draw(st.integers(0, len(tokens) - 1))
            b = draw(st.integers(a, min(a + 6, len(tokens))))
            op = draw(st.sampled_from(["shuffle", "drop", "dup"]))
            window = tokens[a:b]
            if op == "shuffle":
                random.Random(draw(st.integers(0, 1000))).shuffle(window)
            elif op == "drop":
                window = []
            else:
                window = window + window
            text = " ".join(tokens[:a] + window + tokens[b:])
    return path, text


# DSL_FUZZ_EXAMPLES=20000 pytest -k mutated  for a longer hunt
@settings(max_examples=int(os.environ.get("DSL_FUZZ_EXAMPLES", 600)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_plans_raise_only_plan_file_errors(case, graph):
    path, text = case
    try:
        planfile = parse_plan(text, str(path))
        spec = resolve(planfile, graph(PLAN_MODELS[path.stem]), devices=DEVICES)
        spec.format()
    except PlanFileError as e:
        rendered = str(e)                         # rendering never fails either
        assert e.text is not None and e.line >= 1 and e.column >= 1
        assert e.line <= len(e.text.split("\n")), rendered
        assert rendered.startswith(f"{e.file}:{e.line}:{e.column}: {type(e).__name__}: ")


# ---- write_plan round trips --------------------------------------------------------------------

def handmade_plan(graph, mesh: dict[str, int], how: str, seed: int = 0) -> Plan:
    """A plan with one strategy per producer, chosen among the legal ones: `blocks` picks
    the same choice in structurally identical blocks (what a search with repeated-block
    linking returns), `random` anything."""
    annos = node_annotations(graph)
    rng = random.Random(seed)
    strategies = {}

    def pick(opts, key: str):
        if how == "random":
            return rng.choice(opts)
        return opts[zlib.crc32(f"{key}/{seed}".encode()) % len(opts)]

    for v in (*graph.inputs, *graph.params):
        opts = enumerate_strategies(source_annotation(v.shape), [], [v.shape], mesh)
        strategies[v.name] = pick(opts, generalize(v.name))
    for n in graph.nodes:
        key = producer_key(n)
        opts = enumerate_strategies(annos[key], [i.shape for i in n.inputs], [o.shape for o in n.outputs], mesh)
        strategies[key] = pick(opts, f"{n.op}{[o.shape for o in n.outputs]}{generalize(n.meta.module)}")
    layouts = derive_layouts(graph, mesh, strategies, annos)
    return Plan(model=graph.name, mesh=dict(mesh), device="h100", memory_limit=80 * 2**30,
                strategies={k: list(s) for k, s in strategies.items()},
                layouts={k: list(v) for k, v in layouts.items()}, zero=1, dp_axis="dp",
                recompute=["transformer.h.*.mlp"] if "gpt" in graph.name or "lora" in graph.name else [])


def expected_pins(plan: Plan, graph) -> dict[str, tuple]:
    """What write_plan must pin: inputs, parameters, module outputs (P axes left free)."""
    outs = {v.name for v in module_outputs(graph).values()}
    want = {}
    for v in graph.values():
        if v.kind in ("input", "param", "buffer") or v.name in outs:
            lay = pin_layout(plan.layouts[v.name])
            if any(p is not None for p in lay):
                want[v.name] = lay
    return want


@pytest.mark.parametrize("model", ["mlp", "gpt", "llama", "lora"])
@pytest.mark.parametrize("how,seed", [("blocks", 0), ("blocks", 1), ("random", 2)])
def test_write_plan_round_trip_handmade(model, how, seed, graph):
    g = graph(model)
    plan = handmade_plan(g, {"dp": 2, "tp": 2}, how, seed)
    text = write_plan(plan, g)
    spec = resolve(parse_plan(text), g)
    assert {p.value: p.layout for p in spec.pins} == expected_pins(plan, g), text
    assert spec.mesh == plan.mesh and spec.zero == 1 and spec.memory_limit == 80 * 2**30
    assert spec.recompute == plan.recompute
    if how == "blocks" and model != "mlp":
        # repeated blocks fold into patterns: fewer lines than pinned values
        assert "h.*." in text or "layers.*." in text
        assert text.count("\n") < len(spec.pins)


SEARCHED_PLANS = sorted(n for n in PLAN_MODELS if n != "gpt_blocks")


def layouts_of(plan: Plan) -> dict:
    return {k: tuple(v) for k, v in plan.layouts.items()}


def round_trip(plan: Plan, g) -> Plan:
    """write_plan -> parse -> resolve -> search again under the pins it wrote."""
    from autopar.dsl import search_with
    spec = resolve(parse_plan(write_plan(plan, g)), g)
    return search_with(spec, g, deterministic=True)


@pytest.mark.parametrize("name", SEARCHED_PLANS)
def test_example_plan_searches_and_round_trips(name, graph):
    pytest.importorskip("autopar.passes.shard")
    from autopar.dsl import compile_plan
    g = graph(PLAN_MODELS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # every statement is searched as written
        plan = compile_plan(str(PLANS / f"{name}.plan"), g, deterministic=True)
    spec = resolve(load_plan(str(PLANS / f"{name}.plan")), g)
    assert plan.solver["minimize"] == spec.objective
    for pin in spec.pins:                                 # every pin holds in the plan
        got = plan.layouts[pin.value]
        assert all(w is None or w == x for w, x in zip(pin.layout, got)), (pin, got)
    assert plan.constraints == spec.constraints and plan.mesh == spec.mesh
    assert spec.zero is None or plan.zero == spec.zero
    again = round_trip(plan, g)
    assert layouts_of(again) == layouts_of(plan)
    assert (again.zero, again.recompute, again.memory_limit) == (plan.zero, plan.recompute, plan.memory_limit)


@pytest.mark.parametrize("model", ["mlp", "gpt", "llama", "lora"])
def test_write_plan_round_trip_search(model, graph):
    """A searched plan with varied layouts (the search works around random legal parameter
    layouts) comes back unchanged from its plan file."""
    shard = pytest.importorskip("autopar.passes.shard")
    g = graph(model)
    mesh = {"dp": 2, "tp": 2}
    seeds = handmade_plan(g, mesh, "blocks", 0)
    pins = [Pin(p.name, tuple(seeds.layouts[p.name]), "test") for p in g.params]
    plan = shard.search(g, mesh, "h100", pins=pins, deterministic=True)
    assert len(set(layouts_of(plan).values())) >= 2            # not all replicated
    assert layouts_of(round_trip(plan, g)) == layouts_of(plan)


def test_written_plans_keep_repeated_blocks_linked(graph, example):
    """A written plan pins every block alike (and each block's output, which the next block
    follows); solved again, the blocks still share their variables, so the problem does
    not grow with depth -- the same size for 2 and 4 layers, and the same plan."""
    from autopar.frontends.tracing import trace
    from autopar.passes.prepare import prepare
    shard = pytest.importorskip("autopar.passes.shard")
    gm = example("gpt")
    model, inputs = gm.build(gm.GPTConfig(block_size=32, vocab_size=128, n_layer=4, n_head=4, n_embd=64))
    mesh = {"dp": 2, "tp": 2}
    solved = {}
    for layers, g in ((2, graph("gpt")), (4, prepare(trace(model, inputs, name="gpt")))):
        seeds = handmade_plan(g, mesh, "blocks", 0)       # varied layouts, alike in every block
        pins = [Pin(p.name, tuple(seeds.layouts[p.name]), "test") for p in g.params]
        plan = shard.search(g, mesh, "h100", pins=pins, deterministic=True)
        again = round_trip(plan, g)
        assert layouts_of(again) == layouts_of(plan)
        solved[layers] = again.solver
    two, four = solved[2], solved[4]
    assert four["variables_before"] > two["variables_before"]
    assert four["variables_after_linking"] == two["variables_after_linking"]
    assert four["classes_after_linking"] == two["classes_after_linking"]
    assert four["repeated_block_kinds"] == 1


def test_minimize_memory(graph):
    """`minimize memory`: the least memory per device (ties broken by time) -- never more
    than the fastest plan's, less where parameters can be sharded; written out, it keeps
    its objective and comes back the same."""
    from autopar.dsl import search_with
    g = graph("gpt")

    def solve(text):
        return search_with(resolve(parse_plan(text), g), g, deterministic=True, time_limit=3)
    for mesh in ("dp=1", "dp=2, tp=2"):
        fast = solve(f"mesh {mesh}\ndevice h100\n")
        small = solve(f"mesh {mesh}\ndevice h100\nminimize memory\n")
        assert (fast.solver["minimize"], small.solver["minimize"]) == ("time", "memory")
        assert small.cost["memory"]["total"] <= fast.cost["memory"]["total"]
    assert small.cost["memory"]["total"] < fast.cost["memory"]["total"]
    assert small.cost["memory"]["params"] < fast.cost["memory"]["params"]      # sharded parameters
    assert "minimize memory" in write_plan(small, g)
    again = round_trip(small, g)
    assert layouts_of(again) == layouts_of(small) and again.zero == small.zero


def test_compile_api_takes_plan_files(graph):
    pytest.importorskip("autopar.passes.shard")
    from autopar.pipeline import make_plan
    plan, pinned = make_plan(graph("mlp"), plan=str(PLANS / "tensor_parallel_mlp.plan"))
    assert "net.0.weight" in pinned
    assert isinstance(plan, Plan) and plan.mesh == {"tp": 4}
    assert plan.layouts["net.0.weight"] == ["S(0)"] and plan.layouts["gelu"] == ["S(1)"]


def test_write_plan_folds_uniform_layouts(graph):
    g = graph("gpt")
    plan = handmade_plan(g, {"dp": 4}, "blocks")
    plan.layouts = {k: ["R"] for k in plan.layouts}
    plan.layouts["idx"] = plan.layouts["targets"] = ["S(0)"]
    text = write_plan(plan, g, activations="none")
    assert 'replicate "**"' in text and 'layout input "idx", input "targets" { dp: S(0) }' in text


def test_compact_never_overreaches():
    universe = ["a.0.x", "a.1.x", "a.2.x", "a.0.y", "b"]
    lay = {"a.0.x": ("R",), "a.1.x": ("R",), "a.2.x": ("S(0)",), "a.0.y": ("R",), "b": ("R",)}
    select = lambda p: [n for n in universe if matches(p, n)]    # noqa: E731
    out = compact(dict(lay), universe, select, lay.get)
    covered = {}
    for pat, l in out:
        for n in select(pat):
            assert lay[n] == l
            covered[n] = l
    assert covered == lay


def test_format_bytes():
    assert format_bytes(80 * 10**9) == "80GB" and format_bytes(80 * 2**30) == "80GiB"
    assert format_bytes(1234567) == "1234567B"


# ---- autopar check-plan ----------------------------------------------------------------------------

def header_comment(path: pathlib.Path) -> str:
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines()))


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.plan")), ids=lambda p: p.stem)
def test_check_plan_every_example(path, traced, monkeypatch, capsys):
    """`autopar check-plan FILE SPEC` accepts every example plan against the model its
    header comment names (with the --mesh the header gives, for a file without a mesh).
    The CLI's trace goes through the session's cache: one trace per example."""
    import autopar.frontends.tracing as tracing
    from autopar.cli import main
    header = header_comment(path)
    spec = re.search(r"examples/(\w+)\.py:build", header)
    assert spec, f"{path.name}: name its model in the header comment (examples/NAME.py:build)"
    assert spec.group(1) == PLAN_MODELS[path.stem]
    mesh = re.search(r"--mesh (\S+)", header)
    monkeypatch.setattr(tracing, "trace", lambda model, inputs, mode="export", name=None, **kw: traced(name, mode)[2])
    rc = main(["check-plan", str(path), str(ROOT / spec.group(0))] + (["--mesh", mesh.group(1)] if mesh else []))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"# ok: {path} fits {spec.group(1)} (" in out


def test_check_plan_cli(capsys):
    from autopar.cli import main
    rc = main(["check-plan", str(PLANS / "megatron_gpt.plan"), str(ROOT / "examples" / "gpt.py") + ":build"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mesh dp=2, tp=4" in out
    assert 'layout "transformer.h.0.mlp.c_fc.weight" { tp: S(0) }' in out
    assert "# ok:" in out
    rc = main(["check-plan", str(BAD / "unknown_axis.plan"), str(ROOT / "examples" / "gpt.py") + ":build"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "UnknownAxis" in err and "^" in err and "did you mean 'tp'?" in err


# ---- checkpoint, resume and overlap statements ---------------------------------------------------

SETTINGS_TEXT = """mesh dp=2, tp=2
checkpoint every 100 steps to "ckpt/" keep 3 async   # the program's defaults
resume from "ckpt/"
overlap bucket 50MiB first 2MiB
overlap prefetch 2
"""


def test_checkpoint_and_overlap_statements_resolve_and_round_trip(graph):
    from autopar.compiler.plan import OVERLAP_DEFAULTS
    from autopar.dsl import search_with
    g = graph("gpt")
    spec = resolve(parse_plan(SETTINGS_TEXT), g)
    assert spec.checkpoint == {"directory": "ckpt/", "every": 100, "keep": 3, "async": True, "resume": "ckpt/"}
    assert spec.overlap == {"bucket_bytes": 50 << 20, "first_bucket_bytes": 2 << 20, "prefetch": 2}
    assert any(c.startswith('resume from "ckpt/"    # <string>:3:1') for c in spec.constraints)
    # the normalised form and write_plan both say it again, and read back the same
    again = resolve(parse_plan(spec.format()), g)
    assert (again.checkpoint, again.overlap) == (spec.checkpoint, spec.overlap)
    plan = search_with(spec, g, deterministic=True, time_limit=3)
    assert plan.checkpoint == spec.checkpoint
    assert plan.overlap == {**OVERLAP_DEFAULTS, "bucket_bytes": 50 << 20, "first_bucket_bytes": 2 << 20,
                            "prefetch": 2}
    text = write_plan(plan, g)
    assert 'checkpoint every 100 steps to "ckpt/" keep 3 async\nresume from "ckpt/"\n' in text
    assert "overlap bucket 50MiB first 2MiB prefetch 2\n" in text
    back = round_trip(plan, g)
    assert (back.checkpoint, back.overlap) == (plan.checkpoint, plan.overlap)
    # through the plan JSON; one written before the field existed still loads
    assert Plan.from_json(plan.to_json()) == plan
    old = json.loads(plan.to_json())
    del old["checkpoint"]
    assert Plan.from_json(json.dumps(old)).checkpoint == {}
    # defaults are not written out; overlap off is, alone
    plan.overlap, plan.checkpoint = dict(OVERLAP_DEFAULTS), {}
    assert "overlap" not in write_plan(plan, g) and "checkpoint" not in write_plan(plan, g)
    plan.overlap["enabled"] = False
    assert "\noverlap off\n" in write_plan(plan, g)
    assert round_trip(plan, g).overlap == {**OVERLAP_DEFAULTS, "enabled": False}


def test_checkpoint_and_overlap_forms(graph):
    g = graph("gpt")

    def settings(text):
        spec = resolve(parse_plan("mesh dp=2\n" + text), g)
        return spec.checkpoint, spec.overlap
    assert settings('checkpoint to "c"') == ({"directory": "c"}, {})
    assert settings('checkpoint every 1 step to "c"\nresume from "c"') == (
        {"directory": "c", "every": 1, "resume": "c"}, {})
    # `first` is a word of the statement, not a unit; sizes take either spelling of units
    assert settings("overlap bucket 25mb first 1MiB prefetch 0 off") == (
        {}, {"bucket_bytes": 25_000_000, "first_bucket_bytes": 1 << 20, "prefetch": 0, "enabled": False})
    # async TP: on, off, or the search's choice
    assert settings("overlap async_tp on prefetch 1") == ({}, {"async_tp": True, "prefetch": 1})
    assert settings("overlap async_tp off") == ({}, {"async_tp": False})
    assert settings("overlap async_tp auto") == ({}, {"async_tp": "auto"})
    from autopar.dsl.emit import overlap_line
    assert overlap_line({"async_tp": True, "prefetch": 2}) == "overlap prefetch 2 async_tp on"
    with pytest.raises(E.ConflictingSetting, match="overlap async_tp is set twice"):
        settings("overlap async_tp on\noverlap async_tp off")
    # words of these statements stay free as names elsewhere (a mesh axis called `on`)
    assert resolve(parse_plan("mesh on=2, first=2\noverlap on"), g).mesh == {"on": 2, "first": 2}
    # the same setting twice agrees, or it is a ConflictingSetting naming both places
    assert settings('overlap prefetch 2\noverlap prefetch 2') == ({}, {"prefetch": 2})
    with pytest.raises(E.ConflictingSetting, match=r"overlap bucket is set twice: at <string>:2:9"):
        settings("overlap bucket 1MB\noverlap bucket 2MB")
    with pytest.raises(E.ConflictingSetting, match="resume is set twice"):
        settings('resume from "a"\nresume from "b"')
    with pytest.raises(E.UnknownStatement, match="did you mean 'checkpoint'"):
        settings('checkpiont to "c"')


# ---- pipeline statement: microbatches ------------------------------------------------------------

def test_pipeline_microbatches_reach_the_plan_and_the_program(graph, traced):
    from autopar.compiler.errors import InputError
    from autopar.dsl import search_with
    from autopar.pipeline import build_program
    g = graph("gpt")
    split = 'mesh dp=2\nlayout input "idx", input "targets" { dp: S(0) }\n'
    spec = resolve(parse_plan(split + "pipeline microbatches 2\n"), g)
    assert spec.microbatches == 2
    assert "pipeline microbatches 2\n" in spec.format()
    assert resolve(parse_plan(spec.format()), g).microbatches == 2
    plan = search_with(spec, g, deterministic=True, time_limit=3)
    assert plan.microbatches == 2
    assert "\npipeline microbatches 2\n" in write_plan(plan, g)
    assert round_trip(plan, g).microbatches == 2
    # without the statement: one microbatch, nothing written
    plain = search_with(resolve(parse_plan("mesh dp=2\n"), g), g, deterministic=True, time_limit=3)
    assert plain.microbatches == 1 and "pipeline" not in write_plan(plain, g)
    # the program's default is the plan's count; a count the rank's batch cannot split is
    # refused before anything runs (batch 4 over dp=2 is 2 per rank)
    model, inputs = traced("gpt")[:2]
    program = build_program(model, inputs, mesh="dp=2", plan=plan)
    assert 'parser.add_argument("--microbatches", type=int, default=2,' in program.source
    with pytest.raises(InputError, match=r"4 microbatches do not divide the batch: 4 examples over 2 rank"):
        build_program(model, inputs, mesh="dp=2", plan=plan, microbatches=4)
