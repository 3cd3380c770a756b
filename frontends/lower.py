"""Lowering: a traced torch.fx graph (ATen from torch.export, or torch-level from
`torch.fx.symbolic_trace`) becomes an autopar `Graph`.

Both front ends end in the same IR: ATen overloads bound to their schema, tensors as
operands, everything else as named attributes, shapes from the tracer's metadata, module
paths from `nn_module_stack` (export) or the calling module (fx).
"""
from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autopar.compiler.errors import UserError
from autopar.compiler.ir import Graph, Node, NodeMeta, SymInt, Value
from autopar.compiler.ops import TENSOR, OpDef, functional_target, opdef_for_target, warn_opaque

aten = torch.ops.aten


class LoweringError(UserError):
    """A traced op autopar cannot represent; the message names the op, module and fix."""


def size_of(s) -> int:
    """A traced size as an int: a symbolic size (tracing with symbolic sizes) becomes a
    `SymInt`, its example value carrying its expression."""
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            raise LoweringError(f"dynamic size {s} has no example value: trace with concrete example inputs")
        return SymInt(int(hint), str(s.node.expr))
    return int(s)


def _shape_of(val) -> tuple[tuple[int, ...], torch.dtype]:
    try:
        return tuple(size_of(s) for s in val.shape), val.dtype
    except TypeError as e:
        raise LoweringError(f"dynamic shape {tuple(val.shape)}: autopar plans static shapes; "
                            "trace with concrete example inputs") from e


def tensor_groups(model: nn.Module) -> dict[int, list[str]]:
    """Tensor id -> every state-dict name that refers to it (tied weights share one id)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    for name, t in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(t), []).append(name)
    return groups


class Builder:
    """Shared state of both lowerings: value naming, params, aliases, emitted nodes."""

    def __init__(self, name: str, model: nn.Module):
        self.name = name
        self.model = model
        self.env: dict[fx.Node, Any] = {}
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.params: list[Value] = []
        self.param_by_name: dict[str, Value] = {}
        self.aliases: dict[str, str] = {}
        self.used_names: set[str] = set()
        self.constants: dict[str, torch.Tensor] = {}
        self.input_sizes: dict[str, tuple] = {}
        self.notes: list[str] = []
        sd_names = tensor_groups(model)
        self.canonical: dict[str, str] = {}
        for names in sd_names.values():
            for n in names:
                self.canonical[n] = names[0]
        self.param_tensors = dict(model.named_parameters(remove_duplicate=False))
        self.buffer_tensors = dict(model.named_buffers(remove_duplicate=False))

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def param(self, target: str, kind: str, shape=None, dtype=None) -> Value:
        canon = self.canonical.get(target, target)
        if canon != target:
            self.aliases[target] = canon
        if canon in self.param_by_name:
            return self.param_by_name[canon]
        t = self.param_tensors.get(canon, self.buffer_tensors.get(canon))
        if t is None:
            t = self.constants.get(canon)
        if kind == "param" and t is not None and not isinstance(t, nn.Parameter):
            kind = "buffer"
        v = Value(canon, tuple(t.shape) if t is not None else shape,
                  t.dtype if t is not None else dtype, kind,
                  bool(kind == "param" and t is not None and t.requires_grad))
        self.used_names.add(canon)
        self.param_by_name[canon] = v
        self.params.append(v)
        return v

    def emit(self, d: OpDef, fxn: fx.Node, args: list, kwargs: dict, module: str) -> None:
        """Bind (args, kwargs) to `d`'s schema and append the node."""
        inputs: list[Value] = []
        attrs: list[tuple[str, Any]] = []
        for i, a in enumerate(d.args):
            given = i < len(args) and not a.kwarg_only
            if given:
                v = args[i]
            elif a.name in kwargs:
                v = kwargs[a.name]
            else:
                v = a.default
                if a.kind == "opt_tensor":
                    if v is None:
                        attrs.append((a.name, None))
                    continue
                if a.kind in ("tensor", "tensor_list"):
                    raise LoweringError(f"{d.name}: missing tensor argument {a.name}")
                continue
            if a.kind == "tensor" and not isinstance(v, (fx.Node, Value)):
                attrs.append((a.name, v))            # a python scalar in a Tensor slot
            elif a.kind == "tensor":
                inputs.append(self.value(v, fxn, d))
            elif a.kind == "tensor_list":
                inputs.extend(self.value(x, fxn, d) for x in v if x is not None)
                if any(x is None for x in v):    # `x[:, idx]`: where the operands go
                    attrs.append((a.name, [None if x is None else TENSOR for x in v]))
            elif a.kind == "opt_tensor":
                if v is None:
                    attrs.append((a.name, None))
                else:
                    inputs.append(self.value(v, fxn, d))
            else:
                attrs.append((a.name, self.const(v, fxn, d)))
        val = fxn.meta.get("val", fxn.meta.get("tensor_meta"))
        multi = isinstance(val, (list, tuple)) and not hasattr(val, "shape")
        vals = list(val) if multi else [val]
        outs = []
        for k, t in enumerate(vals):
            shape, dtype = _shape_of(t)
            outs.append(Value(self.fresh(fxn.name if len(vals) == 1 else f"{fxn.name}_{k}"),
                              shape, dtype))
        node = Node(d.name, tuple(inputs), tuple(attrs), tuple(outs),
                    NodeMeta(module, fxn.name, user_line(fxn)))
        try:                         # the interpreter and the programs rebuild this call
            d.bind(list(inputs), dict(attrs))
        except (ValueError, IndexError, StopIteration) as e:
            raise LoweringError(f"{d.name} at {fxn.name} (module {module or 'root'}): its call "
                                f"cannot be rebuilt from the traced arguments ({e}); rewrite "
                                "that line with another op, or add it to compiler/ops.py") from e
        warn_opaque(d, f"from {module or 'the root module'}")
        self.nodes.append(node)
        self.env[fxn] = outs if multi else outs[0]

    def emit_op(self, target, args: list, kwargs: dict, name: str, module: str):
        """Append one ATen op whose operands are already IR Values; output shapes come
        from running the op on `meta` tensors. Returns the output Value(s)."""
        d = opdef_for_target(target)

        def meta(a):
            if isinstance(a, Value):
                return torch.empty(a.shape, dtype=a.dtype, device="meta")
            if isinstance(a, (list, tuple)):
                return type(a)(meta(x) for x in a)
            return a
        kw = dict(kwargs)
        if "device" in {a.name for a in d.args}:
            kw["device"] = "meta"
        try:
            val = target(*[meta(a) for a in args], **{k: meta(v) for k, v in kw.items()})
        except Exception as e:
            raise LoweringError(f"{d.name} at {name} (module {module or 'root'}): "
                                f"{type(e).__name__}: {e}") from e
        fake = _Stub(name, val)
        if "device" in kwargs or "device" in kw:
            kwargs = {**kwargs, "device": torch.device("cpu")} if "device" in kw else kwargs
        self.emit(d, fake, args, kwargs, module)
        return self.env.pop(fake)

    def value(self, v, fxn: fx.Node, d: OpDef) -> Value:
        if isinstance(v, Value):
            return v
        if isinstance(v, fx.Node):
            out = self.env[v]
            if isinstance(out, Value):
                return out
        raise LoweringError(f"{d.name} at {fxn.name}: expected a tensor operand, got {v!r}")

    def const(self, v, fxn: fx.Node, d: OpDef):
        if isinstance(v, fx.Node):
            out = self.env.get(v)
            if isinstance(out, (int, float, bool)):
                return out
            raise LoweringError(
                f"{d.name} at {fxn.name}: an argument depends on a traced value ({v.name}); "
                "autopar needs it constant at trace time")
        if isinstance(v, (list, tuple)):
            return type(v)(self.const(x, fxn, d) for x in v)
        return v

    def graph(self, outputs: list[Value]) -> Graph:
        return Graph(self.name, self.inputs, self.params, self.nodes, outputs, self.aliases,
                     notes=list(self.notes), constants=self.constants, input_sizes=self.input_sizes)


def user_line(fxn) -> str:
    """The innermost line of the user's code in a traced node's stack (torch's own frames
    skipped): what the generated program names the node's outputs after."""
    trace = getattr(fxn, "meta", {}).get("stack_trace") or ""
    lines = trace.splitlines()
    for i in range(len(lines) - 1, 0, -1):
        head = lines[i - 1].strip()
        if head.startswith("File ") and f"{os.sep}torch{os.sep}" not in head:
            return lines[i].strip()
    return ""


class _Stub:
    """Stands in for an fx node when one fx call lowers to several ATen ops."""

    def __init__(self, name, val):
        self.name, self.meta = name, {"val": val}


def module_path(fxn: fx.Node) -> str:
    stack = fxn.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return clean_path(path)


def clean_path(path: str) -> str:
    """`L['self'].transformer.h[0]` / `transformer.h.0` -> `transformer.h.0`."""
    import re
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def lower_export(ep: "torch.export.ExportedProgram", model: nn.Module, name: str) -> Graph:
    """Lower an exported program (ATen training IR) to autopar's IR."""
    from torch.export.graph_signature import InputKind, OutputKind
    b = Builder(name, model)
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR:
            b.constants[spec.target] = ep.constants[spec.target]
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    for fxn, spec in zip(placeholders, ep.graph_signature.input_specs):
        shape, dtype = _shape_of(fxn.meta["val"])
        if spec.kind == InputKind.USER_INPUT:
            v = Value(b.fresh(fxn.name), shape, dtype, "input")
            b.inputs.append(v)
            b.env[fxn] = v
            b.input_sizes[v.name] = tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else int(d)
                                          for d in fxn.meta["val"].shape)
        elif spec.kind == InputKind.PARAMETER:
            b.env[fxn] = b.param(spec.target, "param", shape, dtype)
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            b.env[fxn] = b.param(spec.target, "buffer", shape, dtype)
        else:
            raise LoweringError(f"unsupported exported input kind {spec.kind} ({fxn.name})")
    for fxn in ep.graph.nodes:
        if fxn.op == "call_function":
            _lower_call(b, ep.graph_module, fxn, module_path(fxn))
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = []
    for arg, spec in zip(out_node.args[0], ep.graph_signature.output_specs):
        if spec.kind == OutputKind.USER_OUTPUT:
            v = b.env[arg]
            if not isinstance(v, Value):
                raise LoweringError(f"model output {spec} is not a tensor")
            outs.append(v)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            raise LoweringError(
                f"forward mutates buffer '{spec.target}' (e.g. BatchNorm running stats); "
                "autopar plans pure training steps: use eval-mode norms or LayerNorm")
    return b.graph(outs)


def _lower_call(b: Builder, gm: fx.GraphModule, fxn: fx.Node, module: str) -> None:
    """One call_function node of an exported graph (ATen op, getitem, or a grad-mode region)."""
    t = fxn.target
    if isinstance(fxn.meta.get("val"), torch.SymInt):
        b.env[fxn] = size_of(fxn.meta["val"])      # size arithmetic: a SymInt attribute
        return
    if t is operator.getitem:
        src = b.env[fxn.args[0]]
        b.env[fxn] = src[fxn.args[1]]
        return
    if isinstance(t, torch._ops.OpOverload):
        if t in (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                 aten.sym_constrain_range_for_size.default) or fxn.meta.get("val", 1) is None:
            return                       # runtime checks with no tensor result
        if t is aten.cat.default and _drop_empty_cat_operands(b, fxn):
            return
        if functional_target(t) is not None:
            _lower_inplace(b, functional_target(t), fxn, module)
        elif t is aten.addmm.default and fxn.kwargs.get("beta", 1) == 1 and fxn.kwargs.get("alpha", 1) == 1:
            # HF Conv1D: bias + x @ W as mm then add, so the contraction can split into
            # partial sums with the bias added once, after the reduction (row parallel)
            bias, x, w = (b.value(a, fxn, opdef_for_target(t)) for a in fxn.args[:3])
            y = b.emit_op(aten.mm.default, [x, w], {}, f"{fxn.name}_mm", module)
            b.env[fxn] = b.emit_op(aten.add.Tensor, [y, bias], {}, fxn.name, module)
        else:
            b.emit(opdef_for_target(t), fxn, list(fxn.args), dict(fxn.kwargs), module)
        return
    if t is torch.ops.higher_order.wrap_with_set_grad_enabled:
        _inline_grad_region(b, gm, fxn, module)
        return
    raise LoweringError(
        f"'{t}' at {fxn.name} (module {module or 'root'}) is not an ATen op; "
        "autopar lowers ATen graphs only. Avoid data-dependent control flow in forward.")


def _aliases(fxn) -> bool:
    """Whether an fx node's result may share memory with an operand (views, no-op `to`)."""
    schema = getattr(getattr(fxn, "target", None), "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


_SCATTER = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}


def _lower_inplace(b: Builder, functional, fxn: fx.Node, module: str) -> None:
    """`x.div_(y)`, `x[idx] = v` (index_put_), `x[..., 1:] = y` (slice + copy_): the
    out-of-place op, and later uses of `x` read its result; an update through a slice or
    select of `x` becomes slice_scatter / select_scatter into `x`. Exact unless memory is
    shared otherwise -- a view of `x` read after the update, a view of a view, an input or
    parameter updated: those are refused by name."""
    d = opdef_for_target(functional)
    target = fxn.args[0]
    where = f"{fxn.target} at {fxn.name} (module {module or 'root'})"
    pos = {n: i for i, n in enumerate(fxn.graph.nodes)}

    def read_later(node, but=()):
        """A view of `node` (other than `but`) that something reads after this update."""
        for u in node.users:
            if u is not fxn and u not in but and _aliases(u) and pos.get(u, -1) < pos[fxn] and \
                    any(pos.get(w, -1) > pos[fxn] for w in u.users):
                return u
        return None

    def check(node):
        v = b.value(node, fxn, d)
        if v.kind != "act":
            raise LoweringError(f"{where} updates {v.kind} %{v.name} in place; autopar plans "
                                "pure steps: compute a new tensor instead (out-of-place op)")
        u = read_later(node, but=(target,))
        if u is not None:
            raise LoweringError(f"{where} updates %{v.name} while its view {u.name} is read "
                                "later (it would see the update); use out-of-place ops there")
        return v
    base = None
    if _aliases(target):
        base = target.args[0]
        if target.target not in _SCATTER or _aliases(base):
            raise LoweringError(f"{where} updates the result of {target.target} in place; autopar "
                                "can write back through one slice or select only. Use "
                                "out-of-place ops (torch.where, cat) there")
        check(base)
    check(target)
    b.emit(d, fxn, list(fxn.args), dict(fxn.kwargs), module)
    new = b.env[fxn]
    if base is not None:
        rest = list(target.args[1:])
        bv = b.value(base, fxn, d)
        b.env[base] = b.emit_op(_SCATTER[target.target], [bv, new, *rest], {},
                                f"{fxn.name}_scatter", module)
    b.env[target] = new


def _inline_grad_region(b: Builder, owner: nn.Module, fxn: fx.Node, module: str) -> None:
    """`wrap_with_set_grad_enabled(enabled, submod, *operands)`: torch.export's wrapper of a
    `torch.no_grad()` block (Hugging Face rotary embeddings compute cos/sin in one). Its ops
    are lowered in place; a no-grad region's outputs get a `detach`, which is what makes
    them constants of the backward in eager mode too."""
    enabled, sub, *operands = fxn.args
    gm = getattr(owner, sub.target)
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph, a in zip(places, operands):
        b.env[ph] = b.env[a] if isinstance(a, fx.Node) else a
    for n in gm.graph.nodes:
        if n.op == "call_function":
            _lower_call(b, gm, n, module_path(n) or module)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    results = [b.env[o] if isinstance(o, fx.Node) else o for o in out]
    if not enabled:
        results = [b.emit_op(aten.detach.default, [v], {}, b.fresh(f"{v.name}_nograd"), module)
                   if isinstance(v, Value) and v.dtype.is_floating_point else v for v in results]
    b.env[fxn] = results


def _drop_empty_cat_operands(b: Builder, fxn: fx.Node) -> bool:
    """torch.cat skips 1-D empty operands whatever the others' rank (a Hugging Face
    DynamicCache starts as `torch.tensor([])` and is concatenated with the first keys).
    Drops them; when a single operand is left the cat is that operand (returns True)."""
    tensors, *rest = fxn.args
    vals = [b.env[t] for t in tensors]
    rank = len(_shape_of(fxn.meta["val"])[0])
    kept = [t for t, v in zip(tensors, vals) if not (rank != 1 and v.shape == (0,))]
    if len(kept) == len(tensors) or not kept:
        return False
    if len(kept) == 1:
        b.env[fxn] = b.env[kept[0]]
        return True
    fxn.args = (kept, *rest)
    return False


# ---- torch.fx.symbolic_trace front end ---------------------------------------------------
#
# fx records torch-level calls (modules, torch functions, tensor methods). Each maps to
# one or a few ATen overloads; output shapes come from running those on `meta` tensors.

_FUNCS = {
    operator.add: aten.add.Tensor, operator.sub: aten.sub.Tensor, operator.mul: aten.mul.Tensor,
    operator.truediv: aten.div.Tensor, operator.neg: aten.neg.default,
    operator.matmul: aten.matmul.default, operator.lt: aten.lt.Tensor, operator.gt: aten.gt.Tensor,
    torch.add: aten.add.Tensor, torch.sub: aten.sub.Tensor, torch.mul: aten.mul.Tensor,
    torch.div: aten.div.Tensor, torch.matmul: aten.matmul.default, torch.bmm: aten.bmm.default,
    torch.tanh: aten.tanh.default, torch.exp: aten.exp.default, torch.rsqrt: aten.rsqrt.default,
    torch.sigmoid: aten.sigmoid.default, torch.cat: aten.cat.default, torch.relu: aten.relu.default,
    torch.zeros_like: aten.zeros_like.default, torch.ones_like: aten.ones_like.default,
    torch.where: aten.where.self, torch.transpose: aten.transpose.int, torch.neg: aten.neg.default,
    torch.sin: aten.sin.default, torch.cos: aten.cos.default, torch.stack: aten.stack.default,
    F.relu: aten.relu.default, F.gelu: aten.gelu.default, F.silu: aten.silu.default,
    F.linear: aten.linear.default, F.embedding: aten.embedding.default,
    F.scaled_dot_product_attention: aten.scaled_dot_product_attention.default,
    F.dropout: aten.dropout.default, F.layer_norm: aten.layer_norm.default,
}
_METHODS = {
    "view": aten.view.default, "reshape": aten.reshape.default, "transpose": aten.transpose.int,
    "permute": aten.permute.default, "contiguous": aten.contiguous.default,
    "split": aten.split.Tensor, "pow": aten.pow.Tensor_Scalar, "mean": aten.mean.dim,
    "sum": aten.sum.dim_IntList, "exp": aten.exp.default, "tanh": aten.tanh.default,
    "softmax": aten.softmax.int, "relu": aten.relu.default, "neg": aten.neg.default,
    "unsqueeze": aten.unsqueeze.default, "flatten": aten.flatten.using_ints,
    "expand": aten.expand.default, "t": aten.t.default, "masked_fill": aten.masked_fill.Scalar,
    "type_as": aten.type_as.default, "sqrt": aten.sqrt.default, "rsqrt": aten.rsqrt.default,
    "add": aten.add.Tensor, "mul": aten.mul.Tensor, "sub": aten.sub.Tensor, "div": aten.div.Tensor,
    "matmul": aten.matmul.default, "chunk": aten.chunk.default, "squeeze": aten.squeeze.dim,
}
_VARARG_METHODS = {"view", "reshape", "permute", "expand"}
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}
_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "long": torch.int64, "int": torch.int32, "bool": torch.bool, "double": torch.float64}


def _module_call(b: Builder, mod: nn.Module, path: str, x):
    """(aten overload, args, kwargs) for a leaf module call."""
    def p(name):
        return b.param(f"{path}.{name}" if path else name, "param") \
            if getattr(mod, name, None) is not None else None
    if isinstance(mod, nn.Linear):
        return aten.linear.default, [x, p("weight"), p("bias")], {}
    if isinstance(mod, nn.LayerNorm):
        return aten.layer_norm.default, [x, list(mod.normalized_shape), p("weight"), p("bias"), mod.eps], {}
    if isinstance(mod, nn.Embedding):
        return aten.embedding.default, [p("weight"), x], {}
    if isinstance(mod, nn.GELU):
        return aten.gelu.default, [x], {"approximate": mod.approximate}
    if isinstance(mod, nn.Dropout):
        return aten.dropout.default, [x, mod.p, mod.training], {}
    if isinstance(mod, nn.Softmax):
        return aten.softmax.int, [x, mod.dim], {}
    simple = {nn.ReLU: aten.relu.default, nn.SiLU: aten.silu.default, nn.Tanh: aten.tanh.default,
              nn.Sigmoid: aten.sigmoid.default, nn.Identity: aten.alias.default}
    for cls, op in simple.items():
        if type(mod) is cls:
            return op, [x], {}
    raise LoweringError(
        f"fx front end: module '{path}' of type {type(mod).__name__} has no lowering; "
        "use trace='export' (the default), which handles any module")


def _index(b: Builder, x: Value, idx, name: str, module: str) -> Value:
    """`x[:, None, 2:5, 0]` as unsqueeze/slice/select ops."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        fill = len(x.shape) - (len(idx) - 1 - sum(i is None for i in idx))
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    d, step = 0, 0
    for i in idx:
        step += 1
        nm = f"{name}_{step}"
        if i is None:
            x = b.emit_op(aten.unsqueeze.default, [x, d], {}, nm, module)
            d += 1
        elif isinstance(i, slice):
            if i != slice(None):
                x = b.emit_op(aten.slice.Tensor, [x, d, i.start, i.stop, i.step or 1], {}, nm, module)
            d += 1
        elif isinstance(i, int):
            x = b.emit_op(aten.select.int, [x, d, i], {}, nm, module)
        else:
            raise LoweringError(f"fx front end: tensor index {i!r} at {name}; use trace='export'")
    return x


def lower_fx(gm: fx.GraphModule, model: nn.Module, example_inputs, name: str) -> Graph:
    """Lower a `torch.fx.symbolic_trace` graph (works on `meta` models too)."""
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example_inputs)
    b = Builder(name, model)
    modules = dict(gm.named_modules())

    def resolve(a):
        if isinstance(a, fx.Node):
            return b.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(x) for x in a)
        if isinstance(a, slice):
            return slice(resolve(a.start), resolve(a.stop), resolve(a.step))
        return a

    for fxn in gm.graph.nodes:
        if fxn.op == "placeholder":
            shape, dtype = _shape_of(fxn.meta["tensor_meta"])
            v = Value(b.fresh(fxn.name), shape, dtype, "input")
            b.inputs.append(v)
            b.env[fxn] = v
            continue
        if fxn.op == "get_attr":
            b.env[fxn] = b.param(fxn.target, "param")
            continue
        if fxn.op == "output":
            return b.graph([_fx_loss(b, fxn.args[0])])
        args, kwargs = resolve(list(fxn.args)), resolve(dict(fxn.kwargs))
        caller = fxn.meta.get("nn_module_stack")
        path = clean_path(list(caller.values())[-1][0]) if caller else ""
        result = _lower_fx_call(b, fxn, modules, args, kwargs, path)
        b.env[fxn] = result
    raise LoweringError("fx graph has no output node")


def _fx_loss(b: Builder, out) -> Value:
    """The loss among fx's outputs, by the rule of `compiler.interpret.loss_of` (the scalar,
    the first of a tuple, the "loss" of a dict); a note says what was dropped."""
    from collections.abc import Mapping
    what = "it"
    if isinstance(out, (list, tuple)) and out:
        picked, what = out[0], "its first element"
        if len(out) > 1:
            b.notes.append(f"model output: the loss is element 0 of a {type(out).__name__} of "
                           f"{len(out)}; dropped the rest")
    elif isinstance(out, Mapping) and "loss" in out:
        picked, what = out["loss"], 'its "loss" entry'
        if len(out) > 1:
            b.notes.append(f'model output: the loss is the "loss" entry of a dict; dropped '
                           f'{", ".join(str(k) for k in out if k != "loss")}')
    else:
        picked = out
    v = b.env.get(picked) if isinstance(picked, fx.Node) else None
    if not isinstance(v, Value) or v.shape != () or not v.dtype.is_floating_point:
        shown = f"a tensor of shape {list(v.shape)}" if isinstance(v, Value) else type(out).__name__
        raise LoweringError(f"the model's forward returned {shown} ({what}); autopar trains the "
                            "scalar loss forward returns: return it alone, first in a tuple, or "
                            'as the "loss" entry of a dict')
    return v


def _lower_fx_call(b: Builder, fxn: fx.Node, modules, args, kwargs, path):
    """One fx call -> the IR value(s) (or a python value for size/shape queries)."""
    nm = b.fresh(fxn.name)
    b.used_names.discard(nm)
    if fxn.op == "call_module":
        target, a, k = _module_call(b, modules[fxn.target], fxn.target, args[0])
        return b.emit_op(target, a, k, nm, fxn.target)
    if fxn.op == "call_method":
        m, self_ = fxn.target, args[0]
        if m == "size":
            return self_.shape if len(args) == 1 else self_.shape[args[1]]
        if m == "dim":
            return len(self_.shape)
        if m in _DTYPE_METHODS or m == "to":
            dtype = _DTYPE_METHODS.get(m) or next(
                (a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)), None)
            if dtype is None:
                return self_                         # .to(device): nothing to do here
            return b.emit_op(aten.to.dtype, [self_, dtype], {}, nm, path)
        if m not in _METHODS:
            raise LoweringError(f"fx front end: method '.{m}()' at {fxn.name} has no lowering; "
                                "use trace='export'")
        if m in _VARARG_METHODS and len(args) > 1 and not isinstance(args[1], (list, tuple)):
            args = [args[0], list(args[1:])]
        if m in ("mean", "sum") and len(args) > 1 and not isinstance(args[1], (list, tuple)):
            args[1] = [args[1]]
        if m == "softmax" and "dim" in kwargs:
            args = [args[0], kwargs.pop("dim")]
        return _binop(b, _METHODS[m], args, kwargs, nm, path)
    f = fxn.target
    if f is getattr:
        v, attr = args
        if attr in ("shape", "dtype", "device"):
            return {"shape": getattr(v, "shape", None), "dtype": getattr(v, "dtype", None),
                    "device": None}[attr]
        raise LoweringError(f"fx front end: attribute .{attr} at {fxn.name}; use trace='export'")
    if f is operator.getitem:
        src, idx = args
        if isinstance(src, (list, tuple)):
            return src[idx]
        return _index(b, src, idx, nm, path)
    if f in (F.mse_loss, F.cross_entropy):
        red = _REDUCTION[kwargs.pop("reduction", "mean")]
        if f is F.mse_loss:
            return b.emit_op(aten.mse_loss.default, args[:2], {"reduction": red}, nm, path)
        return b.emit_op(aten.cross_entropy_loss.default, args[:2] + [kwargs.get("weight")],
                         {"reduction": red, "ignore_index": kwargs.get("ignore_index", -100),
                          "label_smoothing": kwargs.get("label_smoothing", 0.0)}, nm, path)
    if f in (F.softmax, torch.softmax):
        dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
        return b.emit_op(aten.softmax.int, [args[0], dim], {}, nm, path)
    if f is torch.arange:
        kw = {k: v for k, v in kwargs.items() if k in ("dtype",)}
        if len(args) == 1:
            return b.emit_op(aten.arange.default, [args[0]], kw, nm, path)
        return b.emit_op(aten.arange.start, list(args[:2]), kw, nm, path)
    if f in _FUNCS:
        return _binop(b, _FUNCS[f], list(args), kwargs, nm, path)
    raise LoweringError(f"fx front end: function {getattr(f, '__name__', f)} at {fxn.name} "
                        "has no lowering; use trace='export'")


def _binop(b: Builder, target, args, kwargs, nm, path):
    """Binary arithmetic with python scalars on either side."""
    if target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor) \
            and not isinstance(args[0], Value):
        if target in (aten.add.Tensor, aten.mul.Tensor):
            args = [args[1], args[0]]
        elif target is aten.sub.Tensor:
            target, args = aten.rsub.Scalar, [args[1], args[0]]
        else:
            target, args = aten.mul.Tensor, [b.emit_op(aten.reciprocal.default, [args[1]], {},
                                                       nm + "_recip", path), args[0]]
    if target is aten.masked_fill.Scalar and isinstance(args[2] if len(args) > 2 else None, Value):
        target = aten.masked_fill.Tensor
    return b.emit_op(target, args, kwargs, nm, path)
