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

    with pytest.raises(TraceError, match="torch.export could not trace Branchy.*control flow"):
        trace(Branchy(), (torch.randn(3),))
    with pytest.raises(TraceError, match="fx"):
        trace(Branchy(), (torch.randn(3),), mode="fx")


def test_a_model_that_fails_on_its_inputs_is_not_told_about_control_flow(capfd):
    """An error of the model's own code (a missing import, a shape mismatch) names the
    user's line and says to fix it, not to rewrite control flow; torch's error logs stay
    out of the terminal."""
    class Importing(nn.Module):
        def forward(self, x):
            import autopar_no_such_module
            return x

    class Mismatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x.t())

    here = __file__.rsplit("/", 1)[-1]
    for model, x, line, what in [(Importing(), torch.randn(3), "import autopar_no_such_module", "ModuleNotFoundError"),
                                 (Mismatched(), torch.randn(4, 8), "return self.fc(x.t())", "RuntimeError")]:
        with pytest.raises(TraceError) as err:
            trace(model, (x,))
        msg = str(err.value)
        assert f"{here}:" in msg and f"({line})" in msg and what in msg, msg
        assert "control flow" not in msg and "fix that line or the inputs" in msg and ".." not in msg, msg
    assert "fake_tensor" not in capfd.readouterr().err


# ---- op rules: each splittable label really splits ---------------------------------------

# the bias each rank adds 1/n of when the contraction is split (passes/apply.py)
BIAS_INPUT = {"linear": 2, "addmm": 0}


def split_matches_whole(op: str, inputs: list, attrs: dict) -> list[str]:
    """Check an op's dim annotation against its reference implementation: for every label
    the search may split, cut each tensor carrying it into two halves, run the op per half,
    and reassemble (cat where an output carries the label, sum where it is contracted,
    equal where the output does not carry it). Returns the labels checked."""
    from autopar.compiler.ops import opdef
    d = opdef(op)
    full = d.run(inputs, attrs)
    anno = d.annotate([tuple(t.shape) for t in inputs], [tuple(t.shape) for t in full], attrs)
    checked = []
    for lab in anno.splittable():
        parts = []
        for c in range(2):
            ins = []
            for t, labs in zip(inputs, anno.inputs):
                if lab in labs:
                    dim = labs.index(lab)
                    n = t.shape[dim] // 2
                    t = t.narrow(dim, c * n, n)
                ins.append(t)
            if lab in anno.reduce and op in BIAS_INPUT:          # plan application's bias share
                ins[BIAS_INPUT[op]] = ins[BIAS_INPUT[op]] / 2
            at = dict(attrs)
            if lab in anno.outputs[0] and "size" in at:       # plan application makes it local
                at["size"] = list(at["size"])
                at["size"][anno.outputs[0].index(lab)] //= 2
            parts.append(d.run(ins, at))
        for j, (whole, labs) in enumerate(zip(full, anno.outputs)):
            if lab in labs:
                got = torch.cat([p[j] for p in parts], dim=labs.index(lab))
            elif lab in anno.reduce:
                got = parts[0][j] + parts[1][j]
            else:
                assert torch.equal(parts[0][j], parts[1][j]), f"{op}: halves of {lab} disagree"
                got = parts[0][j]
            torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{op} split on {lab}: {m}")
        checked.append(lab)
    return checked


def test_rules_for_real_model_ops_split_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 8, generator=g)
    idx = torch.randint(0, 6, (4, 2, 8), generator=g)
    cases = {
        "cumsum": ([x], {"dim": 1}, {"d0", "d2"}),
        "diff": ([x], {"dim": -1}, {"d0", "d1"}),
        "topk": ([x], {"k": 2, "dim": 1}, {"d0", "d2"}),
        "sort": ([x], {"dim": 2}, {"d0", "d1"}),
        "pad": ([x], {"pad": [1, 2]}, {"d0", "d1"}),
        "constant_pad_nd": ([x], {"pad": [0, 0, 2, 0], "value": 1.5}, {"d0", "d2"}),
        "gather": ([x, idx], {"dim": 1}, {"d0", "d1", "d2"}),
        "index_select": ([x, torch.tensor([5, 0, 2, 2])], {"dim": 1}, {"d0", "d1", "d2"}),
        "index": ([x, torch.tensor([[3, 1], [0, 0]])], {}, {"i0", "i1", "d1", "d2"}),
        "index_put": ([x, torch.tensor([0, 2]), torch.randn(2, 6, 8, generator=g)], {}, {"d0", "d1"}),
        "histc": ([x], {"bins": 5, "min": -2, "max": 2}, {"d0", "d1", "d2"}),
        "matmul": ([x, torch.randn(8, generator=g)], {}, {"b0", "m", "k"}),
        "baddbmm": ([torch.randn(6, 2, generator=g), x, torch.randn(4, 8, 2, generator=g)], {},
                    {"d0", "d1", "d2"}),
        "addmm": ([torch.randn(2, generator=g), x[0], torch.randn(8, 2, generator=g)], {},
                  {"m", "k", "n"}),
        "addmm#matrix_bias": ([torch.randn(6, 2, generator=g), x[0], torch.randn(8, 2, generator=g)],
                              {}, {"d0", "d1"}),
        "new_ones": ([x], {"size": [4, 2]}, {"d0", "d1"}),
        "new_zeros": ([x], {"size": [4, 6, 8]}, {"d0", "d1", "d2"}),
        "select_scatter": ([x, torch.randn(4, 8, generator=g)], {"dim": 1, "index": 3}, {"d0", "d2"}),
        "slice_scatter": ([x, torch.randn(4, 2, 8, generator=g)], {"dim": 1, "start": 2, "end": 4},
                          {"d0", "d2"}),
        "le": ([x, x[:1]], {}, {"d0", "d1", "d2"}),
        "__and__": ([x > 0, x < 1], {}, {"d0", "d1", "d2"}),
        "floor_divide": ([idx, torch.tensor(2)], {}, {"d0", "d1", "d2"}),
    }
    for op, (ins, attrs, want) in cases.items():
        assert set(split_matches_whole(op.split("#")[0], ins, attrs)) == want, op
    # 2-D x N-D matmul: batch, rows, columns and the contraction all split
    assert set(split_matches_whole("matmul", [torch.randn(2, 1, 4, 6, generator=g),
                                              torch.randn(4, 6, 8, generator=g)], {})) == \
        {"b0", "b1", "m", "k", "n"}
    # x[:, idx] and x[i, :, j]: index dims land where the index tensors were, or first
    assert set(split_matches_whole("index", [x, torch.tensor([5, 1])], {"indices": [None, "tensor"]})) \
        == {"d0", "i0", "d2"}
    assert set(split_matches_whole("index", [x, torch.tensor([1, 3]), torch.tensor([[0], [7]])],
                                   {"indices": ["tensor", None, "tensor"]})) == {"i0", "i1", "d1"}
    # the values of arange depend on the global position: it stays whole
    assert split_matches_whole("arange.start", [], {"start": 0, "end": 8}) == []


def test_opaque_ops_cost_what_torch_counts():
    """An op without a FLOP rule is priced by FlopCounterMode: an opaque einsum or
    _grouped_mm costs what mm/bmm of the same shapes costs, not one FLOP per output."""
    from autopar.compiler.ir import Node, Value
    from autopar.compiler.ops import _COUNTED, node_flops, opdef_for_target, REGISTRY
    aten = torch.ops.aten
    x, w = Value("x", (512, 768)), Value("w", (768, 3072))
    out = Value("y", (512, 3072))
    mm = node_flops(Node("mm", (x, w), (), (out,)))
    assert mm == 2 * 512 * 768 * 3072
    d = opdef_for_target(aten.einsum.default)
    assert not d.has_rule and d.flops_fn is None
    ein = Node(d.name, (x, w), (("equation", "mk,kn->mn"),), (out,))
    assert node_flops(ein) == mm
    assert any(k[0] == "einsum" for k in _COUNTED)          # counted once, then cached
    n = len(_COUNTED)
    assert node_flops(ein) == mm and len(_COUNTED) == n
    # an op torch has no formula for falls back to one FLOP per output element
    cum = Node("logcumsumexp", (x,), (("dim", 1),), (Value("c", (512, 768)),))
    opdef_for_target(aten.logcumsumexp.default)
    assert node_flops(cum) == 512 * 768
    assert REGISTRY["addmm"].has_rule


class InPlace(nn.Module):
    """Slice assignment, select assignment and in-place arithmetic, as HF's T5
    `_shift_right` and Mixtral's router write them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        y = h.new_zeros(h.shape)
        y[:, 1:] = h[:, :-1]
        y[:, 0] = 3.0
        y.masked_fill_(y > 1.0, 1.0)
        s = torch.softmax(y, dim=-1)
        s /= s.sum(dim=-1, keepdim=True)
        inv = torch.empty_like(torch.arange(6))
        inv[torch.tensor([2, 0, 1, 5, 3, 4])] = torch.arange(6)
        return (s[:, inv] * h).sum()


def test_in_place_updates_lower_out_of_place():
    model, x = InPlace(), torch.randn(3, 6)
    g = verify(trace(model, (x,)))
    exact(model, g, (x,))
    ops = [n.op for n in g.nodes]
    from autopar.compiler.ops import REGISTRY
    assert not [o for o in ops if getattr(REGISTRY[o].target, "_schema", None) is not None
                and REGISTRY[o].target._schema.is_mutable], ops
    assert {"slice_scatter", "select_scatter", "masked_fill.Scalar", "div", "index_put"} <= set(ops)


def test_in_place_updates_that_share_memory_are_refused():
    from autopar.frontends.lower import LoweringError

    class ViewReadLater(nn.Module):
        def forward(self, x):
            y = x * 2
            v = y[:, :2]
            y.mul_(3)                  # v sees this in eager
            return v.sum() + y.sum()

    class CountsSteps(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("steps", torch.zeros(()))

        def forward(self, x):
            self.steps.add_(1)
            return x.sum()

    with pytest.raises(LoweringError, match=r"view .* is read later"):
        trace(ViewReadLater(), (torch.randn(3, 4),))
    with pytest.raises(LoweringError, match="updates buffer %steps in place"):
        trace(CountsSteps(), (torch.randn(3),))


def test_no_grad_regions_inline_and_stop_gradients():

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("inv_freq", torch.rand(4))

        def forward(self, x):
            with torch.no_grad():       # HF's rotary embeddings
                freqs = torch.arange(x.shape[0]).float()[:, None] * self.inv_freq
            return (self.fc(x) * freqs.cos()).sum()

    class StopsGradient(Rotary):
        def forward(self, x):
            h = self.fc(x)
            with torch.no_grad():
                scale = h.abs().max()
            return (h / scale).sum()

    model, x = Rotary(), torch.randn(3, 4)
    g = verify(trace(model, (x,)))
    exact(model, g, (x,))
    assert "cos" in {n.op for n in g.nodes}
    # a region over values that carry a gradient: its results are detached, as in eager mode
    from autopar.compiler.interpret import max_grad_error
    stops = StopsGradient()
    g = verify(trace(stops, (x,)))
    assert "detach" in {n.op for n in g.nodes}
    exact(stops, g, (x,))
    assert max_grad_error(stops, g, (x,))[0] < 1e-6


def test_conv1d_addmm_lowers_to_a_splittable_mm_and_bias_add():
    class Conv1D(nn.Module):           # HF GPT-2's projection: weight is (in, out)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 12))
            self.bias = nn.Parameter(torch.randn(12))

        def forward(self, x):
            y = torch.addmm(self.bias, x.view(-1, 8), self.weight)
            return y.view(x.shape[0], x.shape[1], 12).sum()

    from autopar.compiler.ops import node_anno
    model, x = Conv1D(), torch.randn(2, 5, 8)
    g = verify(trace(model, (x,)))
    err, scale = max_abs_error(model, g, (x,))
    assert err <= 1e-6 * scale                 # mm + add rounds like addmm to ~1 ulp
    mm = next(n for n in g.nodes if n.op == "mm")
    add = g.users()[mm.outputs[0]][0]
    assert add.op == "add" and add.inputs[1].name == "bias"
    anno = node_anno(mm)
    assert set(anno.splittable()) == {"m", "k", "n"} and anno.reduce == {"k"}
