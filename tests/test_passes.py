"""Pruning passes, the verifier, the printer and the annotations on hand-built graphs."""
from __future__ import annotations

import pytest
import torch

from autopar.compiler import dims
from autopar.compiler.interpret import interpret
from autopar.compiler.ir import Graph, Node, NodeMeta, Value
from autopar.compiler.ops import node_anno
from autopar.compiler.verify import VerifyError, verify
from autopar.compiler.gradients import grad_info
from autopar.passes.prune import (eliminate_common_subexpressions, eliminate_dead_code,
                                  prune, remove_noops)


def V(name, shape, kind="act", rg=False):
    return Value(name, tuple(shape), torch.float32, kind, rg)


def N(op, ins, outs, module="", **attrs):
    return Node(op, tuple(ins), tuple(attrs.items()), tuple(outs), NodeMeta(module))


def small_graph():
    """x -> linear -> dropout(p=0) -> gelu -> (gelu again: CSE) -> add -> out, plus a dead relu."""
    x = V("x", (4, 8), "input")
    w = V("fc.weight", (16, 8), "param", True)
    b = V("fc.bias", (16,), "param", False)
    unused = V("other.weight", (3,), "param", True)
    h = V("h", (4, 16))
    d = V("d", (4, 16))
    g1, g2 = V("g1", (4, 16)), V("g2", (4, 16))
    s = V("s", (4, 16))
    dead = V("dead", (4, 16))
    nodes = [
        N("linear", [x, w, b], [h], "fc"),
        N("dropout", [h], [d], "drop", p=0.0, train=True),
        N("gelu", [d], [g1], "act"),
        N("gelu", [d], [g2], "act"),
        N("relu", [h], [dead], "act"),
        N("add", [g1, g2], [s]),
    ]
    return Graph("small", [x], [w, b, unused], nodes, [s])


def run(g, x, w, b):
    return interpret(g, {"fc.weight": w, "fc.bias": b, "other.weight": torch.zeros(3)}, (x,))[0]


def test_each_pass_removes_what_it_should_and_keeps_values():
    g = verify(small_graph())
    x, w, b = torch.randn(4, 8), torch.randn(16, 8), torch.randn(16)
    ref = run(g, x, w, b)

    g1 = verify(remove_noops(g))
    assert [n.op for n in g1.nodes] == ["linear", "gelu", "gelu", "relu", "add"]
    assert g1.nodes[1].inputs[0].name == "h"          # users now read the dropout's input

    g2 = verify(eliminate_common_subexpressions(g1))
    assert [n.op for n in g2.nodes] == ["linear", "gelu", "relu", "add"]
    assert g2.nodes[-1].inputs[0] is g2.nodes[-1].inputs[1]

    g3 = verify(eliminate_dead_code(g2))
    assert [n.op for n in g3.nodes] == ["linear", "gelu", "add"]
    assert [p.name for p in g3.params] == ["fc.weight", "fc.bias"]
    assert any("other.weight" in note for note in g3.notes)   # said, not silently dropped

    for gg in (g1, g2, g3):
        torch.testing.assert_close(run(gg, x, w, b), ref, rtol=0, atol=0)


def test_prune_notes_counts_per_pass():
    g = prune(small_graph())
    line = next(n for n in g.notes if n.startswith("prune:"))
    assert "remove_noops -1" in line and "eliminate_common_subexpressions -1" in line
    assert "eliminate_dead_code -1" in line and "(6 -> 3 nodes)" in line


def test_dropout_with_p_is_not_removed_and_not_merged():
    x = V("x", (4, 4), "input")
    a, b2, s = V("a", (4, 4)), V("b", (4, 4)), V("s", (4, 4))
    g = Graph("drop", [x], [], [N("dropout", [x], [a], p=0.1, train=True),
                                 N("dropout", [x], [b2], p=0.1, train=True),
                                 N("add", [a, b2], [s])], [s])
    assert len(prune(g).nodes) == 3


def test_same_dtype_cast_removed_but_real_cast_kept():
    x = V("x", (4,), "input")
    y = Value("y", (4,), torch.float32)
    z = Value("z", (4,), torch.float16)
    g = Graph("cast", [x], [], [N("to.dtype", [x], [y], dtype=torch.float32),
                                 N("to.dtype", [y], [z], dtype=torch.float16)], [z])
    assert [n.outputs[0].name for n in remove_noops(g).nodes] == ["z"]


def test_grad_info_frozen_params_and_integer_values():
    g = small_graph()
    info = grad_info(g)
    assert info.trainable == ["fc.weight", "other.weight"]
    assert info.frozen == ["fc.bias"]
    assert {"h", "d", "g1", "s"} <= info.needs_grad
    assert "x" not in info.needs_grad and "fc.bias" not in info.needs_grad
    # nothing downstream of a frozen-only path needs a gradient
    x = V("x", (4, 8), "input")
    w = V("w", (16, 8), "param", False)
    h = V("h", (4, 16))
    g2 = Graph("frozen", [x], [w], [N("linear", [x, w], [h])], [h])
    assert grad_info(g2).needs_grad == set()


def test_verifier_rejects_broken_graphs():
    g = small_graph()
    bad = g.copy(nodes=list(reversed(g.nodes)))
    with pytest.raises(VerifyError, match="used before it is defined"):
        verify(bad)
    h = g.nodes[0].outputs[0]
    dup = g.copy(nodes=g.nodes + [N("relu", [h], [V("h", (4, 16))])])
    with pytest.raises(VerifyError, match="defined twice"):
        verify(dup)
    unknown = g.copy(nodes=[N("no_such_op", [g.inputs[0]], [V("q", (4, 8))])])
    with pytest.raises(VerifyError, match="not registered"):
        verify(unknown)
    wrong_rank = g.copy(nodes=[N("linear", [V("x", (4, 8), "input"), g.params[0]], [V("q", (4,))])])
    with pytest.raises(VerifyError):
        verify(wrong_rank)


def test_printer_is_deterministic_and_shows_flags():
    a, b = str(small_graph()), str(small_graph())
    assert a == b
    assert "param %fc.weight: f32[16,8] trainable" in a
    assert "param %fc.bias: f32[16] frozen" in a
    assert "%h: f32[4,16] = linear(%x, %fc.weight, %fc.bias)" in a
    assert "0x" not in a


@pytest.mark.parametrize("src,dst,want", [
    ((2, 8, 16), (2, 8, 2, 8), "d0 d1 d2 -> d0 d1 d2 d3^"),
    ((2, 8, 16), (16, 16), "d0 d1^ d2 -> d0 d2"),
    ((4, 1, 8), (4, 8), "d0 d2^ d1 -> d0 d1"),
    ((6,), (2, 3), "d0 -> d0 d1^"),
])
def test_reshape_annotation(src, dst, want):
    assert str(dims.reshape(src, dst)) == want


def test_linear_and_softmax_annotations():
    x, w, b, y = V("x", (4, 8)), V("w", (16, 8)), V("b", (16,)), V("y", (4, 16))
    anno = node_anno(N("linear", [x, w, b], [y]))
    assert str(anno) == "b0 k+, n k+, n -> b0 n"
    s = node_anno(N("softmax", [y], [V("p", (4, 16))], dim=-1))
    assert s.frozen == {"d1"} and s.splittable() == ["d0"]
    assert str(dims.parse("m k+, k+ n -> m n")) == "m k+, k+ n -> m n"


def test_pass_manager_verifies_times_and_names_failures():
    from autopar.passes.manager import PassError, run_passes
    timings = {}
    g = run_passes(small_graph(), [remove_noops, eliminate_dead_code], verify_each=True,
                   timings=timings)
    assert set(timings) == {"remove_noops", "eliminate_dead_code"} and len(g.nodes) == 4

    def scramble(graph):
        return graph.copy(nodes=list(reversed(graph.nodes)))
    with pytest.raises(PassError, match="pass 'scramble' failed \\(after remove_noops\\)"):
        run_passes(small_graph(), [remove_noops, scramble], verify_each=True)


def test_split_fused_projections_cuts_weight_and_keeps_values():
    from autopar.passes.unfuse import split_fused_projections
    x = V("x", (4, 8), "input")
    w = V("qkv.weight", (24, 8), "param", True)
    b = V("qkv.bias", (24,), "param", True)
    y = V("y", (4, 24))
    q, k, v = V("q", (4, 8)), V("k", (4, 8)), V("v", (4, 8))
    s = V("s", (4, 8))
    g = verify(Graph("fused", [x], [w, b], [N("linear", [x, w, b], [y], "qkv"),
                                            N("split", [y], [q, k, v], "", split_size=8, dim=-1),
                                            N("add", [q, k], [s])], [s]))
    u = verify(split_fused_projections(g))
    assert [n.op for n in u.nodes] == ["linear", "linear", "linear", "add"]
    assert [p.name for p in u.params] == ["qkv.weight.0", "qkv.weight.1", "qkv.weight.2",
                                          "qkv.bias.0", "qkv.bias.1", "qkv.bias.2"]
    assert u.pieces["qkv.weight.1"].start == 8 and u.pieces["qkv.weight.1"].source == "qkv.weight"
    state = {"qkv.weight": torch.randn(24, 8), "qkv.bias": torch.randn(24)}
    xx = torch.randn(4, 8)
    # three small matmuls round differently from one big one: fp32 default tolerance
    torch.testing.assert_close(interpret(u, state, (xx,))[0], interpret(g, state, (xx,))[0])
    # a weight also used elsewhere (tied) is left fused
    g2 = g.copy(nodes=g.nodes + [N("linear", [x, w], [V("z", (4, 24))])])
    assert split_fused_projections(g2) is g2


def test_split_fused_projections_cuts_conv1d_columns_through_bias_and_view():
    """HF GPT-2's Conv1D c_attn lowers to mm(x, W[in, out]) + b, a view back to (B, T, 3C)
    and a split: the bias add folds into addmm, each piece is a column block of W and a
    block of b, the view follows."""
    from autopar.passes.unfuse import split_fused_projections
    x = V("x", (6, 8), "input")
    w = V("c_attn.weight", (8, 24), "param", True)
    b = V("c_attn.bias", (24,), "param", True)
    mm, y, y3 = V("mm", (6, 24)), V("addmm", (6, 24)), V("y3", (2, 3, 24))
    q, k, v = V("q", (2, 3, 8)), V("k", (2, 3, 8)), V("v", (2, 3, 8))
    s = V("s", (2, 3, 8))
    g = verify(Graph("conv1d", [x], [w, b], [
        N("mm", [x, w], [mm], "c_attn"), N("add", [mm, b], [y], "c_attn"),
        N("view", [y], [y3], "c_attn", size=[2, 3, 24]),
        N("split", [y3], [q, k, v], "", split_size=8, dim=2),
        N("mul", [q, v], [s])], [s]))
    u = verify(split_fused_projections(g))
    assert [n.op for n in u.nodes] == ["addmm", "view"] * 3 + ["mul"]
    assert [p.name for p in u.params] == [f"c_attn.weight.{i}" for i in range(3)] + \
                                         [f"c_attn.bias.{i}" for i in range(3)]
    w2 = u.pieces["c_attn.weight.2"]
    assert (w2.dim, w2.start, w2.stop) == (1, 16, 24) and u.param("c_attn.weight.2").shape == (8, 8)
    assert u.pieces["c_attn.bias.1"].dim == 0 and u.nodes[1].attr["size"] == [2, 3, 8]
    assert [v.name for v in u.nodes[2].inputs] == ["c_attn.bias.1", "x", "c_attn.weight.1"]
    assert len({val.name for val in u.values()}) == len(list(u.values()))   # names stay unique
    state = {"c_attn.weight": torch.randn(8, 24), "c_attn.bias": torch.randn(24)}
    xx = torch.randn(6, 8)
    torch.testing.assert_close(interpret(u, state, (xx,))[0], interpret(g, state, (xx,))[0])
    # the fused output used by a second consumer is left fused (the bias still folds)
    g2 = g.copy(nodes=g.nodes[:2] + [N("neg", [y], [V("z", (6, 24))])] + g.nodes[2:])
    u2 = split_fused_projections(g2)
    assert [n.op for n in u2.nodes] == ["addmm", "neg", "view", "split", "mul"] and not u2.pieces
    # an add of an activation is not a bias: left alone
    a = V("a", (6, 24), "input")
    g3 = verify(Graph("act", [x, a], [w], [N("mm", [x, w], [mm]), N("add", [mm, a], [y])], [y]))
    assert split_fused_projections(g3) is g3


def test_mean_over_kept_targets_writes_the_mean_as_sum_over_kept():
    """cross_entropy's mean over class indices -> sum / count of targets != ignore_index:
    the same value on one device; halves of the batch then add up to the global mean,
    which the mean of each half's mean does not when the halves ignore different counts."""
    from autopar.passes.unfuse import mean_over_kept_targets
    x = V("x", (6, 5), "input")
    t = Value("t", (6,), torch.int64, "input")
    loss = V("loss", ())
    g = verify(Graph("ce", [x, t], [], [N("cross_entropy_loss", [x, t], [loss], "", weight=None,
                                          reduction=1, ignore_index=-1)], [loss]))
    u = verify(mean_over_kept_targets(g))
    assert [n.op for n in u.nodes] == ["cross_entropy_loss", "ne.Scalar", "sum", "div"]
    assert u.nodes[0].attr["reduction"] == 2 and u.nodes[1].attr["other"] == -1
    assert u.outputs[0].name == "loss"
    xx = torch.randn(6, 5)
    tt = torch.tensor([1, -1, -1, 4, 0, 2])
    want = torch.nn.functional.cross_entropy(xx, tt, ignore_index=-1)
    torch.testing.assert_close(interpret(u, {}, (xx, tt))[0], want)
    sums = [torch.nn.functional.cross_entropy(xx[h], tt[h], ignore_index=-1, reduction="sum")
            for h in (slice(0, 3), slice(3, 6))]
    kept = [(tt[h] != -1).sum() for h in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close((sums[0] + sums[1]) / (kept[0] + kept[1]), want)
    assert not torch.allclose((sums[0] / kept[0] + sums[1] / kept[1]) / 2, want)
    # a class-weighted mean divides by the kept targets' weights: left whole
    w = V("w", (5,), "input")
    gw = Graph("cew", [x, t, w], [], [N("cross_entropy_loss", [x, t, w], [loss], "", reduction=1,
                                         ignore_index=-1)], [loss])
    assert mean_over_kept_targets(gw) is gw
