"""Plan application (passes/apply.py) and the emitted program's text: no processes.

Hand-built graphs check each resharding case; the example models check the sharded IR
(golden files under golden/sharded/, regenerate with UPDATE_GOLDEN=1) and that the bytes
the rewrite predicts are what `sharding.reshard` says for every edge.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autopar.compiler import sharding                                   # noqa: E402
from autopar.compiler.ir import Graph, Node, NodeMeta, Value            # noqa: E402
from autopar.compiler.plan import Plan                                  # noqa: E402
from autopar.compiler.verify import verify                              # noqa: E402
from autopar.compiler import collectives                               # noqa: E402
from autopar.compiler.cluster import Cluster, load_profile              # noqa: E402
from autopar.compiler.cost import CostModel, recompute_regions          # noqa: E402
from autopar.compiler.patterns import resolve_modules                   # noqa: E402
from autopar.passes.apply import apply_plan, predict_traffic, print_sharded  # noqa: E402


def tiny_mlp() -> Graph:
    """x[8,16] -> linear(32) -> gelu -> linear(16) -> mse_loss: 4 nodes."""
    x = Value("x", (8, 16), kind="input")
    y = Value("y", (8, 16), kind="input")
    w1 = Value("fc1.weight", (32, 16), kind="param", requires_grad=True)
    b1 = Value("fc1.bias", (32,), kind="param", requires_grad=True)
    w2 = Value("fc2.weight", (16, 32), kind="param", requires_grad=True)
    h = Value("h", (8, 32))
    a = Value("a", (8, 32))
    o = Value("o", (8, 16))
    loss = Value("loss", ())
    nodes = [Node("linear", (x, w1, b1), (), (h,), NodeMeta("fc1")),
             Node("gelu", (h,), (), (a,), NodeMeta("act")),
             Node("linear", (a, w2), (("bias", None),), (o,), NodeMeta("fc2")),
             Node("mse_loss", (o, y), (("reduction", 1),), (loss,), NodeMeta(""))]
    return Graph("tiny", [x, y], [w1, b1, w2], nodes, [loss])


def plan_for(g: Graph, mesh: dict, strategies: dict, **kw) -> Plan:
    strategies = {k: list(v) for k, v in strategies.items()}
    layouts = sharding.derive_layouts(g, mesh, {k: tuple(v) for k, v in strategies.items()})
    return Plan(model=g.name, mesh=mesh, strategies=strategies,
                layouts={k: list(v) for k, v in layouts.items()}, **kw)


def priced_bytes(g: Graph, plan: Plan) -> dict[str, int]:
    """What the cost model says the plan's program moves (it must be what the program does)."""
    model = CostModel(g, Cluster(dict(plan.mesh), load_profile("h100")), precision="fp32",
                      recompute=plan.recompute, dp_axis=plan.dp_axis)
    return model.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero).bytes


PLACEMENTS = ["R", "S(0)", "S(1)", "P"]
# src, dst, consumer splits -> program steps (the table in compiler/collectives.py)
EXPECTED_STEPS = {
    ("R", "R", True): ["copy_to"], ("R", "R", False): [],
    ("S(0)", "R", True): ["all_gather"], ("S(0)", "R", False): ["all_gather"],
    ("R", "S(1)", False): ["scatter"], ("S(0)", "S(1)", False): ["all_to_all"],
    ("P", "R", False): ["all_reduce"], ("P", "R", True): ["all_reduce", "copy_to"],
    ("P", "S(0)", False): ["reduce_scatter"],
}
# forward move, backward move of each step (Megatron's conjugate pairs)
EXPECTED_MOVES = {"copy_to": ("identity", "all_reduce"), "all_reduce": ("all_reduce", "identity"),
                  "scatter": ("slice", "all_gather"), "reduce_scatter": ("reduce_scatter", "all_gather"),
                  "all_to_all": ("all_to_all", "all_to_all")}


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in itertools.product(PLACEMENTS, PLACEMENTS) if d != "P"])
@pytest.mark.parametrize("split", [False, True])
def test_reshard_steps_reach_the_target_and_move_what_the_table_says(src, dst, split):
    """Each axis's steps end in the consumer's layout, are the table's steps, and their bytes
    are S (the tensor unsharded on the axis; all_to_all this rank's S/n), forward and back."""
    mesh = {"tp": 4}
    shape, item = (8, 12), 4
    full = 8 * 12 * item
    steps = sharding.reshard_steps((src,), (dst,), shape, item, mesh, frozenset({0}) if split else frozenset())
    assert (steps[-1].after if steps else (src,)) == (dst,) or (src, dst) == ("P", "P")
    want = EXPECTED_STEPS.get((src, dst, split), EXPECTED_STEPS.get((src, dst, False)))
    if want is not None and not (src == dst == "R"):
        assert [st.op for st in steps] == want
    for st in steps:
        fwd, bwd = collectives.moves(st.op, dict(st.attrs))
        if st.op == "all_gather":
            assert (fwd.action, bwd.action) == ("all_gather", "reduce_scatter" if split else "slice")
        else:
            assert (fwd.action, bwd.action) == EXPECTED_MOVES[st.op]
        for c in st.collectives(True):
            assert c.bytes == (full // 4 if c.kind == "all_to_all" else full)


def _local(full, layout, coords, mesh):
    """A rank's chunk under `layout`: the axes splitting one dim nest in mesh order (the
    earlier axis outside), as the runtime's shard() cuts it."""
    out = full
    for d in range(full.dim()):
        axes = [i for i, p in enumerate(layout) if p == f"S({d})"]
        n, k = 1, 0
        for i in axes:
            size = list(mesh.values())[i]
            n, k = n * size, k * size + coords[i]
        out = out.chunk(n, dim=d)[k] if n > 1 else out
    return out


def _run_steps(full, steps, mesh):
    """Every rank's chunk after `steps`, moved as the collectives move data (forward)."""
    import itertools as it
    import torch
    sizes = list(mesh.values())
    ranks = list(it.product(*[range(n) for n in sizes]))
    layout = steps[0].before if steps else ()
    local = {r: _local(full, layout, r, mesh) for r in ranks}
    for st in steps:
        i, attrs = list(mesh).index(st.axis), dict(st.attrs)
        group = lambda r: [r[:i] + (c,) + r[i + 1:] for c in range(sizes[i])]
        if st.op == "all_gather":
            local = {r: torch.cat([local[q] for q in group(r)], attrs["dim"]) for r in ranks}
        elif st.op == "scatter":
            local = {r: local[r].chunk(sizes[i], attrs["dim"])[r[i]] for r in ranks}
        elif st.op == "all_to_all":
            local = {r: torch.cat([local[q].chunk(sizes[i], attrs["split_dim"])[r[i]] for q in group(r)],
                                  attrs["concat_dim"]) for r in ranks}
        elif st.op != "copy_to":
            raise AssertionError(f"unexpected step {st.op}")
    return local


@pytest.mark.parametrize("src,dst", [
    (("S(0)", "S(1)"), ("S(1)", "S(1)")), (("S(1)", "S(0)"), ("S(0)", "S(0)")),
    (("S(1)", "S(1)"), ("S(0)", "S(1)")), (("R", "S(0)"), ("S(0)", "S(0)")),
    (("S(0)", "S(0)"), ("R", "R")), (("S(0)", "S(0)"), ("S(1)", "S(0)")),
    (("S(1)", "R"), ("S(1)", "S(1)")), (("S(0)", "S(1)"), ("S(1)", "S(0)"))])
def test_reshard_steps_keep_the_mesh_order_of_a_dim_split_by_two_axes(src, dst):
    """Two axes splitting one dim nest dp outside tp; a step on dp while tp already splits
    that dim must not nest them the other way (Mixtral's and a sharded lm_head's bug)."""
    import torch
    mesh = {"dp": 2, "tp": 2}
    full = torch.arange(8 * 8.0).reshape(8, 8)
    steps = sharding.reshard_steps(src, dst, (8, 8), 4, mesh)
    assert steps and steps[0].before == src and steps[-1].after == dst
    for r, t in _run_steps(full, steps, mesh).items():
        assert torch.equal(t, _local(full, dst, r, mesh)), (r, [(s.axis, s.op) for s in steps])


def test_data_parallel_rewrite():
    g = tiny_mlp()
    mesh = {"dp": 2}
    plan = plan_for(g, mesh, {"x": ["d0"], "y": ["d0"], "h": ["b0"], "a": ["d0"], "o": ["b0"], "loss": ["d0"]})
    s = apply_plan(g, plan)
    verify(s.graph)
    ops = [n.op for n in s.nodes]
    assert ops.count("copy_to") == 3                    # one gradient all_reduce per weight use
    assert ops[-1] == "div.Scalar"                      # mean over the split batch
    assert s.inputs[0].shape == (4, 16) and s.layouts["loss_mean"] == ("P",)
    assert predict_traffic(s) == priced_bytes(g, plan) == {"all_reduce:dp": (32 * 16 + 32 + 16 * 32) * 4}


def test_megatron_rewrite_shares_bias_and_localizes_shapes():
    g = tiny_mlp()
    mesh = {"tp": 2}
    plan = plan_for(g, mesh, {"fc1.weight": ["d0"], "fc1.bias": ["d0"], "fc2.weight": ["d1"],
                              "h": ["n"], "a": ["d1"], "o": ["k"]})
    s = apply_plan(g, plan)
    verify(s.graph)
    text = print_sharded(s)
    assert "%h: f32[8,16] {tp:S(1)} = linear(%x, %fc1.weight, %fc1.bias)" in text
    assert "%o_tp: f32[8,16] {tp:R} = all_reduce(%o, axis=tp)" in text
    assert predict_traffic(s) == priced_bytes(g, plan) == {"all_reduce:tp": 8 * 16 * 4}
    # row-parallel with a bias: each rank adds half of it to its partial sum
    g2 = tiny_mlp()
    n = g2.nodes[0]
    g2.nodes[0] = n.replace(outputs=n.outputs)
    plan = plan_for(g2, mesh, {"x": ["d1"], "fc1.weight": ["d1"], "h": ["k"]})
    s = apply_plan(g2, plan)
    verify(s.graph)
    share = [m for m in s.nodes if m.meta.source == "autopar:bias_share"]
    assert len(share) == 1 and share[0].attr["other"] == 2


def test_a_value_resharded_alike_for_several_consumers_is_resharded_once():
    """x feeds two column-parallel linears: one copy_to (one backward all_reduce), priced once."""
    inp = Value("inp", (8, 16), kind="input")
    scale = Value("scale", (16,), kind="param", requires_grad=True)
    w1 = Value("a.weight", (32, 16), kind="param", requires_grad=True)
    w2 = Value("b.weight", (32, 16), kind="param", requires_grad=True)
    x, h1, h2, h, loss = (Value("x", (8, 16)), Value("h1", (8, 32)), Value("h2", (8, 32)),
                          Value("h", (8, 32)), Value("loss", ()))
    nodes = [Node("mul", (inp, scale), (), (x,), NodeMeta("")),
             Node("linear", (x, w1), (("bias", None),), (h1,), NodeMeta("a")),
             Node("linear", (x, w2), (("bias", None),), (h2,), NodeMeta("b")),
             Node("add", (h1, h2), (), (h,), NodeMeta("")),
             Node("sum", (h,), (), (loss,), NodeMeta(""))]
    g = Graph("two", [inp], [scale, w1, w2], nodes, [loss])
    plan = plan_for(g, {"tp": 2}, {"a.weight": ["d0"], "b.weight": ["d0"], "h1": ["n"], "h2": ["n"],
                                   "h": ["d1"], "loss": ["d1"]})
    sharded = apply_plan(g, plan)
    verify(sharded.graph)
    ops = [n.op for n in sharded.nodes]
    assert ops.count("copy_to") == 1, ops
    assert predict_traffic(sharded) == {"all_reduce:tp": 8 * 16 * 4}
    # the program reduces scale's gradient instead (x = inp * scale is the same on both
    # ranks and scale is smaller than x), in a bucket: the cost model prices that program
    from autopar.passes.overlap import overlap
    assert predict_traffic(overlap(sharded)) == priced_bytes(g, plan) == {"all_reduce:tp": 16 * 4}


def test_a_recompute_pattern_that_selects_nothing_names_the_closest_module(traced):
    """`*` is one path component everywhere (the plan DSL's matcher): `transformer.*.attn`
    selects no module of nanoGPT, and says which pattern would."""
    from autopar.compiler.patterns import PatternError
    g = traced("gpt")[3]
    with pytest.raises(PatternError, match=r"transformer\.h\.\*\.attn"):
        resolve_modules(g, ["transformer.*.attn"])
    assert resolve_modules(g, ["transformer.h.*.attn", "transformer.h.1"]) == \
        ["transformer.h.0.attn", "transformer.h.1"]


@pytest.mark.parametrize("patterns", [["transformer.h.*"], ["transformer.h.*.attn"], ["transformer.h.1.mlp"],
                                      ["transformer.h.0", "transformer.h.1.attn"], ["**.mlp", "transformer.h.1"]])
def test_recompute_regions_priced_are_the_regions_checkpointed(traced, patterns):
    """For each set of patterns: the node groups the cost model prices as recomputed regions
    are exactly the groups the program checkpoints, and the program writes one checkpoint
    per region."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.pipeline import build_program
    model, inputs, _, g = traced("gpt")
    paths = resolve_modules(g, patterns)
    plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP, recompute=paths)
    priced: dict[str, set] = {}
    for key, rid in recompute_regions(g, plan.recompute).items():
        priced.setdefault(rid, set()).add(key)
    s = apply_plan(g, plan)
    original = {n.outputs[0].name for n in g.nodes}
    run = [{n.outputs[0].name for n in s.nodes[r.start:r.end] if n.outputs[0].name in original}
           for r in s.regions]
    assert sorted(map(sorted, priced.values())) == sorted(map(sorted, run))
    prog = build_program(model, inputs, {"dp": 2, "tp": 2}, plan=plan, name="gpt", graph=g)
    assert prog.source.count("= checkpoint(") == len({frozenset(r) for r in run}) or "class Block" in prog.source
    assert predict_traffic(s) == priced_bytes(g, plan)


# ---- whole models: golden sharded IR -------------------------------------------------------

def model_plans():
    from plan_helpers import MEGATRON_SP, MLP_TP
    return {
        "mlp_dp2": ("mlp", {"dp": 2}, [], {}),
        "mlp_tp2": ("mlp", {"tp": 2}, MLP_TP, {}),
        "gpt_dp2_zero2": ("gpt", {"dp": 2}, [], {"zero": 2}),
        "gpt_tp2": ("gpt", {"tp": 2}, MEGATRON_SP, {"recompute": ["transformer.h.1"]}),
    }


@pytest.mark.parametrize("case", list(model_plans()))
def test_sharded_ir_golden(traced, golden, case):
    from plan_helpers import forced_plan
    example, mesh, rules, options = model_plans()[case]
    _, _, _, g = traced(example)
    plan = forced_plan(g, mesh, rules, **options)
    s = apply_plan(g, plan)
    verify(s.graph)
    if not plan.zero:
        assert predict_traffic(s) == priced_bytes(g, plan)
    golden(f"sharded/{case}.txt", print_sharded(s))


def test_generated_program_golden(traced, golden):
    """The gpt program on dp=2,tp=2 (Megatron + sequence parallel): text and a compile check."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.pipeline import build_program
    from autopar.pipeline import prepared_graph
    model, inputs, _, _ = traced("gpt")
    g = prepared_graph(model, inputs, "gpt", symbolic=True)       # as `emit` traces it
    plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP)
    prog = build_program(model, inputs, {"dp": 2, "tp": 2}, backend="torch", plan=plan, name="gpt", graph=g)
    compile(prog.source, "gpt_dp2_tp2_torch.py", "exec")
    # sizes from the batch are read from the input, in the model and in the block
    assert "B, T = idx.shape" in prog.source and "k.reshape(B, T, 2, 16)" in prog.source
    assert "torch.arange(0, T, " in prog.source
    src = prog.source
    assert "torchrun --nproc-per-node 4 gpt_dp2_tp2_torch.py" in src
    # one block class, its forward written once, and the model's loop over the layers
    assert src.count("class Block(nn.Module):") == 1 and src.count("def forward(self, x):") == 1
    assert "self.transformer.h = nn.ModuleList(Block(mesh) for _ in range(2))" in src
    assert "for block in self.transformer.h:\n            x = block(x)" in src
    assert "self.attn.c_attn.weight.append(nn.Parameter(torch.empty(32, 64)))" in src
    assert "self.lm_head.weight = self.transformer.wte.weight" in src
    # names from the model's own code: q, k, v where it splits its fused projection
    assert "q = F.linear(ln_1, " in src and "k = F.linear(ln_1, " in src and "v = F.linear(ln_1, " in src
    assert "F.scaled_dot_product_attention(q, k, v, is_causal=True)" in src
    golden("sharded/gpt_dp2_tp2_torch.py", prog.source)
    mpi = build_program(model, inputs, {"dp": 2, "tp": 2}, backend="mpi", plan=plan, name="gpt", graph=g)
    assert "mpiexec -n 4 python gpt_dp2_tp2_mpi.py" in mpi.source
    assert 'rt.init_mesh(MESH, backend="mpi"' in mpi.source


def test_program_does_not_grow_with_depth_and_repeats_no_collective(example):
    """The 8-layer GPT's program is at most 20 lines longer than the 2-layer one under the same
    plan, and no program calls a collective twice with the same arguments on one value."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.pipeline import build_program, prepared_graph
    gpt = example("gpt")
    sizes = {}
    for layers in (2, 8):
        model, inputs = gpt.build(gpt.GPTConfig(block_size=32, vocab_size=128, n_layer=layers, n_head=4, n_embd=64))
        g = prepared_graph(model, inputs, "gpt")
        plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP)
        prog = build_program(model, inputs, {"dp": 2, "tp": 2}, plan=plan, name="gpt", graph=g)
        sizes[layers] = prog.source.count("\n")
        seen = set()
        for n in prog.sharded.nodes:
            if n.op in collectives.OPS:
                key = (n.inputs[0].name, n.op, n.attrs)
                assert key not in seen, f"{n.op} of %{n.inputs[0].name} twice"
                seen.add(key)
    assert sizes[8] - sizes[2] <= 20, sizes


def test_local_module_state_dict_matches_model(traced):
    """The generated module's state_dict keys are the model's, shapes are the local blocks."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.backends import runtime as rt  # noqa: F401  (the program imports it)
    from autopar.pipeline import build_program
    model, inputs, _, g = traced("gpt")
    plan = forced_plan(g, {"tp": 2}, MEGATRON_SP)
    prog = build_program(model, inputs, {"tp": 2}, backend="torch", plan=plan, name="gpt", graph=g)
    ns = {"__name__": "generated"}
    exec(compile(prog.source, "gen.py", "exec"), ns)

    class FakeMesh:
        device = torch.device("cpu")
    local = ns[prog.opts.class_name](FakeMesh())
    # fused weights appear as their pieces (c_attn.weight.0, .1, .2); all else by its own name
    want = {k for k in model.state_dict() if not any(pc.source == k for pc in g.pieces.values())}
    assert set(local.state_dict()) == want | set(g.pieces)
    assert any(".attn.c_attn.weight." in k for k in g.pieces)
    full = model.state_dict()
    for name, t in local.state_dict().items():
        lay = prog.sharded.layouts[g.aliases.get(name, name)]
        ref = g.pieces[name].cut(full[g.pieces[name].source]) if name in g.pieces else full[name]
        assert tuple(t.shape) == sharding.local_shape(ref.shape, lay, {"tp": 2})


def test_an_axis_the_plan_leaves_idle_is_named_with_the_reason(traced):
    """When a plan replicates all work on a mesh axis, plan/emit/run say so in one line each
    with the cost model's reason; an axis the plan uses gets no such line."""
    from autopar.pipeline import idle_axis_lines, make_plan
    g = traced("gpt")[3]
    for memory in (None, "2MB"):
        plan, _ = make_plan(g, "dp=2,tp=2", device="h100", memory=memory, deterministic=True)
        unused = {a for i, a in enumerate(plan.mesh)
                  if not any(s[i] is not None for s in plan.strategies.values())}
        assert {r["axis"] for r in plan.solver["idle_axes"]} == unused
        lines = idle_axis_lines(plan)
        assert len(lines) == len(unused)
        for line in lines:
            assert "replicates all work on" in line and "all_reduce" in line


@pytest.mark.parametrize("name,rules", [("gpt", "MEGATRON_SP"), ("llama", "LLAMA_TP"), ("lora", None),
                                        ("bert", None)])
def test_no_program_repeats_a_collective_on_a_value(traced, name, rules):
    """dp=2,tp=2, with the search's plan (with and without a memory limit) and a forced
    tensor-parallel one: no collective runs twice with the same arguments on one value, and
    the cost model prices exactly the collectives the program runs."""
    import plan_helpers

    from autopar.passes.shard import search
    _, _, _, g = traced(name)
    plans = [plan_helpers.forced_plan(g, {"dp": 2, "tp": 2}, getattr(plan_helpers, rules) if rules else ())]
    least = search(g, {"dp": 2, "tp": 2}, "h100", deterministic=True, objective="memory", precision="fp32")
    for memory in (None, least.cost["memory"]["total"] * 1.5):
        plans.append(search(g, {"dp": 2, "tp": 2}, "h100", deterministic=True, memory_limit=memory, time_limit=30,
                            precision="fp32"))
    for plan in plans:
        s = apply_plan(g, plan)
        seen = set()
        for n in s.nodes:
            if n.op in collectives.OPS:
                key = (n.inputs[0].name, n.op, n.attrs)
                assert key not in seen, f"{name}: {n.op} of %{n.inputs[0].name} twice"
                seen.add(key)
        if not plan.zero:
            assert predict_traffic(s) == priced_bytes(g, plan)
