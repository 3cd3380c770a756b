"""The ONNX front end: the examples exported by `torch.onnx.export(..., dynamo=True)` (their
losses included) lower to the torch front end's IR ops, reproduce ONNX's own evaluation
(`onnx.reference.ReferenceEvaluator`), plan like the torch graph and train in parallel.

Each example is exported once per module (about a minute for the three); inputs are saved
as .npz under the graph's input names."""
from __future__ import annotations

import contextlib
import inspect
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from autopar.cli import main
from autopar.compiler.interpret import IRModule, max_abs_error
from autopar.frontends.onnx import OnnxError, load_onnx
from autopar.frontends.tracing import trace
from autopar.pipeline import load_model, make_plan, prepared_graph
from autopar.run import reference_run
from conftest import load_example

MODELS = ["mlp", "gpt", "llama"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (onnx path, npz path, torch model, inputs), exported on first use."""
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = load_example(name).build()
            path, npz = root / f"{name}.onnx", root / f"{name}.npz"
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, inputs, str(path), dynamo=True)
            names = list(inspect.signature(model.forward).parameters)
            np.savez(npz, **{n: t.numpy() for n, t in zip(names, inputs)})
            cache[name] = (str(path), str(npz), model, inputs)
        return cache[name]
    return get


def onnx_loss(path, npz) -> float:
    from onnx.reference import ReferenceEvaluator
    data = np.load(npz)
    (loss,) = ReferenceEvaluator(path).run(None, {k: data[k] for k in data.files})
    return float(loss)


@pytest.mark.parametrize("name", MODELS)
def test_lowering_matches_onnx_reference(exported, name):
    """The prepared IR's loss equals ReferenceEvaluator's within 1e-6 of its size (fp32
    numpy vs fp32 torch; on these graphs it is bit-identical) and the torch model's loss
    within 1e-5 relative (the exporter rewrote attention and folded constants)."""
    path, npz, model, inputs = exported(name)
    module, example, gname = load_onnx(path, npz)
    assert isinstance(module, IRModule) and gname == name
    assert all(torch.equal(a, b) for a, b in zip(example, inputs))
    graph = prepared_graph(module, example, gname)
    err, scale = max_abs_error(module, graph, example)
    assert err <= 1e-6 * max(scale, 1.0), (err, scale)
    with torch.no_grad():
        want = model(*inputs).item()
    assert abs(module(*example).item() - want) <= 1e-5 * abs(want)
    ops = {n.op for n in graph.nodes}
    assert "linear" in ops and not any(op.startswith("onnx.") for op in ops), ops
    assert graph.outputs[0].shape == ()


def test_step0_loss_equals_onnx_evaluation(exported):
    path, npz, _, _ = exported("gpt")
    module, inputs, _ = load_model(path, inputs=npz)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    losses, final = reference_run(module, state, inputs, 2, "adamw", 1e-3)
    assert abs(losses[0] - onnx_loss(path, npz)) <= 1e-6 * abs(losses[0])
    assert losses[1] < losses[0]                      # it trains: the parameters moved
    assert any(not torch.equal(final[k], state[k]) for k in state)


def test_gpt_parameters_carry_the_torch_names(exported):
    """The exporter folds `x @ W.T` into a transposed copy `val_N` and merges equal zero
    biases: the lowering names them after the module using them, stored as torch keeps
    them, so the torch model's tensors and the IR's agree."""
    path, npz, model, _ = exported("gpt")
    module, inputs, _ = load_onnx(path, npz)
    sd, torch_sd = module.state_dict(), model.state_dict()
    for key in ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight",
                "transformer.h.1.attn.c_proj.bias", "transformer.h.0.ln_2.weight",
                "transformer.ln_f.bias", "lm_head.weight"]:
        assert torch.equal(sd[key], torch_sd[key]), key
    graph = trace(module, inputs)
    assert graph is not module.graph and graph.nodes == module.graph.nodes
    lin = [n for n in graph.nodes if n.op == "linear"]
    assert [n.meta.module for n in lin][:4] == ["transformer.h.0.attn.c_attn",
                                                 "transformer.h.0.attn.c_proj",
                                                 "transformer.h.0.mlp.c_fc",
                                                 "transformer.h.0.mlp.c_proj"]
    assert all(len(n.inputs) == 3 for n in lin[:-1])        # the bias Add folded in
    text = str(graph)
    assert "val_8 -> transformer.h.0.attn.c_attn.weight (transposed)" in text
    assert "each trains its own copy" in text
    # the exporter's transposed copy of the tied head is the embedding again
    assert "val_172 (transposed) = lm_head.weight" in text
    heads = [n for n in graph.nodes if n.meta.module in ("lm_head", "transformer.wte")]
    assert {n.inputs[0 if n.op == "embedding" else 1].name for n in heads} == {"lm_head.weight"}
    attn = [n for n in graph.nodes if n.op == "scaled_dot_product_attention"]
    assert len(attn) == 2 and all(n.attr["is_causal"] for n in attn)


def test_folded_buffers_stay_constants(exported):
    """Llama's rope tables are buffers; the exporter folds `rope_cos[:T]` into initializers
    with no parameter record (`slice_1`, `slice_2`). Read only as factors of a Mul, they
    stay frozen constants: the trainable tensors are exactly the torch model's parameters
    (by count and size), one step leaves the tables as they were, and the graph says why.
    GPT's folded position table (`wpe.weight[arange(T)]`, read by an Add) still trains."""
    path, npz, model, _ = exported("llama")
    module, inputs, _ = load_onnx(path, npz)
    params = dict(module.named_parameters())
    assert "slice_1" not in params and "slice_2" not in params
    assert sorted(p.numel() for p in params.values()) == sorted(p.numel() for p in model.parameters())
    graph = module.graph
    tables = {v.name: v for v in graph.params if v.name in ("slice_1", "slice_2")}
    assert {v.kind for v in tables.values()} == {"buffer"}
    assert torch.equal(graph.constants["slice_1"], model.rope_cos[:32])
    assert "slice_1 (from rope_cos), slice_2 (from rope_sin)" in "\n".join(graph.notes)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    losses, final = reference_run(module, state, inputs, 2, "adamw", 1e-3)
    assert losses[1] < losses[0] and "slice_1" not in final
    gpt_path, gpt_npz, gpt, _ = exported("gpt")
    gmod, _, _ = load_onnx(gpt_path, gpt_npz)
    assert torch.equal(dict(gmod.named_parameters())["embedding_1"].detach(),
                       gpt.transformer.wpe.weight.detach()[:32])


@pytest.mark.parametrize("memory", [None, "2MiB"])
def test_gpt_plan_has_the_torch_plans_layouts(exported, traced, memory):
    """Same mesh, profile and memory limit: every value and parameter gets the same layout
    as in the torch graph's plan, every linear/layer_norm the same strategy. The lowering
    writes the torch graph's ops (linear with its bias, transpose, split, ...) under the
    torch graph's names; the only names that differ are the exporter's: the tied embedding
    is `lm_head.weight` (torch: `transformer.wte.weight`), and the position table it folded,
    `embedding_1` (= wpe[arange(T)], torch's value of that name), has no `arange` or
    `transformer.wpe.weight` before it. Under 2 MiB per device the search shards (c_fc
    column-, c_proj row-parallel, q/k/v pieces); without a limit this tiny model stays
    replicated.

    The layouts are compared under the additive step model (`overlap=False`): with the
    schedule's re-ranking on, the folded position table makes the two graphs' near ties
    (within a few percent) break differently, so there the two plans are held to each
    other's predicted step time instead."""
    from autopar.compiler.cluster import parse_bytes
    from autopar.passes.shard import search
    path, npz, _, _ = exported("gpt")
    module, inputs, _ = load_onnx(path, npz)
    g_onnx = prepared_graph(module, inputs, "gpt")
    g_torch = traced("gpt")[3]
    limit = parse_bytes(memory) if memory else None
    ranked = [make_plan(g, "dp=2,tp=2", device="cpu", memory=memory, deterministic=True)[0]
              for g in (g_onnx, g_torch)]
    a, b = (p.cost["step_time"] for p in ranked)
    assert abs(a - b) <= 0.1 * b, (a, b)
    # recompute left out: under the limit the layouts themselves must give (the search
    # would otherwise recompute the blocks and shard less)
    p_onnx, p_torch = (search(g, {"dp": 2, "tp": 2}, "cpu", memory_limit=limit, deterministic=True,
                              overlap=False, search_recompute=False) for g in (g_onnx, g_torch))
    renamed = {"lm_head.weight": "transformer.wte.weight"}
    onnx_layouts = {renamed.get(k, k): v for k, v in p_onnx.layouts.items()}
    assert set(p_torch.layouts) - set(onnx_layouts) == {"arange", "transformer.wpe.weight"}
    assert set(onnx_layouts) <= set(p_torch.layouts)
    assert len(onnx_layouts) >= 80
    assert onnx_layouts == {k: p_torch.layouts[k] for k in onnx_layouts}

    def strategies(graph, plan):
        return {(n.meta.module, n.op, k): tuple(plan.strategies.get(n.outputs[0].name) or ())
                for k, n in enumerate(x for x in graph.nodes if x.op in ("linear", "layer_norm"))}
    assert strategies(g_onnx, p_onnx) == strategies(g_torch, p_torch)
    if memory:
        assert p_onnx.layouts["transformer.h.0.mlp.c_fc.weight"] != ["R", "R"]
        assert p_onnx.layouts["transformer.h.0.mlp.c_proj.bias"] == p_torch.layouts[
            "transformer.h.0.mlp.c_proj.bias"]


def test_mlp_plan_has_the_torch_plans_layouts(exported, traced):
    """The MLP (Gemm with its bias, the loss written out as mean((y - t)^2)) lowers to the
    torch graph's linear/gelu/mse_loss under the same names: under 6 MiB per device (the
    search must shard) every value gets the torch plan's layout."""
    path, npz, _, _ = exported("mlp")
    module, inputs, _ = load_onnx(path, npz)
    g_onnx = prepared_graph(module, inputs, "mlp")
    p_onnx, _ = make_plan(g_onnx, "dp=2,tp=2", device="cpu", memory="6MiB", deterministic=True)
    p_torch, _ = make_plan(traced("mlp")[3], "dp=2,tp=2", device="cpu", memory="6MiB", deterministic=True)
    assert p_onnx.layouts == p_torch.layouts and len(p_onnx.layouts) >= 10
    assert any(set(lay) != {"R"} for lay in p_onnx.layouts.values())


def test_lowering_writes_the_torch_graphs_ops(exported, traced):
    """MLP, GPT and Llama: the ops the exporter writes out (x @ W + b, sqrt -> reciprocal,
    x * sigmoid(x), mean((a - b)^2), Transpose of two dims, Unsqueeze of one) come back as
    the one op torch's graph has, so the prepared graphs have the same ops, operands,
    shapes and (but for the exporter's folded names) value names."""
    def sig(graph, names):
        return [(n.op, tuple(names.get(v.name, v.name) for v in n.inputs),
                 tuple(v.shape for v in n.outputs)) for n in graph.nodes
                if n.op not in ("view", "reshape", "arange.start")]
    for name, renamed in [("mlp", {}),
                          ("gpt", {"lm_head.weight": "transformer.wte.weight"}),
                          ("llama", {"slice_1": "rope_cos", "slice_2": "rope_sin"})]:
        path, npz, _, _ = exported(name)
        module, inputs, _ = load_onnx(path, npz)
        g_onnx = prepared_graph(module, inputs, name)
        g_torch = traced(name)[3]
        ops_t = [n.op for n in g_torch.nodes if n.op not in ("view", "reshape", "arange.start")]
        ops_o = [n.op for n in g_onnx.nodes if n.op not in ("view", "reshape", "arange.start")]
        if name == "gpt":          # the position embedding was folded to its table
            ops_t.remove("embedding")
        assert ops_o == ops_t, name
        lin_t = [(n.meta.module, len(n.inputs), n.inputs[1].shape) for n in g_torch.nodes if n.op == "linear"]
        lin_o = [(n.meta.module, len(n.inputs), n.inputs[1].shape) for n in g_onnx.nodes if n.op == "linear"]
        assert lin_o == lin_t, name                 # bias folded in, weights stored (out, in)
        err, scale = max_abs_error(module, g_onnx, inputs)
        assert err <= 1e-6 * max(scale, 1.0), (name, err)


def test_cli_ir_verify_and_made_inputs(exported, capsys):
    path, npz, _, _ = exported("gpt")
    assert main(["ir", path, "--inputs", npz, "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("verify: ok max_abs_err=")
    assert main(["ir", path, "--after", "lower"]) == 0
    out = capsys.readouterr().out
    assert "example inputs made from the declared types (idx in [0, 128); targets in [0, 128))" in out
    assert main(["ir", path, "--inputs", npz + ".missing"]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- bad input ---------------------------------------------------------------------------------

def tiny_model(path, *, loss=True, dim="4", extra_op=None):
    """x[4,8] @ w[8,8] (+ an optional op on x), then a mean: a model with or without a
    scalar output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [int(dim) if dim.isdigit() else dim, 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    nodes, src = [], "x"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["x"], ["x2"], name="odd_node"))
        src = "x2"
    nodes.append(helper.make_node("MatMul", [src, "w"], ["y"], name="mm"))
    if loss:
        nodes.append(helper.make_node("ReduceMean", ["y"], ["loss"], keepdims=0, name="mean"))
        out = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    else:
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    g = helper.make_graph(nodes, "tiny", [x], [out], initializer=[w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), path)
    return str(path)


def test_not_an_onnx_file(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_text("this is not protobuf\n")
    with pytest.raises(OnnxError, match=r"bad.onnx is not an ONNX model .*torch.onnx.export"):
        load_onnx(str(p))


def test_no_scalar_output(tmp_path):
    p = tiny_model(tmp_path / "noloss.onnx", loss=False)
    with pytest.raises(OnnxError, match=r"noloss.onnx: no scalar output to train on \(outputs: y: f32\[4,8\]\)"):
        load_onnx(p)


def test_input_missing_from_npz(tmp_path, exported):
    path, _, _, inputs = exported("gpt")
    npz = tmp_path / "half.npz"
    np.savez(npz, idx=inputs[0].numpy())
    with pytest.raises(OnnxError, match=r"no array for the input 'targets' of .*gpt.onnx \(the file has idx\)"):
        load_onnx(path, str(npz))
    np.savez(npz, idx=inputs[0].numpy()[:2], targets=inputs[1].numpy())
    with pytest.raises(OnnxError, match=r"'idx' has shape \[2, 32\], but .* declares \[4,32\]"):
        load_onnx(path, str(npz))


def test_bad_files_and_npz_name_the_fix(tmp_path, capsys):
    """The other ways a SPEC or --inputs file is unusable: each message names the file
    (or array) and what to do; the CLI prints it and exits 2."""
    with pytest.raises(OnnxError, match=r"SPEC '.*nowhere.onnx': no such file .*Check the path"):
        load_onnx(str(tmp_path / "nowhere.onnx"))
    empty = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "empty", [], [])), empty)
    with pytest.raises(OnnxError, match=r"empty.onnx is not an ONNX model \(no graph nodes\)"):
        load_onnx(str(empty))
    p = tiny_model(tmp_path / "t.onnx")
    junk = tmp_path / "junk.npz"
    junk.write_text("not numpy")
    with pytest.raises(OnnxError, match=r"--inputs .*junk.npz is not a .npz file.*numpy.savez"):
        load_onnx(p, str(junk))
    extra = tmp_path / "extra.npz"
    np.savez(extra, x=np.ones((4, 8), np.float32), y=np.ones(3))
    with pytest.raises(OnnxError, match=r"arrays y name no input of .*t.onnx \(its inputs: x\)"):
        load_onnx(p, str(extra))
    assert main(["ir", p, "--inputs", str(extra)]) == 2
    assert "name no input" in capsys.readouterr().err


def test_dynamic_dims_need_inputs(tmp_path, capsys):
    p = tiny_model(tmp_path / "dyn.onnx", dim="batch")
    with pytest.raises(OnnxError, match=r"input 'x' has dynamic dims \(batch\).*--inputs FILE.npz"):
        load_onnx(p)
    assert main(["ir", p]) == 2                              # one paragraph, exit 2
    assert "dynamic dims" in capsys.readouterr().err
    npz = tmp_path / "dyn.npz"
    np.savez(npz, x=np.ones((3, 8), np.float32))            # the batch comes from the file
    module, (x,), _ = load_onnx(p, str(npz))
    assert x.shape == (3, 8) and module.graph.inputs[0].shape == (3, 8)


def test_unsupported_node_is_opaque_and_replicated(tmp_path):
    p = tiny_model(tmp_path / "odd.onnx", extra_op="Round")
    with pytest.warns(UserWarning, match=r"ONNX node 'odd_node' \(Round, module root\).*opaque"):
        module, inputs, _ = load_onnx(p)
    graph = prepared_graph(module, inputs, "odd")
    assert [n.op for n in graph.nodes][:2] == ["onnx.Round", "linear"]
    err, scale = max_abs_error(module, graph, inputs)
    assert err <= 1e-6 * max(scale, 1.0)
    module(*inputs).backward()                           # the weight after it still trains
    (w,) = [p for p in module.parameters()]
    assert w.shape == (8, 8) and w.grad is not None and w.grad.abs().sum() > 0
    assert "w -> w_t (transposed)" in str(graph)


def opaque_mlp(path, *, on_hidden=False):
    """softplus(x) @ w1 -> relu -> @ w2 -> mean, Softplus being an op the lowering does
    not know; `on_hidden`: softplus after the first matmul instead, so w1's gradient
    would have to pass through it."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((0.1 * rng.standard_normal((128, 256))).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((0.1 * rng.standard_normal((256, 128))).astype(np.float32), "w2")
    mk = helper.make_node
    if on_hidden:
        head = [mk("MatMul", ["x", "w1"], ["h"], name="fc1"), mk("Softplus", ["h"], ["h2"], name="odd_node"),
                mk("Relu", ["h2"], ["r"], name="relu")]
    else:
        head = [mk("Softplus", ["x"], ["xo"], name="odd_node"), mk("MatMul", ["xo", "w1"], ["h"], name="fc1"),
                mk("Relu", ["h"], ["r"], name="relu")]
    nodes = head + [mk("MatMul", ["r", "w2"], ["y"], name="fc2"),
                    mk("ReduceMean", ["y"], ["loss"], keepdims=0, name="mean")]
    g = helper.make_graph(nodes, "opaque", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128])],
                          [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], initializer=[w1, w2])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), path)
    return str(path)


def test_gradient_through_an_opaque_node_is_refused(tmp_path, capsys):
    """No gradient flows through ONNX's reference implementation: a parameter that would
    train through the node is refused when the file is read, naming node, op and
    parameter, instead of training silently wrong or failing inside a rank."""
    p = opaque_mlp(tmp_path / "odd_hidden.onnx", on_hidden=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OnnxError, match=r"node 'odd_node' \(Softplus, module root\) has no lowering "
                                             r"and no gradient, but the parameter 'w1_t' before it"):
            load_onnx(p)
        assert main(["plan", p, "--mesh", "dp=2"]) == 2
    assert "no gradient" in capsys.readouterr().err


# ---- one multi-rank run ---------------------------------------------------------------------------

def test_run_check_gpt_torch_backend(exported, capsys):
    """Under 1.1 MB per device the plan shards the work over tp (row-parallel sums, their
    all-reduces on tp), so the check compares a real parallel program with the single-device
    run of the lowered graph. (At 2 MiB a replica with recompute fits, and the plan divides
    no work over tp.)"""
    path, npz, _, _ = exported("gpt")
    code = main(["run", path, "--inputs", npz, "--mesh", "dp=2,tp=2", "--memory", "1.1MB",
                 "--steps", "3", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert out.splitlines()[-1].startswith("check: ok"), out[-3000:]
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("  all_")
            or line.startswith("  reduce_scatter")]
    assert any(r.startswith("all_reduce:tp") for r in rows), rows      # row-parallel sums
    ref = onnx_loss(path, npz)
    single = next(line for line in out.splitlines() if line.startswith("single device: "))
    assert abs(float(single.split()[2].rstrip(",")) - ref) <= 1e-5 * ref   # printed to 6 digits


def test_unoptimized_export_lowers_the_same(tmp_path, exported):
    """`optimize=False` keeps every state-dict name, `Transpose` nodes on the weights and
    the shape arithmetic (Shape, CastLike, Trilu, Where...) that the default folds: it
    lowers to the same ops, the attention fused, the tie kept."""
    _, npz, model, inputs = exported("gpt")
    path = tmp_path / "gpt_plain.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=True, optimize=False)
    module, example, _ = load_onnx(str(path), npz)
    graph = prepared_graph(module, example, "gpt")
    err, scale = max_abs_error(module, graph, example)
    assert err <= 1e-6 * max(scale, 1.0)
    names = set(module.state_dict())
    assert names == set(model.state_dict()) - {"transformer.wte.weight"}   # tied: one tensor
    assert sum(n.op == "scaled_dot_product_attention" for n in graph.nodes) == 2
    assert not any(n.op.startswith("onnx.") or n.op == "matmul" for n in graph.nodes)


@pytest.mark.parametrize("opset", [17, 18, 23])
def test_hand_built_graph_covers_the_op_list(tmp_path, opset):
    """A graph of the listed ops (ReduceMean's axes an attribute before opset 18, an input
    from 18 on) lowers without opaque nodes, matches ReferenceEvaluator and trains."""
    rng = np.random.default_rng(1)

    def init(name, shape, dtype=np.float32):
        a = rng.standard_normal(shape).astype(dtype) if dtype == np.float32 else np.array(shape, dtype)
        return numpy_helper.from_array(a, name)
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    axes_in = opset >= 18
    mk = helper.make_node
    nodes = [
        mk("Gemm", ["x", "w1", "b1"], ["h"], transB=0),                       # [6,16]
        mk("LayerNormalization", ["h", "g", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        mk("Erf", ["ln"], ["e"]), mk("Tanh", ["e"], ["t"]), mk("Relu", ["t"], ["r"]),
        mk("Sigmoid", ["ln"], ["s"]), mk("Add", ["r", "s"], ["a"]),
        mk("Split", ["a", "two"], ["p", "q"], axis=1),                         # [6,8] x2
        mk("Concat", ["q", "p"], ["c"], axis=1),
        mk("Unsqueeze", ["c", "ax0"], ["u"]),
        mk("Expand", ["u", "shape3"], ["ex"]),                                 # [2,6,16]
        mk("Slice", ["ex", "st", "en", "axs"], ["sl"]),                        # [2,6,8]
        mk("Transpose", ["sl"], ["tr"], perm=[0, 2, 1]),                       # [2,8,6]
        mk("MatMul", ["tr", "w2"], ["m"]),                                     # [2,8,4]
        mk("Softmax", ["m"], ["sm"], axis=-1),
        mk("Cast", ["mask"], ["maskf"], to=TensorProto.BOOL),
        mk("Where", ["maskf", "sm", "zero"], ["wh"]),
        mk("Sub", ["wh", "half"], ["d"]), mk("Pow", ["d", "two_f"], ["sq"]),
        mk("Sqrt", ["sq"], ["rt"]), mk("Div", ["rt", "three"], ["dv"]),
        mk("Reshape", ["dv", "flat"], ["fl"]),                                 # [16,4]
        mk("Squeeze", ["u", "ax0"], ["sqz"]),
        mk("ReduceSum", ["sqz", "ax1"], ["rs"], keepdims=0),                   # [6]
        mk("Gather", ["rs", "idx0"], ["g0"], axis=0),                          # scalar
        mk("ReduceMean", ["fl", "ax01"] if axes_in else ["fl"], ["mean"], keepdims=0,
           **({} if axes_in else {"axes": [0, 1]})),
        mk("Mul", ["g0", "small"], ["g1"]), mk("Add", ["mean", "g1"], ["loss"]),
    ]
    inits = [init("w1", (12, 16)), init("b1", (16,)), init("g", (16,)), init("beta", (16,)),
             ints("two", [8, 8]), ints("ax0", [0]), ints("shape3", [2, 6, 16]),
             ints("st", [4]), ints("en", [12]), ints("axs", [2]), init("w2", (6, 4)),
             numpy_helper.from_array((rng.random((2, 8, 4)) > 0.3).astype(np.float32), "mask"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two_f"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array(0.01, np.float32), "small"),
             ints("flat", [16, 4]), ints("ax1", [1]), ints("idx0", 2), ints("ax01", [0, 1])]
    g = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 12])],
                          [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])], initializer=inits)
    path = tmp_path / f"ops{opset}.onnx"
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    module, inputs, _ = load_onnx(str(path))
    graph = prepared_graph(module, inputs, "ops")
    assert not [n.op for n in graph.nodes if n.op.startswith("onnx.")]
    err, scale = max_abs_error(module, graph, inputs)
    assert err <= 1e-6 * max(scale, 1.0), (err, scale)
    assert {"linear", "layer_norm", "softmax", "cat", "split", "where.self", "expand",
            "slice", "transpose", "sum.dim_IntList", "select"} <= {n.op for n in graph.nodes}
    # the 0/1 float table read only as booleans is a constant, not a weight
    assert sorted(module.state_dict()) == ["b1", "beta", "g", "w1_t", "w2_t"]
    module(*inputs).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_program_runs_an_opaque_node(tmp_path, capsys):
    """An op the lowering does not know runs in the generated program through
    `compiler/onnx_node.py` (ONNX's reference implementation, on the replicated
    input), under a plan that shards the layers after it: `run --check` matches the
    single-device run, which evaluates the node the same way."""
    p = opaque_mlp(tmp_path / "odd_mlp.onnx")
    out_dir = tmp_path / "prog"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["run", p, "--mesh", "dp=2", "--memory", "700KiB", "--steps", "2", "--check",
                     "-o", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert out.splitlines()[-1].startswith("check: ok"), out[-3000:]
    assert any(line.startswith("  reduce_scatter:dp") for line in out.splitlines()), out[-2000:]
    (prog,) = out_dir.glob("*.py")
    text = prog.read_text()
    assert "from autopar.compiler import onnx_node" in text
    assert "onnx_node.run('Softplus', [x], {}, optional=(True,), n_outputs=1, opset=20)" in text
