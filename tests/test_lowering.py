"""Front ends and lowering on the example models: the interpreter reproduces the eager
model exactly, printing is deterministic, meta models trace without weights, and goldens
pin the printed IR after lowering and after pruning."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn as nn

from autopar.compiler.interpret import max_abs_error
from autopar.frontends.tracing import TraceError, trace
from autopar.compiler.verify import verify
from autopar.passes.prune import prune

EXAMPLES = ["mlp", "gpt", "llama", "lora", "bert"]
FX_TRACEABLE = ["mlp", "bert"]


def exact(model, graph, inputs):
    err, scale = max_abs_error(model, graph, inputs)
    assert err <= 1e-6 * max(scale, 1.0), f"max abs err {err} at output scale {scale}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_lowering_is_exact_and_prune_keeps_values(name, traced, golden):
    model, inputs, lowered, prepared = traced(name)
    pruned = verify(prune(lowered))
    exact(model, lowered, inputs)
    exact(model, pruned, inputs)
    exact(model, prepared, inputs)
    golden(f"ir/{name}.lower.txt", str(lowered))
    golden(f"ir/{name}.prune.txt", str(pruned))


@pytest.mark.parametrize("name", FX_TRACEABLE)
def test_fx_front_end_lowers_to_the_same_ops(name, traced):
    model, inputs, lowered_fx, _ = traced(name, "fx")
    exact(model, lowered_fx, inputs)
    _, _, lowered_export, _ = traced(name)
    # both front ends produce the same computation (dropout p=0 aside)
    ops = lambda g: [n.op for n in prune(g).nodes]   # noqa: E731
    assert ops(lowered_fx) == ops(lowered_export)


def test_printing_twice_is_byte_identical(example):
    m = example("gpt")
    a = str(prune(trace(*m.build(), name="gpt")))
    b = str(prune(trace(*m.build(), name="gpt")))
    assert a == b


def test_pruning_removes_nodes_on_gpt_and_llama(traced):
    for name in ("gpt", "llama"):
        _, _, lowered, _ = traced(name)
        assert len(prune(lowered).nodes) < len(lowered.nodes), name


def test_module_paths_and_state_dict_names(traced):
    model, _, g, _ = traced("gpt")
    names = {p.name for p in g.params}
    assert names <= set(dict(model.named_parameters()).keys()) | set(dict(model.named_buffers()).keys())
    assert g.aliases == {"lm_head.weight": "transformer.wte.weight"}
    mods = {n.meta.module for n in g.nodes}
    assert "transformer.h.1.mlp.c_fc" in mods and "transformer.h.0.attn.c_attn" in mods


def test_lora_marks_base_weights_frozen(traced):
    _, _, lowered, _ = traced("lora")
    pruned = prune(lowered)
    text = str(pruned)
    assert "param %transformer.h.0.attn.c_attn.base.weight: f32[192,64] frozen" in text
    assert "param %transformer.h.0.attn.c_attn.lora_A: f32[4,64] trainable" in text
    assert any("frozen params" in n and "get no gradient" in n for n in pruned.notes)


def test_gpt_explicit_attention_lowers_exactly(example):
    m = example("gpt")
    model, inputs = m.build(m.GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2,
                                        n_embd=32, flash=False))
    g = verify(prune(trace(model, inputs)))
    exact(model, g, inputs)
    ops = {n.op for n in g.nodes}
    assert {"matmul", "masked_fill.Scalar", "softmax"} <= ops or {"matmul", "softmax"} <= ops


def test_meta_model_traces_without_weights(example):
    m = example("gpt")
    t0 = time.perf_counter()
    model, inputs = m.build_meta("1.7b")
    g = prune(trace(model, inputs, name="gpt1.7b"))
    elapsed = time.perf_counter() - t0
    assert sum(p.numel for p in g.params) > 1.6e9
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(g.nodes) > 400
    print(f"1.7B on meta: {len(g.nodes)} nodes in {elapsed:.2f}s")


def test_unknown_op_becomes_opaque_with_a_warning():
    class Cum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.logcumsumexp(self.fc(x), dim=1).sum()

    model, x = Cum(), torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        g = verify(trace(model, (x,)))
    assert any("logcumsumexp" in str(i.message) and "replicated" in str(i.message) for i in w)
    exact(model, g, (x,))
    from autopar.compiler.ops import node_anno
    cum = next(n for n in g.nodes if n.op == "logcumsumexp")
    assert node_anno(cum).splittable() == []


def test_untraceable_model_gives_a_trace_error():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:          # data-dependent control flow
                return x * 2
            return x

    with pytest.raises(TraceError, match="torch.export could not trace Branchy"):
        trace(Branchy(), (torch.randn(3),))
    with pytest.raises(TraceError, match="fx"):
        trace(Branchy(), (torch.randn(3),), mode="fx")
