"""The vocab-parallel cross-entropy: logits split on the class dim stay split through the
loss (two all_reduces of one fp32 value per row inside the op instead of gathering the
logits).

No-process tests: which cross-entropies may split their class dim, the search choosing
it for an LM head on tp, and the cost model and plan application agreeing on its bytes.
Multi-rank tests (one job per mesh size and backend, every case in it, started by
`plan_helpers.launch_programs` as in tests/test_codegen.py): GPT, Llama and Hugging Face
GPT-2 with ignored targets, and a per-token loss (reduction='none'), on tp=2 and
dp=2,tp=2; each program's losses and final shards equal the single-device run and its
measured bytes and calls equal the prediction. Each model is built and traced once for the
module, and each case's single-device run is shared by the two backends.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))

STEPS = 2

from autopar.compiler.cluster import Cluster, DeviceProfile, Link
from autopar.compiler.cost import CostModel
from autopar.compiler.ir import Graph, Node, NodeMeta, Value
from autopar.compiler.ops import VOCAB_PARALLEL_CE, node_anno
from autopar.compiler.sharding import split_class_collectives
from autopar.compiler.verify import verify
from autopar.passes.apply import apply_plan
from autopar.passes.shard import search

# an H100-like device, fp32 bytes, so the bytes below are easy to write down
H100ISH = DeviceProfile("h100ish", peak_flops=800e12, efficiency=0.5, hbm_bandwidth=3.35e12,
                        memory=80e9, node_size=8, intra=Link(10e-6, 400e9), inter=Link(20e-6, 46e9),
                        precision="fp32")


def lm_head_graph(rows=2048, width=1024, vocab=32768, reduction=2, **attrs) -> Graph:
    """hidden [rows, width] -> lm_head -> logits [rows, vocab] -> cross_entropy(targets)
    (summed, or per row and then summed) / rows."""
    x = Value("x", (rows, width), kind="input")
    t = Value("targets", (rows,), torch.int64, kind="input")
    w = Value("lm_head.weight", (vocab, width), kind="param", requires_grad=True)
    logits = Value("logits", (rows, vocab))
    loss = Value("loss", () if reduction else (rows,))
    nodes = [Node("linear", (x, w), (), (logits,), NodeMeta("lm_head")),
             Node("cross_entropy_loss", (logits, t), (("reduction", reduction), *attrs.items()),
                  (loss,), NodeMeta(""))]
    total = loss
    if not reduction:
        total = Value("total", ())
        nodes.append(Node("sum", (loss,), (), (total,), NodeMeta("")))
    mean = Value("mean", ())
    nodes.append(Node("div.Scalar", (total,), (("other", rows),), (mean,), NodeMeta("")))
    outputs = [mean]
    return verify(Graph("lm", [x, t], [w], nodes, outputs))


def loss_node(g: Graph) -> Node:
    return next(n for n in g.nodes if n.op == "cross_entropy_loss")


# ==========================================================================
# no processes
# ==========================================================================
def test_which_cross_entropies_split_their_class_dim():
    def splits(**kw):
        return "c" in node_anno(loss_node(lm_head_graph(64, 8, 32, **kw))).splittable()
    assert splits(reduction=2) and splits(reduction=0) and splits(reduction=2, ignore_index=-1)
    assert not splits(reduction=1)                        # a mean is rewritten as sum / kept first
    assert not splits(reduction=2, label_smoothing=0.1)   # smoothing needs every logit's sum
    anno = node_anno(loss_node(lm_head_graph(64, 8, 32)))
    assert "c" in anno.reduce                             # a split class dim: partial sums


def test_search_picks_the_split_class_dim_and_prices_its_small_all_reduces():
    """An LM head on tp=2 (a real vocabulary): the search keeps the logits split on the
    class dim through the loss; the plan's tp bytes are the loss's two all_reduces of
    rows x 4 bytes (and the scalar loss), not the gathered logits; the cost model, plan
    application and the generated program's accounting agree."""
    rows, vocab = 2048, 32768
    g = lm_head_graph(rows, 1024, vocab)
    mesh = {"tp": 2}
    plan = search(g, mesh, H100ISH, deterministic=True, overlap=False)
    assert tuple(plan.strategies["loss"]) == ("c",), plan.strategies
    report = CostModel(g, Cluster(mesh, H100ISH), overlap=False).evaluate(plan.strategies)
    loss_bytes = sum(c.bytes for c in split_class_collectives("tp", rows))
    assert loss_bytes == 2 * rows * 4
    assert report.bytes.get("all_gather:tp", 0) == 0                  # no logits gathered
    assert report.bytes["all_reduce:tp"] == loss_bytes + 4            # + the partial loss itself
    sharded = apply_plan(g, plan)
    assert [n.op for n in sharded.nodes].count(VOCAB_PARALLEL_CE) == 1
    assert sharded.traffic() == report.bytes
    assert sharded.call_counts()["all_reduce:tp"] == 3
    # the same loss on gathered logits: the search's choice is cheaper, and would move the
    # logits (rows x vocab x 4 bytes) over tp
    gathered = dict(plan.strategies, loss=(None,))
    alt = CostModel(g, Cluster(mesh, H100ISH), overlap=False).evaluate(gathered)
    assert alt.bytes["all_gather:tp"] == rows * vocab * 4
    assert report.step_time < alt.step_time
    # the rows split over dp as well: each rank reduces its own rows' statistics
    plan2 = search(g, {"dp": 2, "tp": 2}, H100ISH, deterministic=True, overlap=False)
    assert tuple(plan2.strategies["loss"]) == ("n", "c"), plan2.strategies
    sharded2 = apply_plan(g, plan2)
    node = next(n for n in sharded2.nodes if n.op == VOCAB_PARALLEL_CE)
    assert node.inputs[0].shape == (rows // 2, vocab // 2) and node.attr["axis"] == "tp"
    assert sharded2.traffic()["all_reduce:tp"] == 2 * (rows // 2) * 4 + 4


def test_per_token_losses_are_partial_sums_over_the_class_axis():
    """reduction='none' with the class dim split: per-token losses, a partial sum over tp
    that the consumer (here a sum) reduces; the in-op reductions are priced as for 'sum'."""
    g = lm_head_graph(reduction=0)
    plan = search(g, {"tp": 2}, H100ISH, deterministic=True, overlap=False)
    assert tuple(plan.strategies["loss"]) == ("c",)
    sharded = apply_plan(g, plan)
    (node,) = [n for n in sharded.nodes if n.op == VOCAB_PARALLEL_CE]
    assert sharded.layouts[node.outputs[0].name] == ("P",)
    report = CostModel(g, Cluster({"tp": 2}, H100ISH), overlap=False).evaluate(plan.strategies)
    assert sharded.traffic() == report.bytes


def test_generated_call_is_visible_and_commented():
    from autopar.backends.codegen import backend_named, emit_program
    g = lm_head_graph(ignore_index=-1)
    # ZeRO-0: the weight stays whole on dp (ZeRO-3 halves its optimizer step and would
    # gather it -- an all_gather that is not the loss's)
    plan = search(g, {"dp": 2, "tp": 2}, H100ISH, deterministic=True, overlap=False, zero=0)
    src = emit_program(apply_plan(g, plan), backend_named("torch"), "lm")
    assert 'rt.vocab_parallel_cross_entropy(lm_head, targets, mesh, "tp", ignore_index=-1, ' \
           "reduction='sum')" in src
    assert "# vocab-parallel loss: the logits stay split on tp" in src
    assert "all_reduce 4 KiB fwd x2" in src            # 1024 rows per rank, 4 bytes each
    assert "rt.all_gather(" not in src


# ==========================================================================
# multi-rank
# ==========================================================================
class PerTokenLoss(nn.Module):
    """A small LM head whose loss is F.cross_entropy(reduction='none'), weighted per token."""

    def __init__(self, width=32, vocab=64):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, x, targets):
        logits = self.lm_head(torch.tanh(self.proj(x)))
        per_token = F.cross_entropy(logits, targets, reduction="none")
        weight = torch.linspace(0.5, 1.5, targets.shape[0])
        return (per_token * weight).sum() / targets.shape[0]


def per_token_model():
    torch.manual_seed(0)
    x = torch.randn(32, 32)
    t = torch.randint(0, 64, (32,))
    t[::5] = -100
    return PerTokenLoss(), (x, t)


def example_with_ignored_targets(name: str):
    """examples/<name>.py's build() (its loss ignores target -1), with targets ignored
    unevenly across the batch (tests/models/ignored_targets.py)."""
    import importlib.util
    import ignored_targets
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, (idx, targets) = mod.build()
    return model, (idx, ignored_targets.uneven_ignore(targets, -1))


def models():
    import ignored_targets
    return {"gpt": lambda: example_with_ignored_targets("gpt"), "hf_gpt2": ignored_targets.hf_gpt2,
            "llama": lambda: example_with_ignored_targets("llama"), "per_token": per_token_model}


# name, model, mesh, forced output layouts (plan_helpers rules)
LM_HEAD = [("lm_head", "linear", {"tp": "S(2)"}), ("lm.lm_head", "linear", {"tp": "S(2)"}),
           ("output", "linear", {"tp": "S(2)"})]
CASES_4 = [
    ("gpt_dp2_tp2", "gpt", {"dp": 2, "tp": 2}, "MEGATRON_SP"),
    ("llama_dp2_tp2", "llama", {"dp": 2, "tp": 2}, "LLAMA_TP"),
    ("hf_gpt2_dp2_tp2", "hf_gpt2", {"dp": 2, "tp": 2}, None),
    ("per_token_dp2_tp2", "per_token", {"dp": 2, "tp": 2}, None),
]
CASES_2 = [
    ("gpt_tp2", "gpt", {"tp": 2}, None),
    ("per_token_tp2", "per_token", {"tp": 2}, None),
]


_built: dict = {}


def built_model(example):
    """(model, inputs, prepared graph) of `example`, built and traced once for the module."""
    if example not in _built:
        import warnings
        from autopar.pipeline import prepared_graph
        model, inputs = models()[example]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _built[example] = (model, inputs, prepared_graph(model, inputs, example))
    return _built[example]


def _build(name, example, mesh, rules, backend):
    import plan_helpers
    from autopar.pipeline import build_program
    model, inputs, graph = built_model(example)
    forced = (getattr(plan_helpers, rules) if rules else []) + LM_HEAD
    if example == "per_token":
        forced = [("lm_head", "linear", {"tp": "S(1)"})]
    batch_axis = "dp" if "dp" in mesh else None
    plan = plan_helpers.forced_plan(graph, mesh, forced, batch_axis=batch_axis)
    return build_program(model, inputs, mesh, backend=backend, plan=plan, optimizer="adamw",
                         steps=STEPS, name=example, graph=graph)


def _run_cases(tmp_path, cases, world, backend):
    from autopar.backends import runtime as rt
    from autopar.run import compare, reference_run, traffic_table
    from plan_helpers import launch_programs, program_entry, shared_reference
    programs, entries = [], []
    for name, example, mesh, rules in cases:
        prog = _build(name, example, mesh, rules, backend)
        d = tmp_path / name
        prog.write(d)
        programs.append((name, prog, d))
        entries.append(program_entry(prog, d, STEPS, "adamw"))
    launch_programs(tmp_path, entries, world, backend)
    for name, prog, d in programs:
        # the loss runs vocab-parallel: no gather of the logits on tp
        assert "rt.vocab_parallel_cross_entropy(" in prog.source, name
        assert not any(n.op == "cross_entropy_loss" for n in prog.sharded.nodes), name
        stats = [json.loads((d / f"stats.rank{r}.json").read_text()) for r in range(world)]
        same, lines = traffic_table(prog.sharded.traffic(), {}, stats, prog.sharded.call_counts())
        assert same, f"{name}: measured bytes or calls differ from the prediction\n" + "\n".join(lines)
        init, _ = rt.load_init(prog.files["init"])
        # as `autopar run --check` compares: a parameter whose gradient is zero in exact
        # arithmetic (GPT's k bias) is held to AdamW's drift, the rest to TOLERANCE
        def single_device(prog=prog, init=init):
            peaks: dict = {}
            losses, state = reference_run(prog.model, init, prog.inputs, STEPS, "adamw", 1e-3,
                                          grad_peaks=peaks, pieces=prog.graph.pieces)
            return losses, state, peaks
        losses, state, peaks = shared_reference(("vocab", name), init, prog.inputs, single_device)
        chk = compare(prog, stats, d / "shards", losses, state, grad_peaks=peaks, lr=1e-3,
                      steps=STEPS, optimizer="adamw")
        assert chk.ok, f"{name}: {chk.max_rel_err:.3g} at {chk.worst} {chk.problems}"


@pytest.mark.parametrize("backend", ["torch", "mpi"])
def test_parity_and_bytes_on_dp2_tp2(tmp_path, backend):
    if backend == "mpi":
        pytest.importorskip("mpi4py")
    _run_cases(tmp_path, CASES_4, 4, backend)


def test_parity_and_bytes_on_tp2(tmp_path):
    _run_cases(tmp_path, CASES_2, 2, "torch")

