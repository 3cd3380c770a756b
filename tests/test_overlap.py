"""The overlap pass (passes/overlap.py) and its bucket arithmetic (compiler/buckets.py):
which gradients are bucketed, in which order, how the bytes and calls are predicted, and
ZeRO-3's schedule. Parity of the programs that run them is tests/test_codegen.py's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autopar.compiler import buckets
from autopar.compiler.sharded import nbytes
from autopar.passes.apply import apply_plan
from autopar.passes.overlap import overlap


@pytest.fixture(scope="module")
def gpt(traced):
    return traced("gpt")


def dp_plan(graph, **overlap_settings):
    from plan_helpers import DDP, forced_plan
    plan = forced_plan(graph, {"dp": 2}, DDP)
    plan.overlap.update(overlap_settings)
    return plan


def test_buckets_follow_backward_order_and_sizes(gpt):
    _, _, _, g = gpt
    plain = apply_plan(g, dp_plan(g))
    s = overlap(apply_plan(g, dp_plan(g, bucket_bytes=20_000, first_bucket_bytes=2_000)))
    o = s.overlap
    # every parameter whose gradient the plan all_reduced per use is bucketed, once, and so is
    # wpe: the plan reduced the gradient of its embedding's output (replicated over dp, no
    # larger than wpe), which the bucket now does on wpe's own gradient
    bucketed = [p for b in o.buckets for p in b.params]
    per_use = {n.inputs[0].name for n in plain.nodes if n.op == "copy_to" and n.inputs[0].kind == "param"}
    on_output = [n for n in plain.nodes if n.op == "copy_to" and n.inputs[0].kind != "param"]
    assert [n.inputs[0].name for n in on_output] == ["embedding_1"]
    assert "transformer.wpe.weight" not in per_use
    assert sorted(bucketed) == sorted(per_use | {"transformer.wpe.weight"}) and len(per_use) > 20
    assert not any(n.op == "copy_to" for n in s.nodes)
    # buckets launch in the order backward completes them: later first use, earlier launch
    first = {}
    for i, n in enumerate(s.nodes):
        for v in n.inputs:
            first.setdefault(v.name, i)
    order = [first[p] for p in bucketed]
    assert order == sorted(order, reverse=True)
    assert [b.ready for b in o.buckets] == sorted((b.ready for b in o.buckets), reverse=True)
    # the first bucket is small, the others up to the cap unless one gradient alone is larger
    by_name = {p.name: p for p in s.params}
    assert o.buckets[0].nbytes <= 2_000 or len(o.buckets[0].params) == 1
    for b in o.buckets:
        assert b.nbytes == sum(nbytes(by_name[p]) for p in b.params)
        assert b.nbytes <= 20_000 or len(b.params) == 1
    # bytes are the per-use steps' bytes; calls drop to one per bucket
    assert s.traffic() == plain.traffic()
    assert s.call_counts()["all_reduce:dp"] == len(o.buckets) + plain.call_counts()["all_reduce:dp"] - sum(
        1 for n in plain.nodes if n.op == "copy_to")
    assert len(o.buckets) < plain.call_counts()["all_reduce:dp"]


def test_the_schedule_buckets_what_the_program_buckets(gpt):
    """The cost model's simulated buckets (compiler/schedule.py) hold the gradients the overlap
    pass buckets, wpe's among them (reduced on the parameter, not on its embedding's
    output), and the priced bytes are the program's."""
    from autopar.compiler.cluster import Cluster, load_profile
    from autopar.compiler.cost import CostModel
    _, _, _, g = gpt
    plan = dp_plan(g, bucket_bytes=20_000, first_bucket_bytes=2_000)
    s = overlap(apply_plan(g, plan))
    cm = CostModel(g, Cluster(dict(plan.mesh), load_profile("cpu")), precision="fp32",
                   dp_axis=plan.dp_axis, overlap=plan.overlap)
    rep = cm.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)
    assert [b.params for b in rep.schedule.buckets] == [b.params for b in s.overlap.buckets]
    assert "transformer.wpe.weight" in rep.schedule.buckets[-1].params + rep.schedule.buckets[-2].params
    assert rep.bytes == s.traffic()
    # no synchronous all_reduce is left in backward: every dp reduction is a bucket's
    assert not [e for e in rep.schedule.events if e.kind == "all_reduce" and e.phase == "backward"
                and not e.name.startswith("bucket")]


def test_a_linears_input_gradient_all_reduce_hides_behind_its_weight_gradient(gpt):
    """Megatron TP: the copy_to before the column-parallel linears (q, k, v of c_attn
    together; c_fc) runs its backward all_reduce while the weight gradients are computed;
    the schedule prices those and only those as asynchronous; bytes unchanged."""
    from plan_helpers import MEGATRON, forced_plan
    from autopar.compiler.cluster import Cluster, load_profile
    from autopar.compiler.cost import CostModel
    _, _, _, g = gpt
    plan = forced_plan(g, {"dp": 2, "tp": 2}, MEGATRON)
    plain = apply_plan(g, plan)
    s = overlap(apply_plan(g, plan))
    hiding = s.overlap.async_inputs
    feeds = {}                                  # input -> the first linear it feeds
    for n in s.nodes:
        if n.op == "linear":
            feeds.setdefault(n.inputs[0].name, n)
    assert hiding and set(hiding.values()) == {"tp"}
    assert sorted({feeds[v].meta.module.rsplit(".", 1)[-1] for v in hiding}) == ["c_attn", "c_fc"]
    blocks = {feeds[v].meta.module.split(".")[2] for v in hiding}
    assert len(hiding) == 2 * len(blocks) == 2 * 2
    assert s.traffic() == plain.traffic()
    cm = CostModel(g, Cluster(dict(plan.mesh), load_profile("cpu")), precision="fp32",
                   dp_axis=plan.dp_axis, overlap=plan.overlap)
    rep = cm.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)
    async_events = [e for e in rep.schedule.events if e.name.endswith("(async)")]
    assert sorted(e.name.rsplit(" at ", 1)[1].split()[0] for e in async_events) == sorted(
        feeds[v].outputs[0].name for v in hiding)
    assert all(e.kind == "all_reduce" and e.axis == "tp" for e in async_events)
    # each hides part of itself behind the weight gradients, but for one queued behind a
    # gradient bucket on the same stream
    assert sum(e.hidden > 0 for e in async_events) >= len(async_events) - 1
    assert rep.bytes == s.traffic()


def test_overlap_off_keeps_the_plan_as_applied(gpt):
    _, _, _, g = gpt
    s = apply_plan(g, dp_plan(g, enabled=False))
    o = overlap(s)
    assert o.overlap.buckets == [] and [n.op for n in o.nodes] == [n.op for n in s.nodes]


def test_frozen_and_whole_gradients_join_no_bucket(traced):
    """LoRA's frozen base weights have no gradient; a parameter one of whose uses already has
    the whole gradient (no copy_to) keeps its per-use steps."""
    from plan_helpers import forced_plan
    _, _, _, g = traced("lora")
    s = overlap(apply_plan(g, forced_plan(g, {"dp": 2}, [])))
    frozen = {p.name for p in s.params if not p.requires_grad}
    assert frozen and not frozen & {p for b in s.overlap.buckets for p in b.params}
    from autopar.compiler.ir import Node, Value
    _, _, _, m = traced("mlp")
    s = apply_plan(m, forced_plan(m, {"dp": 2}, []))
    step = next(n for n in s.nodes if n.op == "copy_to" and n.inputs[0].kind == "param")
    p = step.inputs[0]
    s.graph.nodes.append(Node("neg", (p,), (), (Value("p_whole", p.shape, p.dtype),)))
    o = overlap(s)
    assert p.name not in {q for b in o.overlap.buckets for q in b.params} and o.overlap.buckets
    assert any(n.op == "copy_to" and n.inputs[0] is p for n in o.nodes)


def test_a_parameter_larger_than_its_ops_output_keeps_the_output_reduction(traced):
    """wpe of a GPT run on fewer tokens than its block size: the embedding's output (T rows)
    is smaller than wpe (block-size rows), so the synchronous all_reduce of the output's
    gradient moves fewer bytes than bucketing wpe would, and stays."""
    from plan_helpers import DDP, forced_plan
    from conftest import load_example
    from autopar.frontends.tracing import trace
    from autopar.passes.prepare import prepare
    gpt = load_example("gpt")
    model, inputs = gpt.build(gpt.GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16),
                              batch=4, seq=8)
    g = prepare(trace(model, inputs, name="gpt_short"))
    s = overlap(apply_plan(g, forced_plan(g, {"dp": 2}, DDP)))
    steps = [n for n in s.nodes if n.op == "copy_to"]
    assert [n.inputs[0].shape for n in steps] == [(8, 16)]
    assert "transformer.wpe.weight" not in {p for b in s.overlap.buckets for p in b.params}
    assert "transformer.wte.weight" in {p for b in s.overlap.buckets for p in b.params}


def test_zero3_schedule_regathers_block_weights_only(gpt):
    from plan_helpers import DDP, forced_plan
    _, _, _, g = gpt
    plan = forced_plan(g, {"dp": 2}, DDP, zero3=True)
    plain = apply_plan(g, plan)
    s = overlap(apply_plan(g, plan))
    o = s.overlap
    assert o.zero3_blocks == ["transformer.h"] and o.gathers
    assert all(p.startswith("transformer.h.") for p, _ in o.regathered)
    regather = sum(b for _, b in o.regathered)
    before, after = plain.traffic(), s.traffic()
    assert after["all_gather:dp"] == before["all_gather:dp"] + regather
    assert after["reduce_scatter:dp"] == before["reduce_scatter:dp"]
    # with a recompute region the plain gathers stay (recompute would gather inside backward)
    plan.recompute = ["transformer.h.1"]
    assert not overlap(apply_plan(g, plan)).overlap.gathers


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(1, 50)), max_size=40),
       st.integers(1, 60), st.integers(1, 120))
def test_fill_keeps_order_groups_and_caps(items, first_cap, cap):
    out = buckets.fill(items, first_cap, cap)
    assert sorted(i for b in out for i in b) == list(range(len(items)))
    for b in out:
        assert len({items[i][0] for i in b}) == 1 and b == sorted(b)
        assert sum(items[i][1] for i in b) <= max(cap, first_cap) or len(b) == 1
    closes = [b[-1] for b in out]
    assert closes == sorted(closes)


def test_fold_and_expand_round_trip():
    order = [("head.w", ("dp",))]
    order += [(f"h.{i}.{r}", ("dp",)) for i in (2, 1, 0) for r in ("mlp.w", "attn.w")]
    order += [("emb.w", ("dp", "tp"))]
    folded = buckets.fold(order, ["h"])
    assert folded[1] == ("h.*", [("mlp.w", ("dp",)), ("attn.w", ("dp",))], 3) and len(folded) == 3
    assert buckets.expand(folded) == order
    # blocks that differ, or that do not end at block 0, stay written out
    broken = order[:3] + order[5:]
    assert buckets.expand(buckets.fold(broken, ["h"])) == broken


def test_zero2_gradients_are_reduce_scattered_in_buckets(gpt):
    """ZeRO-2's reduce_scatters leave the step for reduce_scatter buckets: same bytes (each
    gradient flattened and padded to equal chunks), one call per bucket."""
    from plan_helpers import DDP, forced_plan
    _, _, _, g = gpt
    plan = forced_plan(g, {"dp": 2}, DDP, zero=2)
    plain = apply_plan(g, plan)
    plan.overlap["enabled"] = False
    off = overlap(apply_plan(g, plan))
    plan.overlap["enabled"] = True
    s = overlap(apply_plan(g, plan))
    rs = [b for b in s.overlap.buckets if b.kind == "reduce_scatter"]
    assert rs and s.overlap.scattered() == set(plain.zero.reduce_scatter)
    assert s.traffic() == off.traffic() == plain.traffic()
    assert s.call_counts()["reduce_scatter:dp"] == len(rs) < off.call_counts()["reduce_scatter:dp"]


def test_async_tp_runs_sequence_parallel_collectives_as_collective_matmuls(gpt):
    """Sequence parallelism: with async_tp on, every block's gather before c_attn / c_fc and
    reduce_scatter after the c_proj linears become collective matmuls (bytes and calls
    unchanged: a ring is one collective); "auto" unresolved and off keep the collectives.
    The schedule prices them as ring steps beside the linears: the same communication time
    on the tp stream, less of it exposed, and "auto" keeps the faster of the two."""
    from plan_helpers import SEQUENCE_PARALLEL, forced_plan
    from autopar.compiler.cluster import Cluster, load_profile
    from autopar.compiler.cost import CostModel
    _, _, _, g = gpt
    plan = forced_plan(g, {"dp": 2, "tp": 2}, SEQUENCE_PARALLEL)
    plain = overlap(apply_plan(g, plan))
    assert plan.overlap["async_tp"] == "auto" and not plain.overlap.async_tp
    plan.overlap["async_tp"] = True
    s = overlap(apply_plan(g, plan))
    kinds = {}
    for n in s.nodes:
        if n.outputs[0].name in s.overlap.async_tp:
            kinds[n.op] = kinds.get(n.op, 0) + 1
            fed = [m.meta.module.rsplit(".", 1)[-1] for m in s.nodes if n.outputs[0] in m.inputs]
            made = next(m for m in s.nodes if n.inputs[0] in m.outputs)
            if n.op == "all_gather":       # into the linears of c_attn's q, k, v pieces, or c_fc
                assert set(fed) in ({"c_attn"}, {"c_fc"}) and len(fed) in (3, 1)
            else:                          # of the row-parallel c_proj's output
                assert made.op == "linear" and made.meta.module.endswith("c_proj")
    assert kinds == {"all_gather": 4, "reduce_scatter": 4}
    assert set(s.overlap.async_tp.values()) == {("tp", 1)}
    assert s.traffic() == plain.traffic() and s.call_counts() == plain.call_counts()
    plan.overlap["async_tp"] = False
    assert not overlap(apply_plan(g, plan)).overlap.async_tp

    def schedule(async_tp):
        cm = CostModel(g, Cluster(dict(plan.mesh), load_profile("h100")), dp_axis=plan.dp_axis,
                       overlap={**plan.overlap, "async_tp": async_tp})
        return cm.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero).schedule
    off, on, auto = schedule(False), schedule(True), schedule("auto")
    assert (off.async_tp, on.async_tp, on.collective_matmuls) == (False, True, 8)
    tp_time = [sum(e.dur for e in x.events if e.axis == "tp") for x in (off, on)]
    assert tp_time[0] == pytest.approx(tp_time[1], rel=1e-9)
    assert on.exposed["tp"] < off.exposed["tp"] and on.hidden["tp"] > off.hidden["tp"]
    steps = [e for e in on.events if e.axis == "tp" and " step " in e.name]
    # forward: each of the 8 rings' n - 1 = 1 step; backward: the 4 c_proj gradients' gathers
    # (the gathers' gradient reduce_scatters run beside the weight gradients, not as rings)
    assert len(steps) == 8 + 4
    assert sum(e.name.endswith("(async)") and e.kind == "reduce_scatter" for e in on.events) == 4
    assert auto.makespan == min(off.makespan, on.makespan)
    assert auto.async_tp == (on.makespan < off.makespan)
