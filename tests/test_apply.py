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
from autopar.passes.apply import (apply_plan, predict_traffic, print_sharded, recompute_regions,  # noqa: E402
                                  reshard_steps)


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


def edge_bytes(s: Graph) -> dict[str, int]:
    return {f"{k}:{a}": b for (k, a), b in sorted(s.edge_bytes.items())}


PLACEMENTS = ["R", "S(0)", "S(1)", "P"]


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in itertools.product(PLACEMENTS, PLACEMENTS) if d != "P"])
@pytest.mark.parametrize("split", [False, True])
def test_reshard_steps_match_reshard_bytes(src, dst, split):
    """Each runtime step moves exactly what sharding.reshard charges, forward and backward."""
    from autopar.passes.apply import collective_traffic
    mesh = {"tp": 4}
    shape = (8, 12)
    splits = frozenset({0}) if split else frozenset()
    want = sharding.collective_bytes(sharding.reshard((src,), (dst,), shape, 4, mesh, splits))
    cur, got = (src,), {}
    for step in reshard_steps((src,), (dst,), mesh, splits):
        x = Value("x", sharding.local_shape(shape, cur, mesh))
        y = Value("y", sharding.local_shape(shape, step.layout, mesh))
        for kind, axis, b, _ in collective_traffic(Node(step.op, (x,), step.attrs, (y,)), True):
            got[(kind, axis)] = got.get((kind, axis), 0) + b
        cur = step.layout
    assert got == want


def test_data_parallel_rewrite():
    g = tiny_mlp()
    mesh = {"dp": 2}
    plan = plan_for(g, mesh, {"x": ["d0"], "y": ["d0"], "h": ["b0"], "a": ["d0"], "o": ["b0"], "loss": ["d0"]})
    s = verify(apply_plan(g, plan))
    ops = [n.op for n in s.nodes]
    assert ops.count("copy_to") == 3                    # one gradient all_reduce per weight use
    assert ops[-1] == "div.Scalar"                      # mean over the split batch
    assert s.inputs[0].shape == (4, 16) and s.layouts["loss_mean"] == ("P",)
    assert predict_traffic(s) == edge_bytes(s) == {"all_reduce:dp": (32 * 16 + 32 + 16 * 32) * 4}


def test_megatron_rewrite_shares_bias_and_localizes_shapes():
    g = tiny_mlp()
    mesh = {"tp": 2}
    plan = plan_for(g, mesh, {"fc1.weight": ["d0"], "fc1.bias": ["d0"], "fc2.weight": ["d1"],
                              "h": ["n"], "a": ["d1"], "o": ["k"]})
    s = verify(apply_plan(g, plan))
    text = print_sharded(s)
    assert "%h: f32[8,16] {tp:S(1)} = linear(%x, %fc1.weight, %fc1.bias)" in text
    assert "%o_tp: f32[8,16] {tp:R} = all_reduce(%o, axis=tp)" in text
    assert predict_traffic(s) == edge_bytes(s) == {"all_reduce:tp": 8 * 16 * 4}
    # row-parallel with a bias: each rank adds half of it to its partial sum
    g2 = tiny_mlp()
    n = g2.nodes[0]
    g2.nodes[0] = n.replace(outputs=n.outputs)
    plan = plan_for(g2, mesh, {"x": ["d1"], "fc1.weight": ["d1"], "h": ["k"]})
    s = verify(apply_plan(g2, plan))
    share = [m for m in s.nodes if m.meta.source == "autopar:bias_share"]
    assert len(share) == 1 and share[0].attr["other"] == 2


def test_recompute_regions_are_maximal_runs():
    g = tiny_mlp()
    assert recompute_regions(g, ["fc*", "act"]) == [(0, 3)]
    assert recompute_regions(g, ["fc2"]) == [(2, 3)]


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
    s = verify(apply_plan(g, plan))
    if not plan.zero and not plan.recompute:
        assert predict_traffic(s) == edge_bytes(s)
    golden(f"sharded/{case}.txt", print_sharded(s))


def test_generated_program_golden(traced, golden):
    """The gpt program on dp=2,tp=2 (Megatron + sequence parallel): text and a compile check."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.run import build_program
    model, inputs, _, g = traced("gpt")
    plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON_SP)
    prog = build_program(model, inputs, {"dp": 2, "tp": 2}, backend="torch", plan=plan, name="gpt", graph=g)
    compile(prog.source, "gpt_dp2_tp2_torch.py", "exec")
    assert "torchrun --nproc-per-node 4 gpt_dp2_tp2_torch.py" in prog.source
    assert "self.transformer.h[0].attn.c_attn.weight = nn.ParameterList()" in prog.source
    assert "self.transformer.h[0].attn.c_attn.weight.append(nn.Parameter(torch.empty(32, 64)))" in prog.source
    assert "self.lm_head.weight = self.transformer.wte.weight" in prog.source
    golden("sharded/gpt_dp2_tp2_torch.py", prog.source)
    mpi = build_program(model, inputs, {"dp": 2, "tp": 2}, backend="mpi", plan=plan, name="gpt", graph=g)
    assert "mpiexec -n 4 python gpt_dp2_tp2_mpi.py" in mpi.source
    assert 'rt.init_mesh(MESH, backend="mpi"' in mpi.source


def test_local_module_state_dict_matches_model(traced):
    """The generated module's state_dict keys are the model's, shapes are the local blocks."""
    from plan_helpers import MEGATRON_SP, forced_plan

    from autopar.backends import runtime as rt  # noqa: F401  (the program imports it)
    from autopar.run import build_program
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
