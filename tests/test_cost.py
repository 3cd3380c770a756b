"""The cost model: device profiles, clusters, alpha-beta collectives, compute roofline,
ZeRO bytes and memory, recompute, and the annotated IR. Graphs are hand-built (5-10 nodes)
and checked by the verifier."""
from __future__ import annotations

import json
import math

import pytest

from autopar.compiler.cluster import (Cluster, DeviceProfile, Link, ProfileError, load_profile, parse_bytes)
from autopar.compiler.cost import CostModel, annotate_costs, collective_time, recompute_regions
from autopar.compiler.patterns import resolve_modules
from autopar.compiler.ir import Graph, Node, NodeMeta, Value
from autopar.compiler.verify import verify

PROF = DeviceProfile("test", peak_flops=100e12, efficiency=0.5, hbm_bandwidth=1e12, memory=80e9,
                     node_size=8, intra=Link(1e-5, 100e9), inter=Link(2e-5, 10e9), precision="fp32")


def mlp_graph(batch=8, d_in=16, hidden=32, d_out=16, frozen_first=False, bias=True) -> Graph:
    """x -> linear -> gelu -> linear -> mse_loss(target); modules fc1, act, fc2."""
    x = Value("x", (batch, d_in), kind="input")
    t = Value("target", (batch, d_out), kind="input")
    w1 = Value("fc1.weight", (hidden, d_in), kind="param", requires_grad=not frozen_first)
    b1 = Value("fc1.bias", (hidden,), kind="param", requires_grad=not frozen_first)
    w2 = Value("fc2.weight", (d_out, hidden), kind="param", requires_grad=True)
    h = Value("h", (batch, hidden))
    a = Value("a", (batch, hidden))
    y = Value("y", (batch, d_out))
    loss = Value("loss", ())
    nodes = [
        Node("linear", (x, w1, b1) if bias else (x, w1), (), (h,), NodeMeta("fc1")),
        Node("gelu", (h,), (), (a,), NodeMeta("act")),
        Node("linear", (a, w2), (), (y,), NodeMeta("fc2")),
        Node("mse_loss", (y, t), (("reduction", 1),), (loss,), NodeMeta("")),
    ]
    params = [w1, b1, w2] if bias else [w1, w2]
    return verify(Graph("mlp", [x, t], params, nodes, [loss]))


# ---- profiles and clusters --------------------------------------------------------------------

def test_builtin_profiles_have_published_figures():
    a100, h100, h200, mi = (load_profile(n) for n in ("a100-80g", "h100", "h200", "mi250x"))
    assert a100.peak_flops == 312e12 and a100.hbm_bandwidth == 2.0e12 and a100.node_size == 8
    assert h100.peak_flops == 989e12 and h100.inter.bandwidth == 46e9
    assert h200.memory == 141e9 and h200.hbm_bandwidth == 4.8e12
    assert mi.peak_flops == 191.5e12
    for p in (a100, h100, h200, mi):
        assert 0.3 <= p.efficiency <= 0.7 and p.precision == "mixed"


def test_axis_links_from_the_innermost_axis():
    c = Cluster({"dp": 16, "tp": 8}, load_profile("a100-80g"))
    assert c.link("tp").bandwidth == 230e9 and c.link("dp").bandwidth == 24e9
    c = Cluster({"dp": 2, "tp": 4}, load_profile("a100-80g"))        # 8 devices: one node
    assert c.link("dp") == c.link("tp") == load_profile("a100-80g").intra
    assert Cluster("dp=4,tp=4", PROF).link_kind("dp") == "network"


def test_user_profiles_json_and_toml(tmp_path):
    data = {"peak_flops": 1e12, "hbm_bandwidth": 1e11, "memory": 1e9, "node_size": 4,
            "intra": {"alpha": 1e-5, "bandwidth": 1e10}, "inter": {"alpha": 1e-4, "bandwidth": 1e9}}
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(data))
    prof = load_profile(str(p))
    assert prof.name == "mine" and prof.node_size == 4 and prof.intra.alpha == 1e-5
    t = tmp_path / "mine.toml"
    t.write_text('peak_flops = 1e12\nhbm_bandwidth = 1e11\nmemory = 1e9\nnode_size = 4\n'
                 'intra = { alpha = 1e-5, bandwidth = 1e10 }\ninter = { alpha = 1e-4, bandwidth = 1e9 }\n')
    assert load_profile(str(t)).inter.bandwidth == 1e9


def test_bad_profiles_name_file_and_field(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"peak_flops": 1e12, "memory": 1e9, "node_size": 8,
                             "intra": {"alpha": 1e-5, "bandwidth": 1e10}, "inter": {"alpha": 1e-5}}))
    with pytest.raises(ProfileError, match=r"bad.json.*hbm_bandwidth"):
        load_profile(str(p))
    p.write_text(json.dumps({"peak_flops": 1e12, "hbm_bandwidth": 1, "memory": 1e9, "node_size": 8,
                             "intra": {"alpha": 1e-5, "bandwidth": 1e10}, "inter": {"alpha": 1e-5}}))
    with pytest.raises(ProfileError, match=r"bad.json.*inter needs alpha"):
        load_profile(str(p))
    p.write_text("{not json")
    with pytest.raises(ProfileError, match=r"bad.json: not valid JSON"):
        load_profile(str(p))
    with pytest.raises(ProfileError, match="unknown device 'tpu9'"):
        load_profile("tpu9")


def test_cpu_profile_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    calls = []

    def fake_measure():
        calls.append(1)
        return {"name": "cpu", "peak_flops": 5e10, "efficiency": 1.0, "hbm_bandwidth": 1e10,
                "memory": 8e9, "node_size": 2, "intra": {"alpha": 5e-5, "bandwidth": 2e9},
                "inter": {"alpha": 5e-5, "bandwidth": 2e9}, "precision": "fp32"}
    monkeypatch.setattr("autopar.compiler.cluster.measure_cpu", fake_measure)
    assert load_profile("cpu").peak_flops == 5e10
    assert load_profile("cpu").peak_flops == 5e10
    assert len(calls) == 1 and (tmp_path / "cpu.json").is_file()


def test_parse_bytes_units():
    assert parse_bytes("80GB") == 80e9
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("512 MB") == 512e6
    with pytest.raises(ValueError, match="e.g. 80GB"):
        parse_bytes("lots")


# ---- collectives and compute ----------------------------------------------------------------------

def test_collective_alpha_beta_table():
    link = Link(1e-5, 1e11)
    S, n = 8e6, 4
    assert math.isclose(collective_time("all_reduce", n, S, link), 2 * 3 * 1e-5 + 2 * 3 / 4 * S / 1e11)
    assert math.isclose(collective_time("all_gather", n, S, link), 3 * 1e-5 + 3 / 4 * S / 1e11)
    assert math.isclose(collective_time("reduce_scatter", n, S, link), 3 * 1e-5 + 3 / 4 * S / 1e11)
    assert math.isclose(collective_time("all_to_all", n, S / n, link), 3 * 1e-5 + 3 / 4 * (S / n) / 1e11)
    assert collective_time("all_reduce", 1, S, link) == 0


def test_compute_roofline_split_and_backward():
    g = mlp_graph(batch=64, d_in=512, hidden=2048, d_out=512)
    cm = CostModel(g, Cluster({"dp": 2}, PROF))
    fc1 = cm.by_key["h"]
    rep, split = cm.compute(fc1.index, (None,)), cm.compute(fc1.index, ("b0",))
    flops = 2 * 64 * 2048 * 512 + 64 * 2048
    nbytes = 4 * (64 * 512 + 2048 * 512 + 2048 + 64 * 2048)
    assert rep.flops == flops
    assert math.isclose(rep.fwd_time, max(flops / 50e12, nbytes / 1e12))
    assert math.isclose(split.fwd_time, rep.fwd_time / 2)
    # x needs no gradient: only the weight gradient (1x) in backward
    assert rep.bwd_flops == flops
    fc2 = cm.compute(cm.by_key["y"].index, (None,))
    assert fc2.bwd_flops == 2 * fc2.flops                      # input and weight gradients
    gelu = cm.compute(cm.by_key["a"].index, (None,))
    assert gelu.bwd_flops == 2 * gelu.flops


def test_frozen_weight_saves_weight_gradient_and_optimizer_state():
    g = mlp_graph(frozen_first=True)
    cm = CostModel(g, Cluster({"dp": 2}, PROF))
    assert cm.compute(cm.by_key["h"].index, (None,)).bwd_flops == 0      # nothing upstream needs grad
    rep = cm.evaluate({}, zero=0)
    w2 = 16 * 32
    assert rep.memory["grads"] == 4 * w2 and rep.memory["optimizer"] == 8 * w2
    assert rep.memory["params"] == 4 * (16 * 32 + 32 + w2)


def test_data_parallel_gradient_bytes_and_zero_stages():
    g = mlp_graph(batch=8, d_in=16, hidden=32, d_out=16)
    cm = CostModel(g, Cluster({"dp": 4}, PROF))
    dp = {"x": ("d0",), "target": ("d0",), "h": ("b0",), "a": ("d0",), "y": ("b0",), "loss": ("d0",)}
    params = {"fc1.weight": 32 * 16, "fc1.bias": 32, "fc2.weight": 16 * 32}
    total = 4 * sum(params.values())
    z0 = cm.evaluate(dp, zero=0)
    assert z0.bytes == {"all_reduce:dp": total}
    assert z0.bytes_by_phase["backward"] == {"all_reduce:dp": total}
    assert z0.memory["params"] == z0.memory["grads"] == total and z0.memory["optimizer"] == 2 * total
    z1 = cm.evaluate(dp, zero=1)
    assert z1.bytes_by_phase["optimizer"] == {"all_gather:dp": total}
    assert z1.memory["optimizer"] == 2 * total / 4 and z1.memory["grads"] == total
    z2 = cm.evaluate(dp, zero=2)
    assert z2.bytes == {"reduce_scatter:dp": total, "all_gather:dp": total}
    assert z2.memory["grads"] == total / 4
    # one all_reduce = reduce_scatter + all_gather in bytes and time
    assert math.isclose(z2.comm_time, z0.comm_time)
    # ZeRO-3: params stored S(0) on dp; per use a forward all_gather and backward reduce_scatter
    z3s = dict(dp, **{"fc1.weight": ("d0",), "fc1.bias": ("d0",), "fc2.weight": ("d0",)})
    z3 = cm.evaluate(z3s, zero=3)
    assert z3.bytes_by_phase["forward"] == {"all_gather:dp": total}
    assert z3.bytes_by_phase["backward"] == {"reduce_scatter:dp": total}
    assert z3.memory["params"] == total / 4 and z3.memory["optimizer"] == 2 * total / 4


def test_mixed_precision_counts_bf16_and_16_bytes_per_param():
    g = mlp_graph()
    cm = CostModel(g, Cluster({"dp": 2}, load_profile("h100")))
    rep = cm.evaluate({}, zero=0)
    n = 32 * 16 + 32 + 16 * 32
    assert (rep.memory["params"], rep.memory["grads"], rep.memory["optimizer"]) == (2 * n, 2 * n, 12 * n)
    assert cm.precision == "mixed"


def test_megatron_pair_collectives():
    """Column-parallel fc1, row-parallel fc2: one forward all_reduce of y on tp; x needs no
    gradient so the conjugate backward all_reduce is absent."""
    g = mlp_graph(batch=8, d_in=16, hidden=32, d_out=16, bias=False)
    cm = CostModel(g, Cluster({"tp": 2}, PROF))
    s = {"fc1.weight": ("d0",), "h": ("n",), "a": ("d1",), "fc2.weight": ("d1",), "y": ("k",)}
    rep = cm.evaluate(s, zero=0)
    assert rep.bytes_by_phase["forward"] == {"all_reduce:tp": 8 * 16 * 4}
    assert rep.bytes_by_phase["backward"] == {}
    assert rep.memory["params"] == 4 * (32 * 16 + 16 * 32) / 2


def test_recompute_region_saves_only_inputs_and_costs_a_forward():
    g = mlp_graph(batch=64, d_in=64, hidden=256, d_out=64)
    assert recompute_regions(g, ["act"]) == {"a": "act#0"}
    assert set(recompute_regions(g, resolve_modules(g, ["fc*"]))) == {"h", "y"}
    base = CostModel(g, Cluster({"dp": 2}, PROF)).evaluate({}, 0)
    rc = CostModel(g, Cluster({"dp": 2}, PROF), recompute=["act"]).evaluate({}, 0)
    gelu_out = 64 * 256 * 4
    # the gelu output is not saved; its input h already is
    assert math.isclose(base.memory["activations"] - rc.memory["activations"], gelu_out)
    assert math.isclose(rc.compute["recompute"], base.nodes["a"].fwd_time)


def test_annotated_ir_prints_every_node_cost():
    from autopar.compiler.plan import Plan
    from autopar.compiler.sharding import derive_layouts
    g = mlp_graph()
    s = {"x": ("d0",), "target": ("d0",), "h": ("b0",), "a": ("d0",), "y": ("b0",), "loss": ("d0",)}
    plan = Plan("mlp", {"dp": 2}, device="test", strategies={k: list(v) for k, v in s.items()},
                layouts={k: list(v) for k, v in derive_layouts(g, {"dp": 2}, s).items()}, dp_axis="dp")
    text = annotate_costs(g, plan, PROF)
    lines = [l for l in text.splitlines() if " = " in l]
    assert len(lines) == 4 and all("[fwd " in l for l in lines)
    assert "{dp:S(0)}" in text and "all_reduce(dp) backward" in text


def test_cpu_cache_of_an_older_measurement_is_measured_again(tmp_path, monkeypatch):
    """A cache measure_cpu wrote before per-op overhead was measured (no version) is
    measured again; a hand-written profile without a version is used as it is."""
    import json
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    old = {"name": "cpu", "peak_flops": 5e10, "efficiency": 1.0, "hbm_bandwidth": 1e10, "memory": 8e9,
           "node_size": 2, "intra": {"alpha": 5e-5, "bandwidth": 2e9}, "inter": {"alpha": 5e-5, "bandwidth": 2e9},
           "precision": "fp32"}
    (tmp_path / "cpu.json").write_text(json.dumps(dict(old, sources="measured in 3.1 s: ...")))
    calls = []

    def fake_measure():
        calls.append(1)
        return dict(old, peak_flops=6e10, op_overhead=1e-5)
    monkeypatch.setattr("autopar.compiler.cluster.measure_cpu", fake_measure)
    prof = load_profile("cpu")
    assert calls == [1] and prof.peak_flops == 6e10 and prof.op_overhead == 1e-5
    assert json.loads((tmp_path / "cpu.json").read_text())["version"] >= 2
    assert load_profile("cpu").peak_flops == 6e10 and calls == [1]      # cached now
    (tmp_path / "cpu.json").write_text(json.dumps(old))                 # by hand: kept
    assert load_profile("cpu").peak_flops == 5e10 and calls == [1]


def test_ranks_planning_on_a_fresh_machine_measure_the_cpu_once(tmp_path, monkeypatch):
    """The ranks of a launched job each plan, so each reads the cpu profile: on a fresh
    machine the first measures under a lock and the others wait and read its numbers (two
    measurements, on shared cores, differ, and so would the ranks' plans)."""
    import threading
    import time
    from autopar.compiler.cluster import cpu_profile
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    calls = []

    def slow_measure():
        calls.append(1)
        time.sleep(0.3)
        return {"name": "cpu", "peak_flops": 1e10 * len(calls), "efficiency": 1.0, "hbm_bandwidth": 1e10,
                "memory": 8e9, "node_size": 2, "intra": {"alpha": 5e-5, "bandwidth": 2e9},
                "inter": {"alpha": 5e-5, "bandwidth": 2e9}, "precision": "fp32"}
    monkeypatch.setattr("autopar.compiler.cluster.measure_cpu", slow_measure)
    got = []
    ranks = [threading.Thread(target=lambda: got.append(cpu_profile().peak_flops)) for _ in range(3)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert len(calls) == 1 and got == [1e10] * 3
    assert cpu_profile(remeasure=True).peak_flops == 2e10       # asked for: measured again
