"""`--precision bf16`: fp32 master weights (backends/runtime/precision.py), bf16 programs on
4 ranks against the bf16 single-device run, the bf16 bytes they are planned and predicted
with, and the combinations bf16 refuses.

The multi-rank test launches ONE 4-rank job (`plan_helpers.launch_programs`, as
tests/test_codegen.py does), running each program of the manifest in turn in the same
ranks: the bf16 program, and deliberately wrong ones (a wrong learning rate, bf16 weights
that never follow their masters), so the bf16 tolerance is shown to reject what it must.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORLD = 4
STEPS = 3


# ---- MasterWeights, no processes ------------------------------------------------------------

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale", torch.full((4,), 0.5))

    def forward(self, x):
        return (self.frozen(self.fc(x)) * self.scale).square().mean()


def test_master_weights_step_fp32_and_the_bf16_copies_follow():
    from autopar.backends import runtime as rt
    model = Tiny()
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    masters = rt.MasterWeights(model)
    # the module is bf16 now (integer buffers untouched); masters are exact fp32 copies of
    # the weights before the cast, one per trainable parameter
    assert model.fc.weight.dtype == model.frozen.weight.dtype == model.scale.dtype == torch.bfloat16
    assert model.steps.dtype == torch.int64
    assert [m.dtype for m in masters.params()] == [torch.float32] * 2
    assert torch.equal(masters.params()[0], fp32["fc.weight"])
    assert len(masters.params()) == 2                     # frozen layer: no master
    opt = torch.optim.SGD(masters.params(), lr=0.1)
    x = rt.to_compute(torch.randn(16, 8))
    assert x.dtype == torch.bfloat16 and rt.to_compute(torch.arange(3)).dtype == torch.int64
    model(x).backward()
    bf16_grad = model.fc.weight.grad.clone()
    assert bf16_grad.dtype == torch.bfloat16
    masters.grads_to_masters()
    # the gradient lands on the fp32 master (widened exactly), the bf16 one is released
    master = masters.params()[0]
    assert model.fc.weight.grad is None and master.grad.dtype == torch.float32
    assert torch.equal(master.grad, bf16_grad.float())
    before = master.detach().clone()
    opt.step()
    # the optimizer stepped the fp32 master, not the bf16 weight ...
    assert torch.equal(master.detach(), before - 0.1 * bf16_grad.float())
    assert torch.equal(model.fc.weight.float(), fp32["fc.weight"].bfloat16().float())
    masters.refresh()
    # ... which is rounded from it after the step; an update below bf16's resolution is kept
    # by the master, not lost
    assert torch.equal(model.fc.weight, master.detach().bfloat16())
    assert not torch.equal(master.detach(), model.fc.weight.float())
    # what a rank saves: fp32 masters for trainable parameters, others widened, ints as they are
    state = masters.state_dict()
    assert torch.equal(state["fc.weight"], master.detach())
    assert state["frozen.weight"].dtype == torch.float32 and state["steps"].dtype == torch.int64
    assert torch.equal(state["frozen.weight"], fp32["frozen.weight"].bfloat16().float())


def test_small_updates_accumulate_on_the_masters():
    """Steps of lr * grad below bf16's spacing vanish when stepped in bf16; on fp32 masters
    they add up and reach the bf16 weights (the reason for masters)."""
    from autopar.backends import runtime as rt
    p = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p.weight.fill_(1.0)
    masters = rt.MasterWeights(p)
    for _ in range(64):
        p.weight.grad = torch.full_like(p.weight, 1e-3)
        masters.grads_to_masters()
        with torch.no_grad():
            masters.params()[0].sub_(masters.params()[0].grad)
        masters.refresh()
    # 64 steps of 1e-3 below 1: each under half bf16's spacing at 1 (2^-8 / 2), together 0.064
    assert 1.0 - p.weight.item() > 0.05
    naive = torch.ones((), dtype=torch.bfloat16)
    for _ in range(64):
        naive -= torch.tensor(1e-3, dtype=torch.bfloat16)
    assert naive.item() == 1.0


# ---- one 4-rank job: the bf16 program and deliberately wrong ones ---------------------------

def bf16_program(traced, precision="bf16", **plan_options):
    """GPT on dp=2,tp=2 under Megatron tensor parallelism with sequence parallelism and the
    batch split over dp (bucketed dp gradients): every collective kind on both axes."""
    import plan_helpers
    from autopar.pipeline import build_program
    model, inputs, _, graph = traced("gpt")
    plan = plan_helpers.forced_plan(graph, {"dp": 2, "tp": 2}, plan_helpers.MEGATRON_SP, **plan_options)
    return build_program(model, inputs, {"dp": 2, "tp": 2}, plan=plan, optimizer="adamw",
                         steps=STEPS, name="gpt", graph=graph, precision=precision)


# name -> (extra program arguments, edit of the program's source)
WRONG = {
    "lr_twice": (["--lr", "2e-3"], None),
    # the bf16 weights are never rounded from the stepped masters: every step computes at
    # the initial weights
    "stale_weights": ([], ("masters.refresh()", "pass")),
}


@pytest.fixture(scope="module")
def bf16_job(traced, tmp_path_factory):
    from plan_helpers import launch_programs, program_entry
    tmp = tmp_path_factory.mktemp("bf16")
    prog = bf16_program(traced)
    zero2 = bf16_program(traced, zero=2)
    entries, dirs, progs = [], {}, {}
    for name, (extra, edit) in {"right": ([], None), "zero2": ([], None), **WRONG}.items():
        d = tmp / name
        progs[name] = zero2 if name == "zero2" else prog
        progs[name].write(d)
        if edit is not None:
            src = prog.files["program"].read_text()
            assert src.count(edit[0]) == 1, edit
            prog.files["program"].write_text(src.replace(edit[0], edit[1]))
        dirs[name] = d
        entries.append(program_entry(progs[name], d, STEPS, "adamw", extra))
    launch_programs(tmp, entries, WORLD, "torch")
    stats = {name: [json.loads((d / f"stats.rank{r}.json").read_text()) for r in range(WORLD)]
             for name, d in dirs.items()}
    return progs, dirs, stats


def check_against(prog, stats, shard_dir, precision="bf16", inputs=None, lr=1e-3):
    from autopar.backends import runtime as rt
    from autopar.run import compare, reference_run, tolerance
    init, _ = rt.load_init(prog.files["init"])
    peaks: dict = {}
    losses, state = reference_run(prog.model, init, inputs or prog.inputs, STEPS, "adamw", lr,
                                  grad_peaks=peaks, pieces=prog.graph.pieces, precision=precision)
    return compare(prog, stats, shard_dir, losses, state, grad_peaks=peaks, lr=lr, steps=STEPS,
                   optimizer="adamw", tol=tolerance("bf16"))


def test_bf16_program_matches_the_bf16_single_device_run(bf16_job):
    from autopar.compiler.sharded import predict_traffic
    from autopar.run import traffic_table
    progs, dirs, stats = bf16_job
    prog = progs["right"]
    assert prog.opts.precision == "bf16" and "masters = rt.MasterWeights(model)" in prog.source
    chk = check_against(prog, stats["right"], dirs["right"] / "shards")
    assert chk.ok, f"{chk.max_rel_err:.3g} at {chk.worst} {chk.problems}"
    # measured bytes and calls (every rank, every step) equal the bf16 prediction ...
    predicted = prog.predicted_traffic()
    same, lines = traffic_table(predicted, {}, stats["right"], prog.sharded.call_counts())
    assert same, "\n".join(lines)
    # ... which is half the fp32 program's, but for integer collectives (the loss's token
    # count over dp), which keep their size
    from autopar.compiler.ops import VOCAB_PARALLEL_CE
    from autopar.compiler.sharded import is_collective
    fp32 = predict_traffic(prog.sharded)
    assert set(predicted) == set(fp32) and {"all_reduce:dp", "all_reduce:tp", "all_gather:tp",
                                            "reduce_scatter:tp", "all_to_all:tp"} <= set(fp32)
    ints = {}
    for n in prog.sharded.nodes:
        if is_collective(n) and not n.inputs[0].dtype.is_floating_point:
            for kind, axis, b, _ in prog.sharded.node_traffic(n):
                ints[f"{kind}:{axis}"] = ints.get(f"{kind}:{axis}", 0) + b
    assert sum(ints.values()) <= 64, ints
    # the vocab-parallel loss's statistics are fp32 in every precision: they keep their size too
    for n in prog.sharded.nodes:
        if n.op == VOCAB_PARALLEL_CE:
            for kind, axis, b, _ in prog.sharded.node_traffic(n):
                ints[f"{kind}:{axis}"] = ints.get(f"{kind}:{axis}", 0) + b
    assert all(2 * (predicted[k] - ints.get(k, 0)) == fp32[k] - ints.get(k, 0) for k in fp32), (predicted, fp32)
    print(f"bf16 bytes per step and rank {sum(predicted.values()):,}, fp32 {sum(fp32.values()):,} "
          f"(integer collectives {ints}); max_rel_err {chk.max_rel_err:.3g}")
    # the dp gradients are reduced in buckets, as many calls as under fp32
    assert prog.sharded.overlap.buckets and "rt.GradBuckets(" in prog.source
    # the plan the program was built from counts the same bf16 bytes
    assert prog.plan.cost["bytes"] == predicted


def test_bf16_zero2_shards_fp32_masters(bf16_job):
    """ZeRO-2 under bf16: each rank's optimizer steps fp32 chunks (the masters' shards), the
    gradients are reduce_scattered and the weights all_gathered in bf16; parity with the bf16
    single-device run, bytes and calls as predicted (half of fp32's)."""
    from autopar.compiler.sharded import predict_traffic
    from autopar.run import traffic_table
    progs, dirs, stats = bf16_job
    prog = progs["zero2"]
    assert prog.plan.zero == 2 and "rt.MasterWeights(model, skip=zero.params)" in prog.source
    assert "masters.state_dict(zero.full_masters())" in prog.source
    chk = check_against(prog, stats["zero2"], dirs["zero2"] / "shards")
    assert chk.ok, f"{chk.max_rel_err:.3g} at {chk.worst} {chk.problems}"
    predicted = prog.predicted_traffic()
    same, lines = traffic_table(predicted, {}, stats["zero2"], prog.sharded.call_counts())
    assert same, "\n".join(lines)
    fp32 = predict_traffic(prog.sharded)
    for k in ("all_gather:dp", "reduce_scatter:dp"):
        assert fp32[k] > 0 and 2 * predicted[k] == fp32[k], (k, predicted, fp32)
    print(f"zero2 bf16: max_rel_err {chk.max_rel_err:.3g}; all_gather:dp {predicted['all_gather:dp']:,} "
          f"(fp32 {fp32['all_gather:dp']:,})")


def test_bf16_tolerance_rejects_wrong_programs(bf16_job):
    """The bf16 check is not vacuous: a wrong learning rate, weights that never follow their
    masters, or a reference that skipped the dp gradient reduction (each dp rank trained on
    its half of the batch alone) all fail it, by more than the right program's error."""
    from autopar.run import BF16_TOLERANCE
    progs, dirs, stats = bf16_job
    prog = progs["right"]
    right = check_against(prog, stats["right"], dirs["right"] / "shards").max_rel_err
    for name in WRONG:
        chk = check_against(prog, stats[name], dirs[name] / "shards")
        assert not chk.ok and chk.max_rel_err > 2 * BF16_TOLERANCE, (name, chk.max_rel_err, chk.worst)
        print(f"{name}: max_rel_err {chk.max_rel_err:.3g} ({chk.worst}); right program {right:.3g}")
    half = tuple(t.chunk(2, 0)[0] for t in prog.inputs)
    chk = check_against(prog, stats["right"], dirs["right"] / "shards", inputs=half)
    assert not chk.ok, chk.max_rel_err
    print(f"no dp reduction: max_rel_err {chk.max_rel_err:.3g} ({chk.worst})")




def test_mpi_bf16_program_reduces_in_bf16(traced, tmp_path, capsys):
    """The MPI backend runs bf16 programs too: MPI has no bfloat16 datatype, so bf16 buffers
    travel as 16-bit integers and are summed by a user-defined op (fp32 add, rounded to bf16):
    the same Megatron plan with sequence parallelism (all_reduce, all_gather, reduce_scatter
    and all_to_all on tp, the bucketed gradients on dp), `run --check` ok against the bf16
    single device, every collective's bytes the bf16 prediction, half the fp32 program's."""
    from autopar.cli import main
    from autopar.compiler.sharded import predict_traffic
    prog = bf16_program(traced)
    prog.write(tmp_path)
    gpt = str(ROOT / "examples" / "gpt.py") + ":build"
    rc = main(["run", gpt, "--plan", str(prog.files["plan"]), "--backend", "mpi", "--precision", "bf16",
               "--steps", str(STEPS), "--check"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[-1].startswith("check: ok"), out[-3000:]
    assert "bf16 program" in out and "(4 ranks, mpi)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith("  ") and ":" in line.split()[0] and line.split()[0].split(":")[1] in ("dp", "tp")}
    assert {"all_reduce:dp", "all_reduce:tp", "all_gather:tp", "reduce_scatter:tp", "all_to_all:tp"} <= set(rows), rows
    assert all(r[3] == "ok" for r in rows.values()), rows
    fp32 = predict_traffic(prog.sharded)
    for kind in ("all_gather:tp", "reduce_scatter:tp", "all_to_all:tp"):
        assert 2 * int(rows[kind][2].replace(",", "")) == fp32[kind], (kind, rows[kind], fp32[kind])


# ---- the plan's precision is the program's; refusals --------------------------------------------

@pytest.fixture(scope="module")
def h100_programs(traced):
    """The search's programs for GPT on dp=2,tp=2 with the h100 profile under 1.5 MB per
    device: by default (bf16, the profile's mixed recipe) and with --precision fp32."""
    from autopar.pipeline import build_program
    model, inputs, _, graph = traced("gpt")
    return {prec: build_program(model, inputs, "dp=2,tp=2", device="h100", memory="1.5MB", steps=STEPS,
                                name="gpt", precision=prec) for prec in (None, "fp32")}


def test_mixed_profiles_default_to_bf16_planned_as_run(h100_programs):
    bf16, fp32 = h100_programs[None], h100_programs["fp32"]
    assert bf16.opts.precision == "bf16" and bf16.plan.cost["precision"] == "mixed"
    assert fp32.opts.precision == "fp32" and fp32.plan.cost["precision"] == "fp32"
    assert "masters = rt.MasterWeights(model)" in bf16.source and "MasterWeights" not in fp32.source
    # the plan's bytes are the program's bytes, under either precision
    assert bf16.plan.cost["bytes"] == bf16.predicted_traffic()
    assert fp32.plan.cost["bytes"] == fp32.predicted_traffic()


def test_bf16_plan_without_dp_reduction_is_the_cheaper_plan(h100_programs, traced):
    """Why a bf16 plan of GPT on dp=2,tp=2 under 1.5 MB has no gradient all_reduce over dp:
    it replicates the batch over dp (dp's ranks compute the same), which fits only with the
    blocks recomputed -- the search tries recompute because the best plan without it needs
    98% of the limit -- and is then faster than splitting the batch. The choice is the
    search's, not a lost reduction."""
    from autopar.compiler.cluster import Cluster, load_profile
    from autopar.compiler.cost import CostModel
    bf16, fp32 = h100_programs[None], h100_programs["fp32"]
    g = bf16.graph
    dp = list(bf16.plan.mesh).index("dp")
    assert not any(s[dp] is not None for s in bf16.plan.strategies.values())
    assert [r["axis"] for r in bf16.plan.solver["idle_axes"]] == ["dp"]
    assert not any(k.endswith(":dp") for k in bf16.predicted_traffic())
    assert bf16.plan.recompute and fp32.plan.recompute

    def cost(plan, recipe, recompute):
        cm = CostModel(g, Cluster(dict(plan.mesh), load_profile("h100")), precision=recipe,
                       recompute=recompute, dp_axis=plan.dp_axis, overlap=plan.overlap)
        return cm.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)
    assert cost(bf16.plan, "mixed", ()).memory["total"] > 1.5e6 >= \
        cost(bf16.plan, "mixed", bf16.plan.recompute).memory["total"]
    assert bf16.plan.solver["recompute_search"]["tried_because"].startswith("the plan without recompute needs")
    assert (cost(bf16.plan, "mixed", bf16.plan.recompute).step_time
            <= cost(fp32.plan, "mixed", fp32.plan.recompute).step_time)


def test_a_given_plan_runs_in_the_precision_it_was_priced_in(h100_programs, tmp_path):
    from autopar.pipeline import build_program, precision_lines
    bf16 = h100_programs[None]
    bf16.write(tmp_path)
    saved = bf16.files["plan"]
    again = build_program(bf16.model, bf16.inputs, plan=saved, name="gpt", graph=bf16.graph)
    assert again.opts.precision == "bf16" and not precision_lines(again.plan, "bf16")
    # the MPI backend runs the plan's bf16 as well; fp32 asked for runs fp32 and says what the
    # plan priced
    mpi = build_program(bf16.model, bf16.inputs, plan=saved, backend="mpi", name="gpt", graph=bf16.graph)
    assert mpi.opts.precision == "bf16" and not precision_lines(mpi.plan, "bf16")
    prog = build_program(bf16.model, bf16.inputs, plan=saved, precision="fp32", name="gpt", graph=bf16.graph)
    assert prog.opts.precision == "fp32"
    note = precision_lines(prog.plan, "fp32")
    assert len(note) == 1 and "priced for bf16" in note[0] and "--precision bf16" in note[0]


def test_where_the_search_picks_zero3_bf16_stays_below_it(traced):
    """GPT on dp=4 with the h100 profile under 1.2 MB: the mixed-recipe search picks ZeRO-3,
    which bf16 programs do not run; the best plan of ZeRO-0..2 fits and runs bf16 (asked for
    or by default). A given ZeRO-3 plan runs fp32 by default and is refused under bf16."""
    from autopar.pipeline import build_program, make_plan
    model, inputs, _, graph = traced("gpt")
    mixed, _ = make_plan(graph, "dp=4", device="h100", memory="1.2MB", deterministic=True, precision="mixed")
    assert mixed.zero == 3
    for prec in ("bf16", None):
        bf16 = build_program(model, inputs, "dp=4", device="h100", memory="1.2MB", precision=prec,
                             name="gpt", graph=graph)
        assert bf16.opts.precision == "bf16" and bf16.plan.zero == 2 and bf16.plan.cost["precision"] == "mixed"
    import plan_helpers
    from autopar.compiler.errors import InputError
    zero3 = plan_helpers.forced_plan(graph, {"dp": 4}, plan_helpers.DDP, zero3=True)
    default = build_program(model, inputs, plan=zero3, device="h100", name="gpt", graph=graph)
    assert default.opts.precision == "fp32" and default.plan.zero == 3 and "MasterWeights" not in default.source
    with pytest.raises(InputError, match="--precision bf16 with ZeRO-3"):
        build_program(model, inputs, plan=zero3, device="h100", precision="bf16", name="gpt", graph=graph)


def test_bf16_refusals_name_the_flag_and_the_way_out(traced):
    from autopar.compiler.errors import InputError
    import plan_helpers
    from autopar.pipeline import build_program
    model, inputs, _, graph = traced("gpt")
    plan = plan_helpers.forced_plan(graph, {"dp": 2, "tp": 2}, plan_helpers.MEGATRON_SP)
    with pytest.raises(InputError, match=r"--precision fp16: use fp32 or bf16"):
        build_program(model, inputs, plan=plan, precision="fp16", name="gpt", graph=graph)
    with pytest.raises(InputError, match=r"--precision bf16 with ZeRO-3.*zero 2.*--precision fp32"):
        bf16_program(traced, zero3=True)


def test_bf16_pipeline_steps_each_stages_masters(capsys):
    """pp=2 with 4 microbatches under bf16 (1F1B): each stage keeps fp32 masters of its own
    parameters; --check ok against the bf16 single device; every stage's sends, receives and
    tied all_reduce measured as predicted, half of what the fp32 program sends."""
    from autopar.cli import main
    gpt = str(ROOT / "examples" / "gpt.py") + ":build"
    rows = {}
    for precision in ("bf16", "fp32"):
        assert main(["run", gpt, "--mesh", "pp=2", "--microbatches", "4", "--schedule", "1f1b",
                     "--precision", precision, "--steps", str(STEPS), "--check"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[-1].startswith("check: ok") and f"{precision} program" in out, out[-3000:]
        stage, got = None, {}
        for line in out.splitlines():
            if line.startswith("stage "):
                stage = int(line.split()[1])
            elif stage is not None and line.startswith("    ") and ":pp" in line:
                f = line.split()
                assert f[3] == "ok", line
                got[(stage, f[0])] = int(f[1].replace(",", ""))
        rows[precision] = got
    assert set(rows["bf16"]) == set(rows["fp32"]) == {(k, f"{kind}:pp") for k in (0, 1)
                                                       for kind in ("send", "recv", "all_reduce")}
    assert all(2 * rows["bf16"][k] == rows["fp32"][k] for k in rows["fp32"]), rows
