"""Generated programs: text (golden), and training-step parity on 4 ranks per backend.

The multi-rank test launches ONE job per backend (`plan_helpers.launch_programs`: every
generated program of the manifest in turn, in the same ranks, exactly as `python
program.py ...` would). The parent then checks each program's losses and final shards
against the single-device run, and the bytes every collective moved (every rank, every
step) against `predict_traffic`. The single-device run of a case is made once and
shared by both backends (`plan_helpers.shared_reference`: the same model, initial state
and batch).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORLD = 4
STEPS = 3

# name, example, mesh, forced layouts, plan options, optimizer
CASES = [
    ("mlp_tp4", "mlp", {"tp": 4}, "MLP_TP", {}, "adamw"),
    ("gpt_dp2_tp2_megatron_sp", "gpt", {"dp": 2, "tp": 2}, "MEGATRON_SP", {}, "adamw"),
    # input-gradient all_reduces behind the weight gradients, in a plain and a recomputed block
    ("gpt_dp2_tp2_megatron", "gpt", {"dp": 2, "tp": 2}, "MEGATRON", {"recompute": ["transformer.h.1"]}, "adamw"),
    ("gpt_dp4_zero2_recompute", "gpt", {"dp": 4}, None, {"zero": 2, "recompute": ["transformer.h.*"]}, "adamw"),
    # async TP: the sequence-parallel gathers and reduce_scatters as collective matmuls, in a
    # plain and a recomputed block
    ("gpt_dp2_tp2_async_tp", "gpt", {"dp": 2, "tp": 2}, "SEQUENCE_PARALLEL",
     {"overlap": {"async_tp": True}, "recompute": ["transformer.h.1"]}, "adamw"),
    ("gpt_dp2_tp2_zero3_recompute", "gpt", {"dp": 2, "tp": 2}, "MEGATRON_SP",
     {"zero3": True, "recompute": ["transformer.h.1"]}, "sgd"),
    ("lora_dp2_tp2_zero1", "lora", {"dp": 2, "tp": 2}, None, {"zero": 1}, "adamw"),
    ("llama_tp4", "llama", {"tp": 4}, "LLAMA_TP", {}, "adamw"),
    # the overlap schedule: ZeRO-3 prefetched and resharded after forward (FSDP's), small
    # gradient buckets (several in flight at once), and overlap turned off
    ("gpt_dp4_zero3_prefetch", "gpt", {"dp": 4}, "DDP", {"zero3": True, "overlap": {"prefetch": 2}}, "adamw"),
    ("gpt_dp4_small_buckets", "gpt", {"dp": 4}, "DDP",
     {"overlap": {"bucket_bytes": 64 << 10, "first_bucket_bytes": 16 << 10}}, "adamw"),
    ("mlp_dp4_overlap_off", "mlp", {"dp": 4}, None, {"overlap": {"enabled": False}}, "adamw"),
    # gradient accumulation: each rank's batch as 2 microbatches, buckets reduced after the last
    ("gpt_dp2_tp2_microbatches", "gpt", {"dp": 2, "tp": 2}, "MEGATRON_SP", {"microbatches": 2}, "adamw"),
    # traced with symbolic sizes from a batch of 4, trained on a batch of 8
    ("gpt_dp2_tp2_batch8", "gpt", {"dp": 2, "tp": 2}, "MEGATRON_SP", {"double_batch": True}, "adamw"),
]


# ==========================================================================
# tests (parent)
# ==========================================================================
def build_case(traced, name, example, mesh, rules, options, optimizer, backend):
    import plan_helpers
    from autopar.pipeline import build_program, prepared_graph
    options = dict(options)
    double = options.pop("double_batch", False)
    overlap = options.pop("overlap", {})
    microbatches = options.pop("microbatches", 1)
    model, inputs, _, graph = traced(example)
    if double or microbatches > 1:
        graph = prepared_graph(model, inputs, example, symbolic=True)
    plan = plan_helpers.forced_plan(graph, mesh, getattr(plan_helpers, rules) if rules else (), **options)
    plan.overlap.update(overlap)
    plan.microbatches = microbatches
    return build_program(model, inputs, mesh, backend=backend, plan=plan, optimizer=optimizer,
                         steps=STEPS, name=example, graph=graph)


def twice_the_batch(inputs):
    """A batch twice the example's (the example and its reverse along the batch dim)."""
    import torch
    return tuple(torch.cat([t, t.flip(0)], 0) for t in inputs)


@pytest.mark.parametrize("backend", ["torch", "mpi"])
def test_parity_and_bytes_on_4_ranks(traced, tmp_path, backend):
    """Every case of CASES in one 4-rank job: losses and shards equal the single-device
    run, measured bytes equal the prediction, and every collective kind is used."""
    from autopar.run import compare, reference_run, traffic_table
    from autopar.compiler.sharded import predict_traffic
    from plan_helpers import launch_programs, program_entry, shared_reference
    if backend == "mpi":
        pytest.importorskip("mpi4py")
    programs, entries = [], []
    import torch  # noqa: F401

    from autopar.backends import runtime as rt
    for name, example, mesh, rules, options, optimizer in CASES:
        prog = build_case(traced, name, example, mesh, rules, options, optimizer, backend)
        d = tmp_path / name
        prog.write(d)
        batch = prog.inputs
        if options.get("double_batch"):
            batch = twice_the_batch(prog.inputs)
            state, _ = rt.load_init(prog.files["init"])
            rt.save_init(prog.files["init"], state, list(batch))
        programs.append((name, prog, d, optimizer, batch))
        entries.append(program_entry(prog, d, STEPS, optimizer))
    res = launch_programs(tmp_path, entries, WORLD, backend)
    print(f"{backend}: {len(CASES)} programs on {WORLD} ranks in {res.seconds:.1f} s")
    kinds = set()
    for name, prog, d, optimizer, batch in programs:
        stats = [json.loads((d / f"stats.rank{r}.json").read_text()) for r in range(WORLD)]
        predicted = predict_traffic(prog.sharded)
        if batch is prog.inputs:        # the bytes scale with the batch: predicted for the example's
            same, lines = traffic_table(predicted, {}, stats, prog.sharded.call_counts())
            assert same, f"{name}: measured bytes or calls differ from the prediction\n" + "\n".join(lines)
        else:
            assert "B, T = idx.shape" in prog.source and "reshape(B, T, " in prog.source
        kinds |= {k.split(":")[0] for k in predicted}
        o = prog.sharded.overlap
        if name == "gpt_dp4_zero3_prefetch":
            assert "rt.gather_param(" in prog.source and o.regathered, name
            # one flat reduce_scatter per unit (root and each block), not one per weight
            units = set(o.gather_groups.values())
            assert 1 < len(units) < len(o.gather_groups)
            assert prog.sharded.call_counts()["reduce_scatter:dp"] == len(units)
        elif name == "gpt_dp4_small_buckets":
            assert len(o.buckets) > 3 and "rt.GradBuckets(" in prog.source and "rt.copy_to(self." not in prog.source
        elif name == "gpt_dp4_zero2_recompute":
            assert o.scattered() and "zero.reduce_grads(model.grad_buckets.reduced)" in prog.source
        elif name == "gpt_dp2_tp2_microbatches":
            assert "for mb in range(m):" in prog.source and "model.no_sync()" in prog.source and o.buckets
        elif name == "gpt_dp2_tp2_megatron":
            # the input gradients' all_reduce behind the weight gradients: q, k, v together, c_fc
            assert prog.source.count("q, k, v = rt.copy_to_linears(") == prog.source.count("rt.copy_to_linear(") == 2
            assert len(o.async_inputs) == 4 and "rt.copy_to(" not in prog.source and prog.sharded.regions
        elif name == "gpt_dp2_tp2_async_tp":
            # each block's two gathers and two reduce_scatters as collective matmuls
            assert len(o.async_tp) == 8 and prog.sharded.regions
            assert not re.search(r'rt\.(all_gather|reduce_scatter)\(\w+, mesh, "tp"', prog.source)
            # the plain block and the recomputed one's checkpointed function
            assert prog.source.count("q, k, v = rt.all_gather_linears(") == 2
            assert prog.source.count("rt.linear_reduce_scatter(") == 4
        elif name == "mlp_dp4_overlap_off":
            assert not o.buckets and "rt.GradBuckets(" not in prog.source and "rt.copy_to(self." in prog.source
        init, _ = rt.load_init(prog.files["init"])         # written before any reference run
        losses, state = shared_reference(("codegen", name), init, batch, lambda: reference_run(
            prog.model, init, batch, STEPS, optimizer, 1e-3))
        chk = compare(prog, stats, d / "shards", losses, state)
        assert chk.ok, f"{name}: {chk.max_rel_err:.3g} at {chk.worst} {chk.problems}"
    assert kinds >= {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}, kinds


def test_cli_run_check(tmp_path):
    """`autopar run ... --check --timeline` end to end (2 ranks: data parallel MLP, its
    gradients in asynchronous buckets): parity, bytes and calls, each rank's trace, the
    hidden fraction of its gradient communication and the step's tensor memory."""
    plan = tmp_path / "dp.plan"
    plan.write_text('mesh dp=2\nlayout input "x", input "target" { dp: S(0) }\n'
                    'layout output of "net.*" { dp: S(0) }\n')
    out = subprocess.run([sys.executable, "-m", "autopar.cli", "run", "examples/mlp.py:build",
                          "--plan", str(plan), "--backend", "torch", "--steps", "2", "--check",
                          "--timeout", "120", "-o", str(tmp_path / "run"), "--timeline", str(tmp_path / "tl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check: ok max_rel_err=" in out.stdout
    assert "DIFFERENT" not in out.stdout
    prog = next((tmp_path / "run").glob("mlp_dp2_torch.py")).read_text()
    assert "torchrun --nproc-per-node 2" in prog and "rt.GradBuckets(" in prog
    assert "hidden behind compute:" in out.stdout
    # the cost model's predicted schedule beside the measurement: dp's hidden and exposed time
    assert re.search(r"  predicted: dp [\d.]+ [mu]?s hidden, [\d.]+ [mu]?s exposed \(\d+%\)", out.stdout), out.stdout
    for r in range(2):
        trace = json.loads((tmp_path / "tl" / f"rank{r}.trace.json").read_text())
        assert any(e.get("ph") == "X" and "aten::" in e.get("name", "") for e in trace["traceEvents"])
        summary = json.loads((tmp_path / "tl" / f"rank{r}.overlap.json").read_text())
        assert summary["async_collectives"] and 0 <= summary["hidden_fraction"] <= 1
        assert all(c["kind"] == "all_reduce" and c["alone_s"] > 0 for c in summary["async_collectives"])
        # the profiled step's tensor memory: what was alive at its start (parameters, AdamW's
        # state) plus its peak on top, against the plan's predicted memory per device (the
        # cost model counts the same tensors, so not far off: a retained gathered model or
        # activations kept past backward would be)
        mem = summary["memory"]
        assert mem["held_at_start"] > 0 and mem["step_extra"] > 0
        assert mem["peak"] == mem["held_at_start"] + mem["step_extra"]
        predicted = json.loads(next((tmp_path / "run").glob("*.plan.json")).read_text())["cost"]["memory"]["total"]
        assert predicted / 1.5 <= mem["peak"] <= predicted * 1.5, (mem, predicted)
    assert re.search(r"  tensor memory per rank \(held at the step's start \+ its peak on top\): 0: .*; predicted ",
                     out.stdout), out.stdout



def test_moe_example_runs_expert_parallel(tmp_path):
    """examples/moe.py on dp=2,ep=2 (torch; Mixtral covers MPI in test_hf_models): every
    op of the router and its load-balancing loss has a rule (no opaque warning), the
    experts run expert-parallel on ep (two all_to_all each way per layer plus the row
    counts, bytes and calls as predicted), and the run matches the single device."""
    out = subprocess.run([sys.executable, "-m", "autopar.cli", "run", "examples/moe.py:build",
                          "--mesh", "dp=2,ep=2", "--steps", "2", "--check", "--timeout", "120",
                          "-o", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check: ok max_rel_err=" in out.stdout and "DIFFERENT" not in out.stdout, out.stdout
    assert "has no sharding rule" not in out.stderr, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.strip().startswith("all_to_all:ep"))
    assert row[1] == row[2] and row[3] == "ok" and row[-3:] == ["10", "/", "10"], row
    prog = next((tmp_path / "run").glob("moe_dp2_ep2_torch.py")).read_text()
    # the block class is written once: one experts call, on ep; the header counts every call
    assert prog.count("rt.moe_experts(") == 1 and 'mesh, "ep")' in prog
    assert "all_to_all:ep x10" in prog


CRASHER = """
import os, sys, time
rank = int(os.environ.get("RANK", "0"))
print(f"rank {rank} up", flush=True)
if sys.argv[1] == "crash" and rank == 1:
    sys.exit(3)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_launcher_stops_failed_jobs(tmp_path, mode):
    """A crashing rank stops the job at once; a hanging job is killed at the timeout; no
    rank outlives the launcher."""
    from autopar.run import launch
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    t0 = time.monotonic()
    with open(os.devnull, "w") as sink:
        res = launch(script, 3, "torch", [mode], timeout=4, log_dir=tmp_path / "logs", out=sink)
    took = time.monotonic() - t0
    assert not res.ok
    if mode == "crash":
        assert "rank 1 exited with code 3" in res.message and took < 10
    else:
        assert "timed out after 4 s" in res.message and took < 12
    left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
    assert not left, f"orphan ranks: {left}"


def test_compile_function_and_decorator(tmp_path, example):
    """compile() on an instance and as a class decorator, outside a launched job."""
    import warnings

    import torch

    import autopar.compiler
    from plan_helpers import forced_plan
    mlp = example("mlp")
    model, inputs = mlp.build()
    os.environ.pop("RANK", None)
    par = autopar.compile(model, inputs, mesh="dp=2", plan=None)
    assert par.plan.mesh == {"dp": 2}
    assert "graph mlp" in par.ir and "class MLPShard" in par.source
    assert "dp=2" in par.explain()
    cmd = par.emit(tmp_path)
    assert cmd.startswith(f"cd {tmp_path} && OMP_NUM_THREADS=1 torchrun --nproc-per-node 2")
    assert (tmp_path / "mlp_dp2_torch.py").exists() and (tmp_path / "mlp_dp2_torch.plan.json").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = par(*inputs)
        par(*inputs)
    assert torch.equal(loss, model(*inputs))
    assert sum("not inside a launched job" in str(w.message) for w in caught) == 1

    # a forced plan given as an object, and the decorator form
    plan = forced_plan(par.graph, {"dp": 2}, [])

    @autopar.compile(mesh="dp=2", example_inputs=lambda: inputs, plan=plan)
    class Net(mlp.MLP):
        pass
    torch.manual_seed(0)
    net = Net(mlp.MLPConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net(*inputs)
    assert out.shape == () and isinstance(net, mlp.MLP)
    assert net.autopar.plan is plan and "rt.GradBuckets" in net.autopar.source
    assert "dp=2" in net.explain()


def test_a_users_own_loop_around_compile_matches_the_single_device_loop(tmp_path, example):
    """tests/models/user_loop.py on 4 ranks: compile() inside each rank, AdamW over
    par.parameters(), a fresh batch of 8 (twice the example's) each step; the global loss
    par() returns equals the single-device loop's, step for step."""
    import torch

    from autopar.backends.launch import launch
    sys.path.insert(0, str(ROOT / "tests" / "models"))
    import user_loop
    out = tmp_path / "loop.json"
    with open(os.devnull, "w") as sink:
        res = launch(ROOT / "tests" / "models" / "user_loop.py", WORLD, "torch", [str(out)], timeout=300,
                     log_dir=tmp_path / "logs", out=sink)
    assert res.ok, res.message
    got = json.loads(out.read_text())
    gpt = example("gpt")
    model, _ = gpt.build()
    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    want = []
    for idx, targets in user_loop.batches(model.config.vocab_size, len(got["losses"])):
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(loss.item())
    assert got["losses"] == pytest.approx(want, rel=1e-5)
    assert got["zero"] == 0 and got["sharded"]             # the plan shards parameters
    assert got["local_numel"] < sum(p.numel() for p in model.parameters())
    assert "transformer.wte.weight" in got["state_dict"]
