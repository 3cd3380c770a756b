"""Recompute chosen by the search (passes/shard.py `search`): under a memory limit that no
plan meets without recompute the search recomputes the repeated blocks and says why; with
room to spare it recomputes nothing; a plan file's `recompute` lines are kept as written;
a limit nothing meets names the least memory with and without recompute; and the
generated program of a searched recompute plan matches the single-device run.

The model is examples/gpt.py:build (2 blocks, 110k parameters) on the cpu profile, whose
memory numbers are a few MiB: the limits below are taken from the search's own least
memory, so they track the cost model rather than fixed numbers."""
from __future__ import annotations

import pytest

from autopar.compiler.cost import CostModel, recompute_savings
from autopar.compiler.cluster import Cluster, load_profile
from autopar.compiler.gradients import grad_info
from autopar.compiler.patterns import repeated_blocks
from autopar.explain import explain
from autopar.passes.shard import PlanInfeasible, recompute_candidates, search, search_devices

MESH = {"dp": 2}
BLOCKS = ["transformer.h.0", "transformer.h.1"]


@pytest.fixture(scope="module")
def gpt(example):
    from autopar.pipeline import prepared_graph
    model, inputs = example("gpt").build()
    return prepared_graph(model, inputs, name="gpt")


@pytest.fixture(scope="module")
def least(gpt):
    """The least memory per device on dp=2 without recompute and with every block recomputed."""
    out = {}
    for key, kw in (("without", dict(search_recompute=False)), ("with", dict(recompute=["transformer.h.*"]))):
        with pytest.raises(PlanInfeasible) as info:
            search(gpt, MESH, "cpu", memory_limit=1e5, deterministic=True, **kw)
        out[key] = info.value.least_memory
    assert out["with"] < 0.8 * out["without"]          # recompute must matter on this model
    return out


def test_the_candidates_are_the_repeated_blocks(gpt):
    assert repeated_blocks(gpt) == {"transformer.h": BLOCKS}
    (paths, saved), = recompute_candidates(gpt)
    assert paths == BLOCKS
    # the estimate is the drop in saved activations the cost model prices, unsplit
    prof = load_profile("cpu")
    rep = {}
    plain = CostModel(gpt, Cluster({"dp": 1}, prof), precision="fp32").evaluate(rep, 0)
    rc = CostModel(gpt, Cluster({"dp": 1}, prof), precision="fp32", recompute=BLOCKS).evaluate(rep, 0)
    drop = plain.memory["activations"] - rc.memory["activations"]
    assert saved == pytest.approx(drop, rel=0.05)
    assert recompute_savings(gpt, [], grad_info(gpt).needs_grad) == 0.0


def test_recompute_is_chosen_when_nothing_fits_without_it(gpt, least):
    limit = 0.5 * (least["with"] + least["without"])
    plan = search(gpt, MESH, "cpu", memory_limit=limit, deterministic=True)
    assert plan.recompute == BLOCKS and plan.cost["fits"]
    assert plan.cost["memory"]["total"] <= limit < least["without"]
    assert plan.cost["compute"]["recompute"] > 0
    rs = plan.solver["recompute_search"]
    assert rs["mode"] == "searched" and rs["chosen"] == ["transformer.h.*"]
    assert rs["tried_because"] == "nothing fits without recompute"
    assert [t["status"] for t in rs["tried"]] == ["infeasible", "fits"]
    assert rs["without"]["least_memory"] == pytest.approx(least["without"], rel=1e-6)
    text = explain(plan, gpt)
    assert "recompute (searched, because nothing fits without recompute" in text
    assert "chosen: recompute transformer.h.*, because it is the only choice that fits" in text
    assert "without recompute: no plan fits (the least any plan needs:" in text


def test_recompute_is_not_chosen_with_memory_to_spare(gpt):
    plan = search(gpt, MESH, "cpu", deterministic=True)            # the profile's memory
    assert plan.recompute == [] and plan.cost["compute"]["recompute"] == 0
    rs = plan.solver["recompute_search"]
    assert len(rs["tried"]) == 1 and rs["chosen"] == []
    assert "recompute not tried" in rs["tried_because"]
    # tried because memory binds, yet rejected: the recompute plan must then be slower
    bound = search(gpt, MESH, "cpu", deterministic=True,
                   memory_limit=plan.cost["memory"]["total"] * 1.05)
    tried = bound.solver["recompute_search"]["tried"]
    assert len(tried) == 2
    steps = {tuple(t["recompute"]): t["step_time"] for t in tried if t["status"] == "fits"}
    best = min(steps, key=steps.get)
    assert bound.solver["recompute_search"]["chosen"] == list(best)


def test_a_candidate_the_compute_bound_rules_out_is_not_searched(gpt, least):
    """No plan with the regions is faster than `compute_bound` (FLOPs over every device at
    peak); a candidate it proves slower than a step already found is skipped and said so."""
    from autopar.passes.shard import compute_bound
    limit = 0.5 * (least["with"] + least["without"])
    plan = search(gpt, MESH, "cpu", memory_limit=limit, deterministic=True)
    lb = compute_bound(gpt, Cluster(MESH, load_profile("cpu")), BLOCKS, None)
    assert 0 < lb <= plan.cost["compute_time"] <= plan.cost["step_time"]
    with pytest.raises(PlanInfeasible) as info:
        search(gpt, MESH, "cpu", memory_limit=limit, deterministic=True, step_to_beat=0.5 * lb)
    assert "Recompute of transformer.h.* was not searched on this mesh" in str(info.value)
    assert [t["status"] for t in info.value.recompute_tried] == ["infeasible", "skipped"]


def test_a_plan_file_recompute_is_kept(gpt, least, tmp_path):
    from autopar.dsl import compile_plan
    limit = 0.5 * (least["with"] + least["without"])
    f = tmp_path / "one_block.plan"
    f.write_text('mesh dp=2\nrecompute "transformer.h.1"\n')
    # room to spare: the search would recompute nothing, the file's block stays
    plan = compile_plan(str(f), gpt, device="cpu", deterministic=True)
    assert plan.recompute == ["transformer.h.1"]
    assert plan.solver["recompute_search"] == {"mode": "given", "chosen": ["transformer.h.1"]}
    assert "recompute (from the plan): transformer.h.1 -- kept as written" in explain(plan, gpt)
    # a limit only both blocks meet: the file's word is kept, nothing is added
    with pytest.raises(PlanInfeasible):
        compile_plan(str(f), gpt, device="cpu", memory=0.5 * (least["with"] + limit), deterministic=True)


def test_infeasible_names_the_memory_recompute_would_need(gpt, least):
    with pytest.raises(PlanInfeasible) as info:
        search(gpt, MESH, "cpu", memory_limit=0.5 * least["with"], deterministic=True)
    e = info.value
    msg = str(e)
    assert "with or without recompute" in msg and "with recompute of transformer.h.*" in msg
    assert e.least_memory == pytest.approx(least["with"], rel=1e-6)
    assert e.least_memory_without_recompute == pytest.approx(least["without"], rel=1e-6)
    from autopar.compiler.cluster import format_bytes
    assert f"A limit of {format_bytes(least['with'])} per device would fit" in msg
    assert format_bytes(least["without"]) in msg
    # the limit it names does fit, with recompute
    plan = search(gpt, MESH, "cpu", memory_limit=least["with"] * 1.001, deterministic=True)
    assert plan.recompute == BLOCKS
    # over mesh shapes: the shape and the recompute that need least are named
    with pytest.raises(PlanInfeasible) as info:
        search_devices(gpt, 2, "cpu", memory_limit=0.5 * least["with"], deterministic=True)
    assert "The least memory per device of any shape is" in str(info.value)
    assert "with recompute of transformer.h.*" in str(info.value)


def test_a_searched_recompute_plan_runs_and_matches_the_single_device(gpt, least, tmp_path, capsys):
    """`autopar run --memory` on a limit only recompute meets: the search chooses it, the
    program checkpoints the blocks and its losses and final shards match one device."""
    from autopar.cli import main
    from autopar.compiler.cluster import parse_bytes
    import pathlib
    repo = pathlib.Path(__file__).resolve().parents[1]
    limit = int(0.5 * (least["with"] + least["without"]))
    code = main(["run", f"{repo}/examples/gpt.py:build", "--mesh", "dp=2", "--memory", str(limit),
                 "--steps", "2", "--check", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "check: ok" in out, out[-3000:]
    assert "recompute transformer.h.* (2 modules)" in out
    program = next(tmp_path.glob("*_torch.py")).read_text()
    assert "_recomputed" in program and "checkpoint" in program
    assert parse_bytes(str(limit)) == limit


def saved_activation_bytes(prog) -> int:
    """Bytes the generated module saves for backward in one forward (one process, world 1):
    every distinct tensor autograd packs, parameters and buffers left out (they are counted
    as parameter state)."""
    import torch
    run = prog.instantiate(prog.model)
    try:
        state = {t.untyped_storage().data_ptr() for t in [*run.module.parameters(), *run.module.buffers()]}
        seen, total = set(), 0

        def pack(t):
            nonlocal total
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key[0] not in state and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(*prog.inputs)
        return total
    finally:
        run.mesh.shutdown()


def test_the_memory_claim_of_a_searched_recompute_is_what_the_program_saves(example):
    """The generated program (mesh dp=1, in this process) saves for backward what the plan
    claims as activations, within 15%, with and without the recompute the search chose
    under a limit only recompute meets (measured: saved-tensor hooks around one forward)."""
    from autopar.pipeline import build_program, prepared_graph
    model, inputs = example("gpt").build()
    g = prepared_graph(model, inputs, name="gpt")
    with pytest.raises(PlanInfeasible) as info:
        search(g, {"dp": 1}, "cpu", memory_limit=1e5, deterministic=True, search_recompute=False,
               precision="fp32")
    measured = {}
    for label, limit in (("free", None), ("tight", 0.9 * info.value.least_memory)):
        prog = build_program(model, inputs, mesh={"dp": 1}, memory=limit)
        claim = prog.plan.cost["memory"]["activations"]
        got = saved_activation_bytes(prog)
        assert got == pytest.approx(claim, rel=0.15), (label, got, claim)
        measured[label] = (prog.plan.recompute, got)
    assert measured["free"][0] == [] and measured["tight"][0] == BLOCKS
    assert measured["tight"][1] < 0.3 * measured["free"][1]          # recompute really saves
