"""`autopar plan` through compiler.cli.main: the text report, --devices, --json (the same
numbers), -o, --batch, plan files (--plan, --emit-plan and their round trip), and the
errors a user can act on."""
from __future__ import annotations

import json
import re

import pytest

from autopar.cli import main
from autopar.compiler.plan import Plan

GPT = "examples/gpt.py:build"


@pytest.fixture(autouse=True)
def fake_cpu_profile(tmp_path, monkeypatch):
    """The default device is `cpu`, measured once per machine; tests use a fixed one."""
    monkeypatch.setenv("AUTOPAR_CACHE", str(tmp_path))
    (tmp_path / "cpu.json").write_text(json.dumps({
        "name": "cpu", "peak_flops": 5e10, "efficiency": 1.0, "hbm_bandwidth": 1e10, "memory": 8e9,
        "node_size": 2, "intra": {"alpha": 5e-5, "bandwidth": 2e9},
        "inter": {"alpha": 5e-5, "bandwidth": 2e9}, "precision": "fp32"}))


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    import pathlib
    monkeypatch.chdir(pathlib.Path(__file__).resolve().parent.parent)


def test_plan_mesh_text_and_saved_plan(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", GPT, "--mesh", "dp=2,tp=2", "--deterministic", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan for gpt on dp=2,tp=2 (4 x cpu)" in text
    for part in ("solver:", "after follow-merging", "after block linking", "status OPTIMAL",
                 "per module", "transformer.h.*.attn.c_attn (x2)", "totals per training step",
                 "communication", "memory/device", "params", "grads", "optimizer", "activations"):
        assert part in text, part
    plan = Plan.load(out)
    assert plan.mesh == {"dp": 2, "tp": 2} and plan.device == "cpu"
    assert plan.layouts["transformer.h.0.mlp.c_fc.weight"]


def test_plan_json_has_the_same_numbers(capsys, tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", GPT, "--mesh", "dp=2,tp=2", "--deterministic", "--device", "h100"]
    assert main(args + ["--json", "-o", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = Plan.load(out)
    assert data["cost"]["step_time"] == plan.cost["step_time"]
    assert data["cost"]["bytes"] == plan.cost["bytes"]
    assert data["cost"]["memory"] == plan.cost["memory"]
    assert data["solver"]["variables_after_linking"] == plan.solver["variables_after_linking"]
    assert main(args) == 0
    text = capsys.readouterr().out
    from autopar.compiler.cluster import format_bytes, format_time
    assert format_time(data["cost"]["step_time"]) in text
    assert format_bytes(data["cost"]["memory"]["total"]) in text
    assert any(r["module"] == "transformer.h.*.mlp.c_fc" and r["count"] == 2 for r in data["modules"])


def test_plan_devices_compares_mesh_shapes(capsys):
    assert main(["plan", GPT, "--devices", "8", "--device", "a100-80g", "--deterministic",
                 "--batch", "8"]) == 0
    text = capsys.readouterr().out
    assert "mesh shapes of 8 devices:" in text and "<- winner" in text
    # the two-block GPT pipelines over pp=2 at most, its other 4 devices split dp x tp
    for mesh in ("dp=8,tp=1", "dp=4,tp=2", "dp=2,tp=4", "dp=1,tp=8",
                 "pp=2,dp=4,tp=1", "pp=2,dp=2,tp=2", "pp=2,dp=1,tp=4"):
        assert f"  {mesh} " in text
    assert "pp=4" not in text and "1f1b x" in text
    assert main(["plan", GPT, "--devices", "8", "--device", "a100-80g", "--deterministic", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["mesh_candidates"]
    assert len(rows) == 7 and sum(r["winner"] for r in rows) == 1
    pp = [r for r in rows if r["mesh"].startswith("pp=")]
    # two screened shapes searched in full, the third priced from a searched plan's strategies
    assert sum(r["status"] == "screened" for r in pp) == 1
    assert all(r["schedule"] == "1f1b" and r["microbatches"] >= 1 for r in pp)


def test_plan_user_errors(capsys, tmp_path):
    assert main(["plan", "examples/mlp.py:build", "--mesh", "dp=2", "--batch", "4"]) == 2
    assert "takes no 'batch' argument" in capsys.readouterr().err
    bad = tmp_path / "dev.json"
    bad.write_text("{}")
    assert main(["plan", GPT, "--mesh", "dp=2", "--device", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "dev.json" in err and "peak_flops" in err
    assert main(["plan", GPT, "--mesh", "dp=2", "--memory", "100KB", "--deterministic"]) == 2
    err = capsys.readouterr().err
    assert "memory per device" in err and "least any plan needs" in err
    assert main(["plan", GPT, "--mesh", "dp2"]) == 2
    assert "dp2=N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", GPT, "--mesh", "dp=2", "--devices", "4"])


# ---- plan files: --plan FILE, --emit-plan FILE ------------------------------------------------

MEGATRON = "examples/plans/megatron_gpt.plan"


def test_plan_with_a_plan_file(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", GPT, "--plan", MEGATRON, "--deterministic", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    # the file's mesh, device and ZeRO stage win over the defaults (cpu, searched stage)
    assert "plan for gpt on dp=2,tp=4 (8 x h100), ZeRO-1 over dp" in text
    assert "constraints from the plan file (the search chose everything else; * marks pinned" in text
    assert f'layout "transformer.wte.weight" {{ dp: R, tp: S(0) }}    # {MEGATRON}:16:1' in text
    assert re.search(r"\n  transformer\.wte +weight \{dp:R, tp:S\(0\)\}\*\n", text)
    assert re.search(r"\n  transformer\.h\.\*\.mlp\.c_fc \(x2\) +weight \{dp:R, tp:S\(0\)\}\*, bias", text)
    plan = Plan.load(out)
    assert plan.constraints[0] == f"mesh dp=2, tp=4    # {MEGATRON}:4:1"
    assert plan.layouts["transformer.h.1.mlp.c_proj.weight"] == ["R", "S(1)"]
    # --mesh may repeat the file's mesh; the JSON carries the constraints too
    assert main(["plan", GPT, "--plan", MEGATRON, "--mesh", "dp=2,tp=4", "--deterministic", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["constraints"] == plan.constraints and data["cost"]["step_time"] == plan.cost["step_time"]


def test_plan_file_user_errors(capsys):
    # a --mesh that disagrees with the file is the DSL's MeshMismatch, pointing at the file
    assert main(["plan", GPT, "--plan", MEGATRON, "--mesh", "dp=2,tp=2"]) == 2
    err = capsys.readouterr().err
    assert f"{MEGATRON}:4:1: MeshMismatch" in err and "fix: drop --mesh" in err
    assert main(["plan", GPT, "--plan", MEGATRON, "--devices", "4"]) == 2
    assert "names the mesh dp=2,tp=4 of 8 devices" in capsys.readouterr().err
    # a file without a mesh statement takes --mesh, and needs one
    assert main(["plan", GPT, "--plan", "examples/plans/gpt_blocks.plan"]) == 2
    assert "MissingMesh" in capsys.readouterr().err
    assert main(["plan", GPT, "--plan", "examples/plans/gpt_blocks.plan", "--mesh", "tp=2",
                 "--deterministic"]) == 0
    assert "plan for gpt on tp=2 (2 x cpu)" in capsys.readouterr().out
    assert main(["plan", GPT]) == 2
    assert "--mesh dp=2,tp=4" in capsys.readouterr().err


@pytest.mark.parametrize("example", ["mlp", "gpt", "llama", "lora"])
def test_emit_plan_round_trips_through_the_cli(example, capsys, tmp_path):
    """`--emit-plan` writes a plan file that `--plan` turns back into the same plan -- also
    when the time limit stops the search before it proves the plan optimal (lora here)."""
    spec = f"examples/{example}.py:build"
    first, again, planfile = tmp_path / "first.json", tmp_path / "again.json", tmp_path / "out.plan"
    assert main(["plan", spec, "--mesh", "dp=2,tp=2", "--deterministic", "--time-limit", "3",
                 "-o", str(first), "--emit-plan", str(planfile)]) == 0
    assert f"plan file written to {planfile}" in capsys.readouterr().out
    a = Plan.load(first)
    assert ("every value is pinned" in planfile.read_text()) == (a.solver["status"] != "OPTIMAL")
    assert main(["plan", spec, "--plan", str(planfile), "--deterministic", "-o", str(again)]) == 0
    b = Plan.load(again)
    assert b.layouts == a.layouts
    assert (b.mesh, b.device, b.zero, b.dp_axis, b.recompute) == (a.mesh, a.device, a.zero, a.dp_axis, a.recompute)
    assert b.constraints and not a.constraints


def test_plan_timeline_writes_the_predicted_trace_and_explains_the_schedule(capsys, tmp_path):
    out = tmp_path / "step.json"
    assert main(["plan", GPT, "--mesh", "dp=2", "--device", "a100-80g", "--deterministic",
                 "--zero", "0", "--timeline", str(out)]) == 0
    text = capsys.readouterr().out
    assert "schedule (overlap on):" in text and f"predicted timeline written to {out}" in text
    data = json.loads(out.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    tracks = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert "compute" in tracks and events
    assert all({"ts", "dur", "tid", "name"} <= set(e) for e in events)
    if "comm:dp" in tracks:           # data parallel: buckets explained with their launch point
        assert re.search(r"bucket 0: all_reduce over dp, .* launched at .* after the backward of %", text)
        assert re.search(r"dp: exposed .*, hidden .* \(\d+% hidden\)", text)
    # the step time the explanation prints is the schedule's makespan
    assert data["otherData"]["makespan_us"] > 0


def test_plan_with_overlap_off_plan_file_prices_collectives_synchronously(capsys, tmp_path):
    plan_file = tmp_path / "off.plan"
    plan_file.write_text("mesh dp=2\noverlap off\n")
    out = tmp_path / "plan.json"
    assert main(["plan", GPT, "--plan", str(plan_file), "--device", "a100-80g", "--deterministic",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    plan = Plan.load(out)
    assert plan.overlap["enabled"] is False
    assert "schedule (overlap off" in text           # the explanation prices the file's schedule
