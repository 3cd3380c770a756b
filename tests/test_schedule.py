"""The predicted step as a schedule (compiler/schedule.py) on hand-built graphs: bucket order
and launch points, a bucket that hides behind backward and one that cannot, ZeRO-3's
prefetch window (memory and gather order), overlap off == the additive model, and the
trace JSON's schema."""
from __future__ import annotations

import json
import math

import pytest

from autopar.compiler.cluster import Cluster, DeviceProfile, Link
from autopar.compiler.cost import CostModel
from autopar.compiler.ir import Graph, Node, NodeMeta, Value
from autopar.compiler.schedule import bucket_caps, simulate, trace
from autopar.compiler.verify import verify

# slow compute, a link whose latency matters: what a bucket hides is visible
PROF = DeviceProfile("sched-test", peak_flops=1e10, efficiency=1.0, hbm_bandwidth=1e11, memory=80e9,
                     node_size=8, intra=Link(2e-5, 1e9), inter=Link(2e-5, 1e9), precision="fp32")
BLOCKS = 4


def blocks_graph(batch=64, d=256, blocks=BLOCKS) -> Graph:
    """x -> [linear -> gelu] x blocks -> mse_loss; block i's weight is blocks.i.fc.weight."""
    x = Value("x", (batch, d), kind="input")
    t = Value("target", (batch, d), kind="input")
    params, nodes, h = [], [], x
    for i in range(blocks):
        w = Value(f"blocks.{i}.fc.weight", (d, d), kind="param", requires_grad=True)
        params.append(w)
        y, a = Value(f"y{i}", (batch, d)), Value(f"a{i}", (batch, d))
        nodes.append(Node("linear", (h, w), (), (y,), NodeMeta(f"blocks.{i}.fc")))
        nodes.append(Node("gelu", (y,), (), (a,), NodeMeta(f"blocks.{i}.act")))
        h = a
    loss = Value("loss", ())
    nodes.append(Node("mse_loss", (h, t), (("reduction", 1),), (loss,), NodeMeta("")))
    return verify(Graph("blocks", [x, t], params, nodes, [loss]))


def dp_strategies(cm: CostModel, shard_params: bool) -> dict:
    """Data parallelism: every node and input split on the batch over dp, parameters
    replicated (or stored S(0) on dp, ZeRO-3)."""
    out = {}
    for m in cm.members:
        want = "S(0)" if (m.kind != "param" or shard_params) else "R"
        ok = [s for s in cm.strategies(m.index) if all(x is None for x in s[1:])]
        if m.outputs[0].shape:
            ok = [s for s in ok if cm.out_layouts(m.index, s)[0][0] == want]
        else:                                   # the loss: its batch split over dp
            ok = [s for s in ok if s[0] is not None]
        out[m.key] = ok[0]
    return out


def model(overlap=None, mesh=None, graph=None):
    return CostModel(graph or blocks_graph(), Cluster(mesh or {"dp": 2}, PROF), overlap=overlap)


def test_buckets_fill_in_backward_order_and_launch_when_their_last_gradient_is_made():
    # 256 KiB per weight, 256 KiB buckets: one bucket per block, the last block's first
    cm = model({"bucket_bytes": 256 << 10, "first_bucket_bytes": 256 << 10})
    rep = cm.evaluate(dp_strategies(cm, False), 0)
    sched = rep.schedule
    assert [b.params for b in sched.buckets] == [(f"blocks.{i}.fc.weight",) for i in reversed(range(BLOCKS))]
    assert [b.kind for b in sched.buckets] == ["all_reduce"] * BLOCKS
    for b in sched.buckets:
        i = int(b.params[0].split(".")[1])
        assert b.ready == f"y{i}"                        # the weight's only use: block i's linear
        bwd = next(e for e in sched.events if e.name.endswith(f"%y{i} (backward)"))
        assert b.launch == pytest.approx(bwd.end)       # launched when its gradient is complete
        assert b.events[0].start >= b.launch - 1e-15
    # launch order is backward order, one stream, each waited for before the step ends
    starts = [b.events[0].start for b in sched.buckets]
    assert starts == sorted(starts)
    assert max(e.end for b in sched.buckets for e in b.events) <= sched.makespan + 1e-15
    # one call per bucket: the same bytes as the per-parameter all_reduces
    assert sum(b.nbytes for b in sched.buckets) == rep.bytes["all_reduce:dp"]


def test_a_bucket_launched_early_hides_behind_backward_and_the_last_cannot():
    cm = model({"bucket_bytes": 256 << 10, "first_bucket_bytes": 256 << 10})
    sched = cm.evaluate(dp_strategies(cm, False), 0).schedule
    first, last = sched.buckets[0], sched.buckets[-1]
    assert first.events[0].hidden == pytest.approx(first.events[0].dur)    # backward of blocks 2..0 follows
    assert first.events[0].behind is not None and "blocks." in first.events[0].behind[0]
    # nothing of backward is left after block 0's: the last bucket hides only behind the
    # optimizer step of the parameters whose buckets are reduced (GradBuckets.step)
    early = next(e for e in sched.events if e.name.startswith("optimizer step") and "reduced" in e.name)
    assert last.events[0].start >= max(e.end for e in sched.events if e.phase == "backward"
                                       and e.stream == "compute") - 1e-15
    assert last.events[0].behind == (early.name, early.name)
    assert 0 < last.events[0].hidden <= early.dur + 1e-15
    assert sched.exposed["dp"] >= last.events[0].dur - early.dur - 1e-15
    assert sched.hidden["dp"] > 0
    total = sum(e.dur for e in sched.events if e.stream == "comm:dp")
    assert sched.exposed["dp"] + sched.hidden["dp"] == pytest.approx(total)


def test_overlap_off_is_the_additive_sum_and_on_is_never_slower():
    g = blocks_graph()
    for zero in (0, 3):
        off = model(False, graph=g)
        rep = off.evaluate(dp_strategies(off, zero == 3), zero)
        assert not rep.schedule.overlap and not rep.schedule.buckets
        assert rep.schedule.makespan == pytest.approx(rep.compute_time + rep.comm_time)
        assert rep.step_time == pytest.approx(rep.compute_time + rep.comm_time)
        assert sum(rep.schedule.hidden.values()) == 0.0
        on = model({"bucket_bytes": 256 << 10, "first_bucket_bytes": 256 << 10}, graph=g)
        rep_on = on.evaluate(dp_strategies(on, zero == 3), zero)
        assert rep_on.step_time == rep_on.schedule.makespan
        assert rep_on.step_time < rep.step_time
        # the schedule moves time, never bytes
        assert rep_on.bytes == rep.bytes and rep_on.bytes_by_phase == rep.bytes_by_phase


def test_zero3_counts_the_gathered_window_and_gathers_a_block_ahead():
    g = blocks_graph()
    weight = 256 * 256 * 4
    off = model(False, graph=g)
    full = off.evaluate(dp_strategies(off, True), 3)
    for prefetch in (1, 2):
        on = model({"prefetch": prefetch}, graph=g)
        rep = on.evaluate(dp_strategies(on, True), 3)
        window = prefetch + 1
        # every block's gathered weight was saved until backward; now only the window's
        assert full.memory["activations"] - rep.memory["activations"] == pytest.approx((BLOCKS - window) * weight)
        assert rep.schedule.gathered_blocks == window
        gathers = [e for e in rep.schedule.events if e.kind == "all_gather" and e.phase == "forward"]
        assert len(gathers) == BLOCKS
        # block k+prefetch's gather is issued when the compute stream enters block k
        enter = [next(e.start for e in rep.schedule.events if e.name.startswith(f"blocks.{k}.fc "))
                 for k in range(BLOCKS)]
        for k in range(BLOCKS - prefetch):
            ev = next(e for e in gathers if f"blocks.{k + prefetch}." in e.name)
            assert ev.start >= enter[k] - 1e-15
            if k + prefetch > prefetch:
                assert ev.start < enter[k + prefetch]
        # gathered again in backward (time, not the predicted bytes), reduce_scatters async
        again = [e for e in rep.schedule.events if e.kind == "all_gather" and e.phase == "backward"]
        assert len(again) == BLOCKS
        assert rep.bytes == full.bytes
        assert rep.step_time < full.step_time


def test_trace_json_has_one_track_per_stream():
    cm = model(None, mesh={"dp": 2, "tp": 2})
    rep = cm.evaluate(dp_strategies(cm, False), 0)
    data = json.loads(json.dumps(trace(rep.schedule)))
    assert isinstance(data["traceEvents"], list)
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert events
    for e in events:
        assert {"ph", "ts", "dur", "tid", "name", "pid"} <= set(e)
        assert e["dur"] >= 0 and e["ts"] >= 0 and isinstance(e["name"], str) and e["name"]
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert sorted(names.values()) == sorted(rep.schedule.streams())
    assert len(set(names.values())) == len(names)               # one track per stream
    assert names[0] == "compute" and "comm:dp" in names.values()
    for e in events:                                             # each event on its stream's track
        stream = names[e["tid"]]
        assert (stream == "compute") == ("args" in e and "kind" not in e["args"])
    assert any(e["name"].startswith("bucket ") for e in events)
    assert any("blocks.0.fc" in e["name"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    other = data["otherData"]
    assert math.isclose(end, other["makespan_us"] - other["interference_us"], rel_tol=1e-6)


def test_bucket_caps():
    # the overlap pass's rule: a small model's gradients in four buckets, the first no larger
    assert bucket_caps(400 << 10, 25 << 20, 1 << 20) == (100 << 10, 100 << 10)
    assert bucket_caps(16 << 20, 25 << 20, 1 << 20) == (1 << 20, 4 << 20)
    assert bucket_caps(1 << 30, 25 << 20, 1 << 20) == (1 << 20, 25 << 20)


def test_hidden_communication_slows_compute_by_the_profiles_interference():
    from dataclasses import replace
    g = blocks_graph()
    small = {"bucket_bytes": 256 << 10, "first_bucket_bytes": 256 << 10}
    plain = model(small, graph=g)
    rep = plain.evaluate(dp_strategies(plain, False), 0)
    slow = CostModel(g, Cluster({"dp": 2}, replace(PROF, overlap_slowdown=0.5)), overlap=small)
    rep2 = slow.evaluate(dp_strategies(slow, False), 0)
    hidden = sum(rep.schedule.hidden.values())
    assert hidden > 0 and rep.schedule.interference == 0.0
    assert rep2.schedule.interference == pytest.approx(0.5 * hidden)
    assert rep2.step_time == pytest.approx(rep.step_time + 0.5 * hidden)


def test_a_weight_gathered_in_forward_keeps_its_gradient_reductions_synchronous():
    """The overlap pass buckets only gradients whose every use is a copy_to chain: a weight
    stored split over tp and all_gathered before use keeps its per-use reductions in the
    program, so the schedule runs them on the critical path, not in a bucket."""
    cm = model({"bucket_bytes": 256 << 10, "first_bucket_bytes": 256 << 10}, mesh={"dp": 2, "tp": 2})
    strategies = dp_strategies(cm, False)
    w = cm.by_key["blocks.2.fc.weight"]
    strategies[w.key] = next(s for s in cm.strategies(w.index) if cm.out_layouts(w.index, s)[0] == ("R", "S(0)"))
    rep = cm.evaluate(strategies, 0)
    sched = rep.schedule
    assert any(c.kind == "all_gather" and c.axis == "tp" and src == w.index for c, _, _, src in rep.comms)
    assert all(w.key not in b.params for b in sched.buckets)
    assert sorted(p for b in sched.buckets for p in b.params) == sorted(
        f"blocks.{i}.fc.weight" for i in range(BLOCKS) if i != 2)
    sync = [e for e in sched.events if e.axis == "dp" and w.key in e.name]
    assert sync and all(e.hidden == 0.0 for e in sync)


def test_a_peer_that_reduces_one_gradient_buffer_after_backward_hides_nothing():
    # Megatron-LM's own DDP of 2021 (benchmarks/plan_quality.py prices the paper's runs so):
    # every gradient in one all_reduce once backward has ended, one latency for all of them
    from autopar.compiler.schedule import PEER_UNOVERLAPPED
    peer = model({PEER_UNOVERLAPPED: True})
    rep = peer.evaluate(dp_strategies(peer, False), 0)
    sched = rep.schedule
    assert len(sched.buckets) == 1 and sched.buckets[0].ready == "(after backward)"
    assert sorted(sched.buckets[0].params) == sorted(f"blocks.{i}.fc.weight" for i in range(BLOCKS))
    assert sched.buckets[0].nbytes == rep.bytes["all_reduce:dp"]        # bytes unchanged, one call
    backward_done = max(e.end for e in sched.events if e.stream == "compute" and e.phase == "backward")
    assert sched.buckets[0].events[0].start == pytest.approx(backward_done)
    step = [e for e in sched.events if e.phase == "optimizer"]     # after the reduction, whole
    assert len(step) == 1 and step[0].start == pytest.approx(sched.buckets[0].events[0].end)
    assert sched.hidden["dp"] == 0.0 and sched.interference == 0.0
    one_call = peer.time_of_bytes("all_reduce", "dp", rep.bytes["all_reduce:dp"])
    assert sched.makespan == pytest.approx(sched.compute + one_call)
    # between autopar's overlapped program and its per-parameter synchronous one
    on, off = model(), model(False)
    t_on = on.evaluate(dp_strategies(on, False), 0).step_time
    t_off = off.evaluate(dp_strategies(off, False), 0).step_time
    assert t_on < sched.makespan < t_off


def test_a_plan_cannot_carry_a_peer_schedule_or_an_unknown_overlap_setting():
    from autopar.compiler.plan import Plan
    from autopar.passes.overlap import settings
    plan = Plan("m", {"dp": 2})
    plan.overlap = {**plan.overlap, "peer_unoverlapped": True}
    with pytest.raises(ValueError, match=r"unknown overlap settings \['peer_unoverlapped'\]"):
        Plan.from_json(plan.to_json())
    with pytest.raises(ValueError, match="cannot be generated"):
        settings(plan.overlap)
    plan.overlap = {"bucket_byts": 1 << 20}
    with pytest.raises(ValueError, match="bucket_byts"):
        Plan.from_json(plan.to_json())
