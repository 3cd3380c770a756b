"""Pipeline parallelism over a pp mesh axis: stage cutting (balanced, at block boundaries,
refusals), the generated program's pipeline parts, and multi-rank launches with PyTorch's
GPipe and 1F1B schedules and with the MPI backend's (parity with one device, send/recv
bytes predicted == measured)."""
from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stdout

import pytest

from autopar.compiler.errors import InputError
from autopar.compiler.stages import balanced_ranges, cut_stages

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def gpt4():
    """A 4-block GPT, traced with symbolic sizes as `autopar emit/run` trace it."""
    from autopar.pipeline import prepared_graph
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from conftest import load_example
    gpt = load_example("gpt")
    cfg = gpt.GPTConfig(block_size=32, vocab_size=128, n_layer=4, n_head=4, n_embd=64)
    model, inputs = gpt.build(cfg)
    return model, inputs, prepared_graph(model, inputs, "gpt", symbolic=True)


def test_balanced_ranges_minimise_the_largest_stage():
    assert balanced_ranges([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    # a heavy last block (the loss head counted with it) moves the cut forward
    assert balanced_ranges([1, 1, 1, 3], 2) == [(0, 3), (3, 4)]
    assert balanced_ranges([5, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert balanced_ranges([1, 2, 3, 4, 5], 3) == [(0, 3), (3, 4), (4, 5)]
    # pinned stages keep their ranges; the others are balanced over the blocks between
    assert balanced_ranges([1, 1, 1, 1, 1], 3, pinned={0: (0, 1)}) == [(0, 1), (1, 3), (3, 5)]
    assert balanced_ranges([1, 1, 1, 1, 1], 3, pinned={1: (1, 4)}) == [(0, 1), (1, 4), (4, 5)]
    assert balanced_ranges([1, 1, 1, 1], 2, pinned={0: (0, 3), 1: (3, 4)}) == [(0, 3), (3, 4)]
    with pytest.raises(InputError, match="every stage needs at least one block"):
        balanced_ranges([1, 1], 2, pinned={0: (0, 2)})


def test_stages_cut_at_block_boundaries_with_embedding_first_and_head_last(gpt4):
    _, _, g = gpt4
    stages = cut_stages(g, 2, lambda i: 1.0)
    assert [s.blocks for s in stages] == [(0, 2), (2, 4)]
    assert stages[0].modules[:2] == ["transformer.wte", "transformer.wpe"]
    assert "lm_head" in stages[1].modules and "transformer.ln_f" in stages[1].modules
    # every node in exactly one stage; a block's nodes all in one
    seen = sorted(i for s in stages for i in s.nodes)
    assert seen == list(range(len(g.nodes)))
    for s in stages:
        for i in s.nodes:
            m = g.nodes[i].meta.module
            if m.startswith("transformer.h."):
                assert s.blocks[0] <= int(m.split(".")[2]) < s.blocks[1]
    # the tied embedding / head weight is held by both ends
    assert "transformer.wte.weight" in stages[0].params and "transformer.wte.weight" in stages[1].params


def test_stages_balance_by_node_time(gpt4):
    _, _, g = gpt4
    # make everything before block 1 costly: stage 0 gets block 0 alone
    heavy = {i for i, n in enumerate(g.nodes) if not n.meta.module.startswith("transformer.h.")
             and i < 5}
    stages = cut_stages(g, 2, lambda i: 100.0 if i in heavy else 1.0)
    assert stages[0].blocks == (0, 1)


def test_more_stages_than_blocks_is_refused(gpt4):
    _, _, g = gpt4
    with pytest.raises(InputError, match="more stages than blocks.*4 blocks"):
        cut_stages(g, 5, lambda i: 1.0)


def test_a_model_without_blocks_is_refused():
    import torch
    from autopar.pipeline import prepared_graph

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.b(torch.relu(self.a(x))), y)
    g = prepared_graph(TwoLayers(), (torch.randn(4, 8), torch.randn(4, 1)), "two")
    with pytest.raises(InputError, match="no module list of repeated blocks"):
        cut_stages(g, 2, lambda i: 1.0)


def test_program_has_stage_methods_header_and_schedule(gpt4):
    from autopar.pipeline import build_program
    model, inputs, g = gpt4
    prog = build_program(model, inputs, "pp=2", name="gpt", graph=g, microbatches=4, schedule="gpipe")
    src = prog.source
    assert prog.plan.pipeline["ranges"] in ([[0, 2], [2, 4]], [[0, 1], [1, 4]], [[0, 3], [3, 4]])
    header = src.split('"""')[1]
    assert "pipeline: 2 stages over pp" in header and "schedule gpipe, 4 microbatches" in header
    assert re.search(r"stage 0: transformer\.h\.\d(-\d)?; owns transformer\.wte, transformer\.wpe", header)
    assert "sends x to stage 1: 8 KiB per microbatch" in header
    assert "bubble (p-1)/m = 0.25" in header
    assert "def stage0(self, idx):" in src and "def stage1(self, x):" in src
    assert "def loss(self, " in src and "def forward(" not in src.split("class GPT")[1].split("def main")[0].replace("def forward(self, x):", "")
    assert "rt.PipelineStageOf(" in src and "rt.pipeline_schedule(args.schedule" in src
    assert "TIED = {'transformer.wte.weight': [0, 1]}" in src
    compile(src, "program.py", "exec")


def _simulate(name, p, m, v=1):
    """Run every rank's `schedule_order` against each other with sends that never block (as
    MpiSchedule's Isends), one action per rank and round: an action runs once what it
    receives was sent in an earlier round. Returns the rounds taken (the makespan in units of
    one chunk's forward or backward), or fails on a deadlock (a round where no rank moves)."""
    from autopar.backends.runtime.pipeline import schedule_order
    orders = {r: schedule_order(name, r, p, m, v) for r in range(p)}
    last = p * v - 1
    done, pos, rounds = set(), {r: 0 for r in range(p)}, 0
    while any(pos[r] < len(orders[r]) for r in range(p)):
        moved, before = False, set(done)
        for r in range(p):
            if pos[r] < len(orders[r]):
                kind, k, i = orders[r][pos[r]]
                j = r + k * p
                need = [("F", j - 1, i)] if kind == "F" and j > 0 else []
                if kind == "B":
                    need = [("F", j, i)] + ([("B", j + 1, i)] if j < last else [])
                if all(n in before for n in need):
                    done.add((kind, j, i))
                    pos[r] += 1
                    moved = True
        assert moved, f"{name} p={p} m={m} v={v} deadlocks at {pos}"
        rounds += 1
    assert len(done) == 2 * m * p * v
    return rounds


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3)])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 2), (3, 5), (4, 8), (2, 6)])
def test_schedule_orders_run_each_microbatch_once_without_deadlock(name, v, p, m):
    from autopar.backends.runtime.pipeline import schedule_order
    if name == "interleaved" and m % max(1, m // p):
        pytest.skip("PyTorch's interleaved rounds do not divide this microbatch count (refused by the plan)")
    for stage in range(p):
        order = schedule_order(name, stage, p, m, v)
        want = [(kind, k, i) for kind in "FB" for k in range(v) for i in range(m)]
        assert sorted(order) == sorted(want)
        live, most = set(), 0
        for kind, k, i in order:
            if kind == "F":
                live.add((k, i))
            else:
                assert (k, i) in live, (stage, order)      # a backward after its forward
                live.remove((k, i))
            most = max(most, len(live))
        if name == "gpipe":
            assert most == m                                # GPipe holds every microbatch
        elif name == "1f1b":
            assert most == min(p - stage, m)                # 1F1B the stages from this one on
        else:                                               # the plan's in-flight price
            from autopar.compiler.stages import in_flight
            assert most / v == in_flight("interleaved", stage, p, m, v)
    _simulate(name, p, m, v)


def test_interleaving_shortens_the_simulated_pipeline():
    """4 ranks x 8 microbatches: 1F1B's step is 2m slots of work plus 2(p-1) idle; with 2
    chunks per rank a slot is half a stage's work, and the step is shorter than 1F1B's
    (counted in the same half-stage units) by about half the bubble."""
    full = _simulate("1f1b", 4, 8)
    half = _simulate("interleaved", 4, 8, 2)
    assert full == 2 * 8 + 2 * 3
    assert half == 2 * 2 * 8 + 2 * 3       # all the work, and half 1F1B's idle (2 x 6 halves)


def test_mpi_program_runs_the_pipeline_with_mpi_stages(gpt4):
    from autopar.pipeline import build_program
    model, inputs, g = gpt4
    prog = build_program(model, inputs, "pp=2", backend="mpi", name="gpt", graph=g, microbatches=2)
    src = prog.source
    assert 'rt.init_mesh(MESH, backend="mpi"' in src and "rt.PipelineStageOf(" in src
    assert "Isend/Irecv over pp" in src
    compile(src, "program.py", "exec")


def _run(argv):
    from autopar.cli import main
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _table(out, k):
    return out.split(f"stage {k} (pp={k}")[1].split("\nstage")[0].split("job:")[0]


def _row(out, k, kind, nbytes=None, calls=None):
    """Stage k's row `kind` (e.g. send:pp) is ok: predicted == measured == `nbytes` (any
    bytes if None), with `calls` predicted and measured calls when given."""
    part = _table(out, k)
    b = f"{nbytes:,}" if nbytes is not None else r"[\d,]+"
    pattern = rf"{kind}\s+{b}\s+{b}\s+ok" + (rf".*{calls} / {calls}" if calls is not None else "")
    assert re.search(pattern, part), part


def _boundary_bytes(out, k) -> int:
    """What stage k of examples/plans/pipeline_gpt.plan sends over pp per step: 2 microbatches
    of the (2, 32, 64) fp32 residual stream, whole (32 KiB) or split over tp=2 (16 KiB)."""
    m = re.search(r"send:pp\s+([\d,]+)", _table(out, k))
    assert m, _table(out, k)
    sent = int(m[1].replace(",", ""))
    assert sent in (32_768, 32_768 // 2), sent
    return sent


def test_pp2_gpipe_launch_matches_one_device_and_predicted_bytes():
    rc, out = _run(["run", "examples/gpt.py:build", "--mesh", "pp=2", "--microbatches", "4",
                    "--schedule", "gpipe", "--steps", "3", "--check"])
    assert rc == 0, out
    assert "check: ok" in out
    # each stage's send/recv: 4 microbatches of (1, 32, 64) fp32 = 8 KiB, both directions;
    # the tied embedding / head gradient (128 x 64 fp32) all_reduced over the two stages
    for k in (0, 1):
        _row(out, k, "send:pp", 32_768, 4)
        _row(out, k, "recv:pp", 32_768, 4)
        _row(out, k, "all_reduce:pp", 32_768)


def test_pp4_1f1b_launch_middle_stages_send_both_ways():
    """4 stages of a 4-block GPT under 1F1B: the middle stages receive from and send to both
    neighbours (twice the ends' bytes); the tied weight's all_reduce runs on stages 0 and 3 only."""
    rc, out = _run(["run", "tests/models/gpt_layers.py:four", "--mesh", "pp=4", "--microbatches", "4",
                    "--schedule", "1f1b", "--steps", "2", "--check"])
    assert rc == 0, out
    assert "check: ok" in out
    for k in (0, 3):
        _row(out, k, "send:pp", 32_768, 4)
        _row(out, k, "all_reduce:pp", 32_768)
    for k in (1, 2):
        part = _table(out, k)
        _row(out, k, "send:pp", 65_536, 8)
        _row(out, k, "recv:pp", 65_536, 8)
        assert "all_reduce:pp" not in part


def test_mpi_pp2_tp2_plan_file_launch_matches_one_device():
    """examples/plans/pipeline_gpt.plan under MPI: Megatron tp=2 inside each of 2 stages and
    1F1B over 2 microbatches, activations and gradients by Isend/Irecv: parity, and every
    row (tp collectives, send/recv, the tied all_reduce) as predicted per stage."""
    rc, out = _run(["run", "examples/gpt.py:build", "--plan", "examples/plans/pipeline_gpt.plan",
                    "--backend", "mpi", "--steps", "2", "--check"])
    assert rc == 0, out
    assert "(4 ranks, mpi)" in out and "check: ok" in out
    for k in (0, 1):
        _row(out, k, "all_reduce:tp", None)
        sent = _boundary_bytes(out, k)
        _row(out, k, "send:pp", sent, 2)
        _row(out, k, "recv:pp", sent, 2)
        _row(out, k, "all_reduce:pp", 32_768)


def test_pp4_interleaved_launch_on_eight_blocks_matches_one_device():
    """An 8-block GPT over pp=4 with PyTorch's ScheduleInterleaved1F1B, 2 chunks per rank:
    chunk j on rank j mod 4, so rank 3's first chunk sends on to rank 0. Ranks 1 and 2 send
    4 crossings per microbatch (two chunks, forward and back); rank 0 three (chunk 0 sends no
    gradient back), rank 3 three (chunk 7 feeds the loss)."""
    rc, out = _run(["run", "tests/models/gpt_layers.py:eight", "--mesh", "pp=4", "--microbatches", "4",
                    "--schedule", "interleaved:2", "--steps", "2", "--check"])
    assert rc == 0, out
    assert "check: ok" in out
    # (2, 32, 64) fp32 = 16 KiB per microbatch and crossing
    for k in (1, 2):
        part = _table(out, k)
        _row(out, k, "send:pp", 262_144, 16)
        _row(out, k, "recv:pp", 262_144, 16)
        assert "all_reduce:pp" not in part
    for k in (0, 3):
        _row(out, k, "send:pp", 196_608, 12)
        _row(out, k, "all_reduce:pp", 32_768)


def test_mpi_pp2_interleaved_launch_matches_one_device():
    rc, out = _run(["run", "tests/models/gpt_layers.py:four", "--mesh", "pp=2", "--microbatches", "4",
                    "--schedule", "interleaved", "--backend", "mpi", "--steps", "2", "--check"])
    assert rc == 0, out
    assert "(2 ranks, mpi)" in out and "check: ok" in out
    for k in (0, 1):
        # 3 crossings of 4 chunks: rank 0 sends 2 (chunk 0, 2) forward + 1 back (chunk 2)
        _row(out, k, "send:pp", 98_304, 12)


def test_mpi_pp4_gpipe_bf16_launch_matches_one_device():
    """4 stages under MPI's GPipe in bf16: the middle stages send both ways (twice the ends'
    bytes, half of fp32's), the tied weight's all_reduce runs on stages 0 and 3 only."""
    rc, out = _run(["run", "tests/models/gpt_layers.py:four", "--mesh", "pp=4", "--microbatches", "4",
                    "--schedule", "gpipe", "--backend", "mpi", "--precision", "bf16", "--steps", "2",
                    "--check"])
    assert rc == 0, out
    assert "(4 ranks, mpi)" in out and "check: ok" in out
    for k in (0, 3):
        _row(out, k, "send:pp", 16_384, 4)
        _row(out, k, "all_reduce:pp", 16_384)
    for k in (1, 2):
        part = _table(out, k)
        _row(out, k, "send:pp", 32_768, 8)
        _row(out, k, "recv:pp", 32_768, 8)
        assert "all_reduce:pp" not in part


# ---- plan files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2(traced):
    return traced("gpt")[3]


def test_plan_file_schedule_reaches_the_plan(gpt2):
    from autopar.dsl import parse_plan, resolve, search_with, write_plan
    text = "mesh pp=2, dp=2\npipeline microbatches 2, schedule gpipe\n"
    spec = resolve(parse_plan(text), gpt2)
    assert (spec.microbatches, spec.schedule, spec.mesh) == (2, "gpipe", {"pp": 2, "dp": 2})
    assert "pipeline microbatches 2, schedule gpipe" in spec.format()
    plan = search_with(spec, gpt2, deterministic=True, time_limit=3)
    assert plan.pipeline["schedule"] == "gpipe" and plan.pipeline["ranges"] == [[0, 1], [1, 2]]
    assert plan.mesh == {"pp": 2, "dp": 2}
    assert all(s[0] is None for s in plan.strategies.values())          # nothing split over pp
    assert all(lay[0] == "R" for lay in plan.layouts.values())
    assert "pipeline microbatches 2, schedule gpipe" in write_plan(plan, gpt2)


def test_plan_file_interleaved_schedule_reaches_the_plan():
    from autopar.dsl import parse_plan, resolve, search_with, write_plan
    from autopar.pipeline import prepared_graph
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
    import gpt_layers
    model, inputs = gpt_layers.four()
    g = prepared_graph(model, inputs, "gpt_layers")
    text = "mesh pp=2\npipeline microbatches 2, schedule interleaved 2\n"
    spec = resolve(parse_plan(text), g)
    assert spec.schedule == "interleaved:2"
    assert "pipeline microbatches 2, schedule interleaved 2" in spec.format()
    plan = search_with(spec, g, deterministic=True, time_limit=3)
    assert plan.pipeline["schedule"] == "interleaved" and plan.pipeline["virtual"] == 2
    assert len(plan.pipeline["ranges"]) == 4
    assert "pipeline microbatches 2, schedule interleaved 2" in write_plan(plan, g)


@pytest.mark.parametrize("text,cls,where,words", [
    # a schedule needs a pp axis: points at the schedule
    ("mesh dp=2\npipeline microbatches 2, schedule 1f1b\n", "NoPipelineStages", "2:26", "has none"),
    # more stages than the two blocks: points at the mesh's pp axis
    ("mesh dp=1, pp=3\npipeline microbatches 2, schedule 1f1b\n", "NoPipelineStages", "1:12",
     "more stages than blocks"),
    # M must divide the batch of 4
    ("mesh pp=2\npipeline microbatches 3, schedule gpipe\n", "BadMicrobatches", "2:23", "does not divide"),
    ("mesh pp=2\npipeline microbatches 2, schedule zerobubble\n", "NoPipelineStages", "2:26",
     "zero-bubble schedules are not"),
    ("mesh pp=2\npipeline microbatches 2, schedule interleaved 1\n", "NoPipelineStages", "2:26",
     "interleaved 1F1B with V"),
])
def test_plan_file_pipeline_errors_name_file_line_column(gpt2, text, cls, where, words):
    from autopar.dsl import errors as E
    from autopar.dsl import parse_plan, resolve
    with pytest.raises(getattr(E, cls)) as info:
        resolve(parse_plan(text), gpt2)
    msg = str(info.value)
    assert f"<string>:{where}" in msg and words in msg, msg


def test_plan_file_stage_pins_fix_the_cut(gpt4):
    """`stage` pins give exactly the pinned ranges; unpinned stages are balanced around them,
    and the explanation, the normalised file and write_plan say which stages were pinned."""
    from autopar.compiler.stages import pipeline_lines
    from autopar.dsl import parse_plan, resolve, search_with, write_plan
    _, _, g = gpt4
    # both stages pinned, against the balanced cut ([0, 2], [2, 4] on four equal blocks)
    spec = resolve(parse_plan('mesh pp=2\nstage 0 "transformer.h.[0-2]"\nstage 1 "transformer.h.3"\n'), g)
    assert spec.stages == {0: (0, 3), 1: (3, 4)}
    plan = search_with(spec, g, deterministic=True, time_limit=3)
    assert plan.pipeline["ranges"] == [[0, 3], [3, 4]] and plan.pipeline["pinned"] == [0, 1]
    # stage 0 alone pinned on pp=3: stages 1 and 2 balanced over blocks 1..3
    text = 'mesh pp=3\npipeline microbatches 2, schedule 1f1b\nstage 0 "transformer.h.0"\n'
    spec = resolve(parse_plan(text), g)
    assert spec.stage_ranges() == [(0, 1), None, None]
    assert 'stage 0 "transformer.h.0"\n' in spec.format()
    plan = search_with(spec, g, deterministic=True, time_limit=3)
    ranges = plan.pipeline["ranges"]
    assert ranges[0] == [0, 1] and ranges[1][0] == 1 and ranges[2][1] == 4 and ranges[1][1] == ranges[2][0]
    assert plan.pipeline["pinned"] == [0]
    lines = "\n".join(pipeline_lines(plan.cost["pipeline"]))
    assert "stage 0 (transformer.h.0, pinned):" in lines, lines
    assert re.search(r"stage 1 \(transformer\.h\.1(-\d)?, balanced\):", lines), lines
    written = write_plan(plan, g)
    assert '\nstage 0 "transformer.h.0"\n' in written and "stage 1" not in written
    assert resolve(parse_plan(written), g).stages == {0: (0, 1)}


@pytest.mark.parametrize("text,cls,where,words", [
    ('mesh dp=2\nstage 0 "transformer.h.0"\n', "StageWithoutPp", "2:1", "has no pp axis"),
    ('mesh pp=2\nstage 2 "transformer.h.0"\n', "StageOutOfRange", "2:7", "has stages 0 to 1"),
    ('mesh pp=2\nstage 0 "transformer.h.9"\n', "UnknownModule", "2:9", 'did you mean "transformer.h.'),
    ('mesh pp=2\nstage 0 "lm_head"\n', "StageNotABlock", "2:9", "not a block of transformer.h"),
    ('mesh pp=2\nstage 0 "transformer.h.0.attn"\n', "StageSplitsBlock", "2:9",
     "part of block transformer.h.0"),
    ('mesh pp=2\nstage 0 "transformer.h.0", "transformer.h.2"\n', "StageNotContiguous", "2:28",
     "but not transformer.h.1"),
    ('mesh pp=2\nstage 0 "transformer.h.2"\nstage 1 "transformer.h.0"\n', "StagesOutOfOrder", "3:1",
     "before stage 0's transformer.h.2"),
    ('mesh pp=2\nstage 0 "transformer.h.[0-1]"\nstage 1 "transformer.h.1"\n', "StageOverlap", "3:9",
     "pinned to stage 1 here and to stage 0 at <string>:2:9"),
    ('mesh pp=2\nstage 0 "transformer.h.[0-1]"\nstage 1 "transformer.h.3"\n', "StageGap", "3:1",
     "transformer.h.2 would run on no stage"),
    ('mesh pp=2\nstage 0 "transformer.h.1"\n', "StageGap", "2:1", "lies before stage 0"),
    ('mesh pp=3\nstage 0 "transformer.h.[0-1]"\nstage 2 "transformer.h.[2-3]"\n', "EmptyStage", "3:1",
     "stage 1 would have no block"),
    ('mesh pp=5\nstage 0 "transformer.h.0"\n', "NoPipelineStages", "1:6", "more stages than blocks"),
])
def test_plan_file_stage_pin_errors_name_file_line_column(gpt4, text, cls, where, words):
    from autopar.dsl import errors as E
    from autopar.dsl import parse_plan, resolve
    with pytest.raises(getattr(E, cls)) as info:
        resolve(parse_plan(text), gpt4[2])
    msg = str(info.value)
    assert f"<string>:{where}: {cls}:" in msg and words in msg, msg
    assert "\n  fix: " in msg


def test_pp2_stage_pin_launch_runs_the_pinned_cut(tmp_path):
    """A plan file pinning the first of four blocks to stage 0: the program runs that cut
    (its header says so) and matches the single-device run."""
    import json
    plan = tmp_path / "pinned.plan"
    plan.write_text('mesh pp=2\npipeline microbatches 2, schedule 1f1b\nstage 0 "transformer.h.0"\n')
    rc, out = _run(["run", "tests/models/gpt_layers.py:four", "--plan", str(plan), "--steps", "2",
                    "--check", "-o", str(tmp_path / "prog")])
    assert rc == 0, out
    assert "check: ok" in out
    saved = json.loads(next((tmp_path / "prog").glob("*.plan.json")).read_text())
    assert saved["pipeline"]["ranges"] == [[0, 1], [1, 4]] and saved["pipeline"]["pinned"] == [0]
    src = next((tmp_path / "prog").glob("*.py")).read_text()
    assert "stage 0: transformer.h.0 (pinned by the plan file); owns" in src
    assert "stage 1: transformer.h.1-3; owns" in src


def test_pp2_tp2_plan_file_launch_matches_one_device():
    """examples/plans/pipeline_gpt.plan: 2 stages x Megatron tp=2 inside each, 1F1B over 2
    microbatches: the intra-stage collectives over tp and the pipeline's send/recv over pp
    are both as predicted, per stage."""
    rc, out = _run(["run", "examples/gpt.py:build", "--plan", "examples/plans/pipeline_gpt.plan",
                    "--steps", "2", "--check"])
    assert rc == 0, out
    assert "check: ok" in out
    for k in (0, 1):
        _row(out, k, "all_reduce:tp", None)
        # 2 microbatches of (2, 32, 64) fp32 = 16 KiB each, or half of it per rank where the
        # search keeps the residual stream sequence-parallel over tp
        _row(out, k, "send:pp", _boundary_bytes(out, k), 2)


# ---- the cost model ---------------------------------------------------------------------------------

def _priced(g, schedule, m, p=2):
    from autopar.compiler.cluster import load_profile
    from autopar.compiler.stages import pipeline_plan, price_pipeline
    from autopar.passes.shard import search
    prof = load_profile("h100")
    plan = pipeline_plan(g, {"pp": p}, lambda gg, mm, **kw: search(gg, mm, prof, deterministic=True,
                                                                  precision="fp32", **kw),
                         prof, schedule=schedule)
    plan.microbatches = m
    return plan, price_pipeline(plan, g, prof)


def test_bubble_and_in_flight_activations_are_priced(gpt4):
    _, _, g = gpt4
    plan1, c1 = _priced(g, "1f1b", 1)
    plan4, c4 = _priced(g, "1f1b", 4)
    assert c1["bubble"] == 1.0 and c4["bubble"] == 0.25
    slow4 = max(r["time"] for r in c4["stage_rows"])
    # each rank steps the parameters it holds after the flush: the most loaded one's step counts
    step4 = max(r["optimizer"] for r in c4["stage_rows"])
    assert step4 > 0 and all(r["optimizer"] > 0 for r in c4["stage_rows"])
    assert c4["step_time"] == pytest.approx(slow4 * 1.25 + 2 * c4["p2p_per_microbatch"] + c4["tied_all_reduce"]
                                            + step4)
    assert plan4.cost["step_time"] == c4["step_time"] < c1["step_time"]
    # in flight: GPipe all m microbatches on every stage, 1F1B at most p - k on stage k
    _, g4 = _priced(g, "gpipe", 4)
    assert [r["in_flight"] for r in g4["stage_rows"]] == [4, 4]
    assert [r["in_flight"] for r in c4["stage_rows"]] == [2, 1]

    for a, b in zip(g4["stage_rows"], c4["stage_rows"]):
        assert b["activations"] == pytest.approx(a["activations"] * b["in_flight"] / 4)
    assert plan4.cost["memory"]["total"] == int(max(r["memory"] for r in c4["stage_rows"]))
    from autopar.compiler.stages import pipeline_lines
    text = "\n".join(pipeline_lines(c4))
    assert "bubble (p-1)/m = 0.25" in text and "2 microbatch(es) in flight" in text


def test_interleaved_schedule_cuts_chunks_and_halves_the_bubble(gpt4):
    _, _, g = gpt4
    plan, c = _priced(g, "interleaved:2", 4)
    assert plan.pipeline["virtual"] == 2 and len(plan.pipeline["ranges"]) == 4
    assert plan.pipeline["ranges"] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    _, c1 = _priced(g, "1f1b", 4)
    assert c["bubble"] == pytest.approx(c1["bubble"] / 2) == 0.125
    # rank 0 holds chunks 0 and 2: warm-up (2-1) x 2 + 2 = 4 chunk forwards, plus one
    assert [r["in_flight"] for r in c["stage_rows"]] == [2.5, 1.5]
    with pytest.raises(InputError, match="6 model chunks .* 4 blocks"):
        _priced(g, "interleaved:3", 4)
    with pytest.raises(InputError, match="interleaved needs a whole number"):
        _priced(g, "interleaved:1", 4)


def test_pp2_dp2_launch_reduces_each_stages_gradients_over_dp():
    """A batch of 32 makes data parallelism pay: the intra-stage plan splits the batch over
    dp (the targets split like idx, so each microbatch pairs the same examples), each stage
    accumulates its gradients over the microbatches and all_reduces them in its own buckets
    over dp once -- the bytes of the stage's parameters only."""
    rc, out = _run(["run", "tests/models/gpt_layers.py:four_batch32", "--mesh", "pp=2,dp=2",
                    "--microbatches", "2", "--steps", "2", "--check"])
    assert rc == 0, out
    assert "check: ok" in out
    got = []
    for k in (0, 1):
        part = _table(out, k)
        m = re.search(r"all_reduce:dp\s+([\d,]+)\s+([\d,]+)\s+ok", part)
        assert m and m.group(1) == m.group(2), part
        got.append(int(m.group(1).replace(",", "")))
        # 2 microbatches of this dp rank's (8, 32, 64) fp32 = 64 KiB each
        _row(out, k, "send:pp", 131_072, 2)
    # each stage reduces its own parameters' gradients (about half of the model's each, the
    # tied one on both), not the whole model's
    from autopar.pipeline import load_model
    model, _, _ = load_model("tests/models/gpt_layers.py:four_batch32")
    total = sum(p.numel() * 4 for p in model.parameters())
    assert all(0.4 * total < g < 0.6 * total for g in got), (got, total)
    assert sum(got) >= total + model.transformer.wte.weight.numel() * 4


# ---- pipelines in the mesh search ------------------------------------------------------------------

def test_search_devices_finds_a_pipeline_where_no_flat_mesh_fits():
    """Under a limit no dp x tp shape meets, a pp x dp x tp shape does: the search over every
    factorisation returns it, its fullest stage within the limit; shapes whose parameter
    state alone cannot fit are skipped unsearched, and a limit nothing meets raises with
    every shape's reason."""
    from conftest import load_example
    from autopar.passes.shard import PlanInfeasible, search_devices
    from autopar.pipeline import prepared_graph
    gpt = load_example("gpt")
    cfg = gpt.GPTConfig(block_size=32, vocab_size=128, n_layer=4, n_head=4, n_embd=64)
    g = prepared_graph(*gpt.build(cfg, batch=8), "gpt", symbolic=True)
    kw = dict(max_inner=2, deterministic=True, zero=0)
    with pytest.raises(PlanInfeasible) as flat:
        search_devices(g, 8, "h100", memory_limit=1e5, **kw)
    limit = 0.7 * flat.value.least_memory
    with pytest.raises(PlanInfeasible):
        search_devices(g, 8, "h100", memory_limit=limit, **kw)
    plan, rows = search_devices(g, 8, "h100", memory_limit=limit, pipeline=True, **kw)
    assert plan.pipeline and plan.mesh["pp"] >= 2
    assert plan.cost["memory"]["total"] <= limit
    assert plan.cost["pipeline"]["microbatches"] == plan.microbatches
    by_mesh = {r["mesh"]: r for r in rows}
    assert set(by_mesh) == {"dp=8,tp=1", "dp=4,tp=2", "pp=2,dp=4,tp=1", "pp=2,dp=2,tp=2",
                            "pp=4,dp=2,tp=1", "pp=4,dp=1,tp=2"}      # pp <= 4 blocks, tp <= 2
    assert all(by_mesh[m]["status"] == "infeasible" for m in ("dp=8,tp=1", "dp=4,tp=2"))
    winner = [r for r in rows if r.get("winner")]
    assert len(winner) == 1 and winner[0]["mesh"] == ",".join(f"{a}={n}" for a, n in plan.mesh.items())
    assert winner[0]["status"] != "screened" and winner[0]["memory"] <= limit
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all("parameter state alone" in r["reason"] for r in skipped)
    with pytest.raises(PlanInfeasible) as none:
        search_devices(g, 8, "h100", memory_limit=1e5, pipeline=True, **kw)
    assert "pp=4,dp=1,tp=2: the parameter state alone needs" in str(none.value)


def test_rank_batch_counts_a_batch_split_after_the_inputs(gpt4):
    """A plan may keep the token ids whole and split an activation's batch over dp; the
    microbatches cut the ids, so they must divide the rows each rank holds there."""
    from autopar.compiler.stages import rank_batch
    from autopar.passes.shard import search
    _, _, g = gpt4
    plan = search(g, {"dp": 2}, "h100", deterministic=True)
    batch = int(g.inputs[0].shape[0])
    plan.layouts = {k: ["S(0)" if k in ("idx", "targets") else "R"] for k in plan.layouts}
    assert rank_batch(plan, g) == batch // 2
    whole = {k: ["R"] for k in plan.layouts}
    late = next(v.name for n in g.nodes for v in n.outputs if v.shape and v.shape[0] == batch)
    whole[late] = ["S(0)"]
    plan.layouts = whole
    assert rank_batch(plan, g) == batch // 2
    plan.layouts = {k: ["R"] for k in plan.layouts}
    assert rank_batch(plan, g) == batch


def test_pipeline_shapes_slower_than_their_flops_bound_are_skipped():
    """A pp shape can step no faster than the model's FLOPs over every device stretched by
    its least bubble, (p-1)/m with m at most the batch. On a 12-layer GPT-7.5B at batch 8
    on 8 A100s, pp=4 and pp=8 are bounded above the best flat plan and skipped unpriced;
    every shape that is priced or searched steps no faster than its own bound."""
    from conftest import load_example
    from autopar.frontends.tracing import trace
    from autopar.passes.prune import prune
    from autopar.passes.shard import search_devices
    gpt = load_example("gpt")
    g = prune(trace(*gpt.build_meta("7.5b", batch=8, seq=1024, n_layer=12), name="gpt12"))
    plan, rows = search_devices(g, 8, "a100-80g", pipeline=True, deterministic=True)
    flat = min(r["step_time"] for r in rows if "pp" not in r["mesh"] and r.get("step_time"))
    bounded = [r for r in rows if r["status"] == "skipped" and "bubble at least" in r["reason"]]
    assert {r["mesh"].split(",")[0] for r in bounded} == {"pp=4", "pp=8"}, rows
    assert all(r["bound"] >= flat for r in bounded)
    priced = [r for r in rows if r["mesh"].startswith("pp=") and r.get("step_time")]
    assert priced and all(r["step_time"] >= r["bound"] for r in priced), priced
    assert plan.cost["step_time"] <= flat


def test_a_plan_that_split_the_batch_inputs_apart_pins_them_in_the_first_search(gpt4):
    """The pipeline needs every batch input split like the first. A search that splits
    them apart is run again with them pinned; `like`, another shape's plan that split them
    apart, pins them from the start: one search, its inputs alike, none of it lost."""
    import copy
    from autopar.compiler.cluster import load_profile
    from autopar.compiler.stages import batch_inputs, pipeline_plan
    from autopar.passes.shard import search
    _, _, g = gpt4
    calls = []

    def searcher(graph, mesh, **kw):
        calls.append(kw.get("pins") or [])
        return search(graph, mesh, "h100", deterministic=True, **kw)
    apart = copy.copy(search(g, {"dp": 2}, "h100", deterministic=True))
    first, second = (v.name for v in batch_inputs(g)[:2])
    apart.layouts = {**apart.layouts, first: ["S(0)"], second: ["R"]}
    h100 = load_profile("h100")
    plan = pipeline_plan(g, {"pp": 2, "dp": 2}, searcher, h100, like=apart)
    assert len(calls) == 1 and {p.value for p in calls[0]} == {v.name for v in batch_inputs(g)}
    assert all(tuple(p.layout) == ("S(0)",) for p in calls[0])
    assert plan.layouts[first] == plan.layouts[second] == ["R", "S(0)"]      # lifted over pp
    # `like` on other axes is no guide: searched free (then pinned only if it splits apart)
    calls.clear()
    other = copy.copy(apart)
    other.mesh = {"tp": 2}
    pipeline_plan(g, {"pp": 2, "dp": 2}, searcher, h100, like=other)
    assert calls[0] == []
