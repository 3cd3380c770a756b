"""Real model code: tiny random-init Hugging Face models (GPT-2, Llama, Qwen2, BERT, T5,
Mixtral; no downloads) lower exactly, hold no op without a sharding rule, and plan on a
2-D mesh; HF GPT-2's Conv1D projections split like nn.Linear's and its GPT-2-small shape
is priced like the same model written with nn.Linear (examples/gpt.py).

Each model is traced once per module (the fixtures cache them); tracing is most of the
time this file takes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import transformers as tf

from autopar.compiler.errors import InputError
from autopar.compiler.interpret import max_abs_error
from autopar.compiler.ops import REGISTRY, node_anno
from autopar.compiler.verify import verify
from autopar.explain import explain
from autopar.passes.apply import apply_plan
from autopar.pipeline import make_plan, prepared_graph

LAYERS, HIDDEN, VOCAB, SEQ, BATCH = 2, 64, 128, 16, 4


class LossOf(nn.Module):
    """forward(ids, labels) -> the HF model's own loss (causal LM, masked LM or seq2seq)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels).loss


def config(name: str):
    common = dict(vocab_size=VOCAB, use_cache=False)
    decoder = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    if name == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(
            n_layer=LAYERS, n_embd=HIDDEN, n_head=4, n_positions=SEQ, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **common)
    if name == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**decoder, **common)
    if name == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**decoder, **common)
    if name == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**decoder, num_local_experts=4,
                                                       num_experts_per_tok=2, **common)
    if name == "bert":
        return tf.BertForMaskedLM, tf.BertConfig(
            num_hidden_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
            num_attention_heads=4, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common)
    if name == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(
            num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=HIDDEN, d_ff=2 * HIDDEN,
            num_heads=4, d_kv=HIDDEN // 4, dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=0, **common)
    raise KeyError(name)


def build(name: str):
    cls, cfg = config(name)
    torch.manual_seed(0)
    model = LossOf(cls(cfg)).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    if name == "bert":
        labels[:, ::2] = -100          # masked LM: the loss counts the masked positions only
    return model, (ids, labels)


MODELS = ["gpt2", "llama", "qwen2", "bert", "t5", "mixtral"]
_cache: dict = {}


@pytest.fixture(scope="module")
def hf():
    """hf(name) -> (model, inputs, prepared graph), traced once per module."""
    def get(name):
        if name not in _cache:
            model, inputs = build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _cache[name] = (model, inputs, prepared_graph(model, inputs, name=name))
        return _cache[name]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_hf_model_lowers_exactly_with_a_rule_for_every_op(name, hf):
    model, inputs, g = hf(name)
    err, scale = max_abs_error(model, g, inputs)
    # exact up to rounding: addmm written as mm + add may differ by an ulp
    assert err <= 1e-6 * scale, f"{name}: max abs error {err} at loss {scale}"
    assert 1.0 < scale < 20.0                      # a real cross-entropy over 128 classes
    opaque = sorted({n.op for n in g.nodes if not REGISTRY[n.op].has_rule})
    assert opaque == [], f"{name}: ops without a sharding rule: {opaque}"
    mutating = [n.op for n in g.nodes if getattr(REGISTRY[n.op].target, "_schema", None) is not None
                and REGISTRY[n.op].target._schema.is_mutable]
    assert mutating == [], f"{name}: in-place ops left in the IR: {mutating}"


@pytest.mark.parametrize("name", MODELS)
def test_hf_model_plans_on_a_2d_mesh(name, hf):
    _, _, g = hf(name)
    plan, _ = make_plan(g, "dp=2,tp=2", device="h100", deterministic=True, time_limit=3.0)
    assert plan.cost["fits"] and plan.cost["step_time"] > 0
    keys = {n.outputs[0].name for n in g.nodes}
    assert keys <= set(plan.strategies)
    # the plan applies: one rank's IR with explicit collectives, verified
    sharded = apply_plan(g, plan)
    verify(sharded.graph)
    assert len(sharded.nodes) >= len(g.nodes)


def test_mixtral_router_and_experts_ops_have_rules(hf):
    _, _, g = hf("mixtral")
    ops = {n.op for n in g.nodes}
    assert {"topk", "moe_experts"} <= ops and "sort" not in ops   # experts traced as one op
    moe = [n for n in g.nodes if n.op == "moe_experts"]
    assert len(moe) == LAYERS
    for n in moe:                     # tokens, the experts' intermediate, experts with tokens
        anno = node_anno(n)
        assert set(anno.splittable()) == {"t", "x", "i"} and anno.reduce == {"i"}
        assert anno.partner("x") == "t"
    topk = next(n for n in g.nodes if n.op == "topk")
    assert node_anno(topk).splittable() == ["d0"]          # tokens split, experts do not


def test_an_ep_axis_makes_the_experts_expert_parallel(hf):
    """On an axis named ep every experts op splits its experts with their tokens (the
    expert-parallel rewrite with its all_to_alls); an ep size that does not divide the
    experts is an error naming the op, not a silent fallback."""
    _, _, g = hf("mixtral")
    plan, _ = make_plan(g, "dp=2,ep=2", device="h100", deterministic=True, time_limit=3.0)
    moe = [n for n in g.nodes if n.op == "moe_experts"]
    assert [plan.strategies[n.outputs[0].name][1] for n in moe] == ["x"] * LAYERS     # mesh order dp, ep
    text = explain(plan, g)
    assert f"experts ({LAYERS} layers: model.model.layers.*.mlp.experts):" in text
    assert "  ep: expert-parallel (2 of 4 experts per rank, rows sent with all_to_all)" in text
    sharded = apply_plan(g, plan)
    verify(sharded.graph)
    assert sum(n.op == "expert_parallel_moe" for n in sharded.graph.nodes) == LAYERS
    with pytest.raises(InputError, match=r"moe_experts .*module model\.model\.layers\.0\.mlp\.experts.*"
                                         r"ep=3 is the expert axis, but it does not divide the 4 experts"):
        make_plan(g, "ep=3", device="h100", deterministic=True, time_limit=3.0)


def test_gpt2_conv1d_projections_split_like_linear(hf):
    _, _, g = hf("gpt2")
    # Conv1D's bias add is folded back into addmm; c_attn is cut into its q, k, v columns
    mms = [n for n in g.nodes if n.op == "addmm"]
    assert len(mms) == 6 * LAYERS                          # c_attn x3, c_proj, c_fc, mlp.c_proj
    for n in mms:
        anno = node_anno(n)
        assert set(anno.splittable()) == {"m", "k", "n"} and anno.reduce == {"k"}
    assert not any(n.op in ("mm", "split") for n in g.nodes)
    cut = [p for p in g.pieces.values() if p.source.endswith("h.0.attn.c_attn.weight")]
    assert [(p.dim, p.start, p.stop) for p in cut] == [(1, 0, HIDDEN), (1, HIDDEN, 2 * HIDDEN),
                                                       (1, 2 * HIDDEN, 3 * HIDDEN)]


# ---- the GPT-2 small shape on meta: HF's Conv1D against nn.Linear ---------------------------

def gpt2_small_on_meta(layers=12, width=768, batch=8, seq=1024, vocab=50304, activation="gelu_new"):
    cfg = tf.GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, n_positions=seq,
                        vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        use_cache=False, activation_function=activation)
    with torch.device("meta"):
        model = LossOf(tf.GPT2LMHeadModel(cfg)).train()
        ids = torch.empty((batch, seq), dtype=torch.long)
    return model, (ids, ids)


def test_hf_gpt2_shape_is_priced_like_the_nn_linear_gpt(example):
    # the same activation as examples/gpt.py (nn.GELU): HF's default "gelu_new" is written
    # as eight elementwise ops, eight kernels in eager mode, and is priced as such (11-19%
    # slower on these meshes); what is compared here is Conv1D against nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = gpt2_small_on_meta(activation="gelu")
        g_hf = prepared_graph(model, inputs, name="hf_gpt2")
        m = example("gpt")
        ref, ref_inputs = m.build_meta("gpt2-small", batch=8, seq=1024, vocab_size=50304)
        g_ref = prepared_graph(ref, ref_inputs, name="gpt")
    for devices in (8, 64):
        hf_plan, _ = make_plan(g_hf, devices=devices, device="h100", deterministic=True)
        ref_plan, _ = make_plan(g_ref, devices=devices, device="h100", deterministic=True)
        # the Conv1D matmuls are priced as matmuls: same FLOPs per step as nn.Linear's
        assert hf_plan.cost["flops_per_device"] == pytest.approx(ref_plan.cost["flops_per_device"],
                                                                 rel=0.01)
        # issue 11: within 10% of the same shape written with nn.Linear
        ratio = hf_plan.cost["step_time"] / ref_plan.cost["step_time"]
        assert ratio <= 1.10, f"{devices} devices: HF GPT-2 {hf_plan.cost['step_time'] * 1e3:.2f} ms " \
                              f"vs nn.Linear {ref_plan.cost['step_time'] * 1e3:.2f} ms"
        # head-parallel attention: c_attn's q, k and v pieces split over tp, as do the MLPs
        if "tp" in hf_plan.mesh and hf_plan.mesh["tp"] > 1:
            tp = list(hf_plan.mesh).index("tp")
            conv = {n.outputs[0].name: n for n in g_hf.nodes if n.op == "addmm"}
            split = {conv[k].inputs[2].name for k, s in hf_plan.strategies.items()
                     if k in conv and s[tp] is not None}
            assert any(".attn.c_attn.weight.1" in w for w in split), split
            assert any(w.endswith("mlp.c_fc.weight") for w in split), split


# ---- multi-rank: one run, several checks ---------------------------------------------------

def test_hf_gpt2_runs_with_pieces_and_a_global_mean_over_kept_targets(tmp_path, capsys):
    """HF GPT-2 on dp=2,tp=2 (the least-memory plan: c_attn's q/k/v pieces split over tp,
    the batch over dp), its labels ignored (-100) unevenly across the batch: the ranks'
    losses and final shards match the single-device run, so the pieces round-trip and the
    loss divides by the kept targets of the whole batch, not of each shard."""
    from pathlib import Path
    from autopar.cli import main
    repo = Path(__file__).resolve().parents[1]
    code = main(["run", f"{repo}/tests/models/ignored_targets.py:hf_gpt2", "--plan",
                 f"{repo}/tests/models/sharded_2x2.plan", "--steps", "2", "--check", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "check: ok" in out, out[-3000:]
    program = next(tmp_path.glob("*_torch.py")).read_text()
    assert "c_attn.weight[1]" in program and "(64/dp, 32/tp)" in program     # q, k, v pieces on tp
    # the kept targets are counted over dp (the mask gathered or the count reduced)
    kept = [line for line in program.splitlines() if "_kept" in line or "_count" in line]
    assert any(("rt.all_reduce(" in line or "rt.all_gather(" in line) and '"dp"' in line
               for line in kept), kept
    assert "reduction='sum'" in program


def test_hf_models_run_sharded_and_match_the_single_device(tmp_path, capsys):
    """Llama, Qwen2 and BERT on dp=2,tp=2 under the least-memory plan (every weight split),
    Mixtral's router and experts on tp=2 (its grouped matmuls split) and expert-parallel on
    dp=2,ep=2 (MPI): each a launched run
    whose losses, final shards and collective bytes match the single-device run."""
    from pathlib import Path
    from autopar.cli import main
    repo = Path(__file__).resolve().parents[1]
    tp2 = tmp_path / "tp2.plan"
    tp2.write_text("mesh tp=2\nminimize memory\n")
    runs = [("llama", repo / "tests/models/sharded_2x2.plan"), ("qwen2", repo / "tests/models/sharded_2x2.plan"),
            ("bert", repo / "tests/models/sharded_2x2.plan"), ("mixtral", tp2)]
    for name, plan in runs:
        code = main(["run", f"{repo}/tests/models/hf_zoo.py:{name}", "--plan", str(plan), "--steps", "2",
                     "--check", "-o", str(tmp_path / name)])
        out = capsys.readouterr().out
        assert code == 0 and "check: ok" in out and "DIFFERENT" not in out, f"{name}:\n{out[-3000:]}"
        program = next((tmp_path / name).glob("*_torch.py")).read_text()
        assert "rt.all_gather(" in program or "rt.all_reduce(" in program, name     # really sharded
    assert "rt.moe_experts(" in program                               # Mixtral's experts as one op
    # expert parallel under MPI: rows dispatched over ep by uneven all_to_all, bytes and
    # calls (five per layer) as predicted
    code = main(["run", f"{repo}/tests/models/hf_zoo.py:mixtral", "--mesh", "dp=2,ep=2", "--backend", "mpi",
                 "--steps", "2", "--check", "-o", str(tmp_path / "ep")])
    out = capsys.readouterr().out
    assert code == 0 and "check: ok" in out and "DIFFERENT" not in out, out[-3000:]
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("all_to_all:ep"))
    assert row[1] == row[2] and row[3] == "ok" and row[-3:] == [str(5 * LAYERS), "/", str(5 * LAYERS)], row
    program = next((tmp_path / "ep").glob("*_mpi.py")).read_text()
    assert program.count('rt.moe_experts(') == LAYERS and '"ep")' in program
