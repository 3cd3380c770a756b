"""Lowering: a traced torch.fx graph (ATen from torch.export, or torch-level from
`torch.fx.symbolic_trace`) becomes an autopar `Graph`.

Both front ends end in the same IR: ATen overloads bound to their schema, tensors as
operands, everything else as named attributes, shapes from the tracer's metadata, module
paths from `nn_module_stack` (export) or the calling module (fx).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autopar.compiler.ir import Graph, Node, NodeMeta, Value
from autopar.compiler.ops import OpDef, opdef_for_target, warn_opaque

aten = torch.ops.aten


class LoweringError(Exception):
    """A traced op autopar cannot represent; the message names the op, module and fix."""


def _shape_of(val) -> tuple[tuple[int, ...], torch.dtype]:
    try:
        return tuple(int(s) for s in val.shape), val.dtype
    except TypeError as e:   # symbolic sizes
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
                    attrs.append((a.name, None)) if v is None else None
                    continue
                if a.kind in ("tensor", "tensor_list"):
                    raise LoweringError(f"{d.name}: missing tensor argument {a.name}")
                continue
            if a.kind == "tensor" and not isinstance(v, (fx.Node, Value)):
                attrs.append((a.name, v))            # a python scalar in a Tensor slot
            elif a.kind == "tensor":
                inputs.append(self.value(v, fxn, d))
            elif a.kind == "tensor_list":
                inputs.extend(self.value(x, fxn, d) for x in v)
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
                    NodeMeta(module, fxn.name))
        warn_opaque(d, f"from {module or 'the root module'}")
        self.nodes.append(node)
        self.env[fxn] = outs if multi else outs[0]

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
        g = Graph(self.name, self.inputs, self.params, self.nodes, outputs, self.aliases)
        g.constants = self.constants   # type: ignore[attr-defined]
        return g


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
        elif spec.kind == InputKind.PARAMETER:
            b.env[fxn] = b.param(spec.target, "param", shape, dtype)
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            b.env[fxn] = b.param(spec.target, "buffer", shape, dtype)
        else:
            raise LoweringError(f"unsupported exported input kind {spec.kind} ({fxn.name})")
    for fxn in ep.graph.nodes:
        if fxn.op != "call_function":
            continue
        t = fxn.target
        if t is operator.getitem:
            src = b.env[fxn.args[0]]
            b.env[fxn] = src[fxn.args[1]]
            continue
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.name == "aten::_assert_tensor_metadata" or not fxn.meta.get("val", 1) is not None:
                continue
            if t in (aten._assert_scalar.default, aten.sym_constrain_range_for_size.default):
                continue
            b.emit(opdef_for_target(t), fxn, list(fxn.args), dict(fxn.kwargs), module_path(fxn))
            continue
        raise LoweringError(
            f"'{t}' at {fxn.name} (module {module_path(fxn) or 'root'}) is not an ATen op; "
            "autopar lowers ATen graphs only. Avoid data-dependent control flow in forward.")
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


# ---- torch.fx.symbolic_trace front end ---------------------------------------------------

def _module_call(b: Builder, fxn: fx.Node, mod: nn.Module, path: str):
    """(aten overload, args, kwargs) for a leaf module call."""
    x = fxn.args[0] if fxn.args else None
    pv = lambda name: b.param(f"{path}.{name}" if path else name, "param")  # noqa: E731

    def p(name):
        return ("__value__", pv(name)) if getattr(mod, name, None) is not None else None
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
    simple = {nn.ReLU: aten.relu.default, nn.SiLU: aten.silu.default, nn.Tanh: aten.tanh.default,
              nn.Sigmoid: aten.sigmoid.default, nn.Identity: aten.alias.default}
    for cls, op in simple.items():
        if type(mod) is cls:
            return op, [x], {}
    raise LoweringError(
        f"fx front end: module '{path}' of type {type(mod).__name__} has no lowering; "
        "use trace='export' (the default), which handles any module")


_FUNCS = {
    operator.add: aten.add.Tensor, operator.sub: aten.sub.Tensor, operator.mul: aten.mul.Tensor,
    operator.truediv: aten.div.Tensor, operator.neg: aten.neg.default,
    operator.matmul: aten.matmul.default, torch.add: aten.add.Tensor, torch.sub: aten.sub.Tensor,
    torch.mul: aten.mul.Tensor, torch.div: aten.div.Tensor, torch.matmul: aten.matmul.default,
    torch.tanh: aten.tanh.default, torch.exp: aten.exp.default, torch.rsqrt: aten.rsqrt.default,
    torch.sigmoid: aten.sigmoid.default, torch.cat: aten.cat.default, torch.relu: aten.relu.default,
    F.relu: aten.relu.default, F.gelu: aten.gelu.default, F.silu: aten.silu.default,
    F.linear: aten.linear.default, F.scaled_dot_product_attention: aten.scaled_dot_product_attention.default,
    F.dropout: aten.dropout.default, torch.transpose: aten.transpose.int,
}
_METHODS = {
    "view": aten.view.default, "reshape": aten.reshape.default, "transpose": aten.transpose.int,
    "permute": aten.permute.default, "contiguous": aten.contiguous.default,
    "split": aten.split.Tensor, "pow": aten.pow.Tensor_Scalar, "mean": aten.mean.dim,
    "sum": aten.sum.dim_IntList, "exp": aten.exp.default, "tanh": aten.tanh.default,
    "softmax": aten.softmax.int, "relu": aten.relu.default, "neg": aten.neg.default,
    "unsqueeze": aten.unsqueeze.default, "flatten": aten.flatten.using_ints,
    "expand": aten.expand.default, "t": aten.t.default,
}
_VARARG_METHODS = {"view", "reshape", "permute", "expand"}
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _scalar_binop(op, a, bval):
    table = {aten.add.Tensor: aten.add.Tensor, aten.sub.Tensor: aten.sub.Tensor,
             aten.mul.Tensor: aten.mul.Tensor, aten.div.Tensor: aten.div.Tensor}
    return table.get(op, op)


def lower_fx(gm: fx.GraphModule, model: nn.Module, example_inputs, name: str) -> Graph:
    """Lower a `torch.fx.symbolic_trace` graph: shapes by running it once (ShapeProp,
    which also works on `meta` tensors), modules and torch functions mapped to ATen."""
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example_inputs)
    b = Builder(name, model)
    modules = dict(gm.named_modules())

    def resolve(a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "__value__":
            return a[1]
        if isinstance(a, fx.Node):
            return b.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(resolve(x) for x in a)
        return a

    for fxn in gm.graph.nodes:
        tm = fxn.meta.get("tensor_meta")
        if fxn.op == "placeholder":
            shape, dtype = _shape_of(tm)
            v = Value(b.fresh(fxn.name), shape, dtype, "input")
            b.inputs.append(v)
            b.env[fxn] = v
            continue
        if fxn.op == "get_attr":
            b.env[fxn] = b.param(fxn.target, "param")
            continue
        if fxn.op == "output":
            out = fxn.args[0]
            outs = [b.env[o] for o in (out if isinstance(out, (list, tuple)) else [out])]
            return b.graph(outs)
        path = ""
        if fxn.op == "call_module":
            path = fxn.target
            target, args, kwargs = _module_call(b, fxn, modules[fxn.target], path)
        elif fxn.op == "call_method":
            m = fxn.target
            if m == "size" or m == "dim":
                src = b.env[fxn.args[0]]
                b.env[fxn] = (src.shape if len(fxn.args) == 1 else src.shape[fxn.args[1]]) \
                    if m == "size" else len(src.shape)
                continue
            if m not in _METHODS:
                raise LoweringError(f"fx front end: method '.{m}()' at {fxn.name} has no "
                                    "lowering; use trace='export'")
            target = _METHODS[m]
            args, kwargs = list(fxn.args), dict(fxn.kwargs)
            if m in _VARARG_METHODS and len(args) > 1 and not isinstance(args[1], (list, tuple)):
                args = [args[0], list(args[1:])]
            if m in ("mean", "sum") and len(args) > 1 and not isinstance(args[1], (list, tuple)):
                args[1] = [args[1]]
        elif fxn.op == "call_function":
            f = fxn.target
            args, kwargs = list(fxn.args), dict(fxn.kwargs)
            if f is getattr and isinstance(b.env.get(fxn.args[0]), Value) and fxn.args[1] in ("shape", "dtype", "device"):
                v = b.env[fxn.args[0]]
                b.env[fxn] = {"shape": v.shape, "dtype": v.dtype, "device": None}[fxn.args[1]]
                continue
            if f is operator.getitem:
                src = b.env[fxn.args[0]]
                if isinstance(src, (list, tuple)):
                    b.env[fxn] = src[fxn.args[1]]
                    continue
                raise LoweringError(f"fx front end: tensor indexing at {fxn.name}; use trace='export'")
            if f in (F.mse_loss, F.cross_entropy):
                red = _REDUCTION[kwargs.pop("reduction", "mean")]
                target = aten.mse_loss.default if f is F.mse_loss else aten.cross_entropy_loss.default
                args = args[:2] + ([None] if f is F.cross_entropy else [])
                kwargs = {"reduction": red}
            elif f in (F.softmax, torch.softmax):
                target = aten.softmax.int
                kwargs.pop("_stacklevel", None)
                if "dim" in kwargs:
                    args = [args[0], kwargs.pop("dim")]
                kwargs.pop("dtype", None)
            elif f in _FUNCS:
                target = _FUNCS[f]
            else:
                raise LoweringError(f"fx front end: function {getattr(f, '__name__', f)} at "
                                    f"{fxn.name} has no lowering; use trace='export'")
        else:
            raise LoweringError(f"fx front end: node kind {fxn.op} unsupported")
        args = [resolve(a) for a in args]
        kwargs = {k: resolve(v) for k, v in kwargs.items()}
        # python scalars on either side of a binary op
        if target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            if not isinstance(args[0], Value):
                if target in (aten.add.Tensor, aten.mul.Tensor):
                    args = [args[1], args[0]]
                elif target is aten.sub.Tensor:
                    target, args = aten.rsub.Scalar, [args[1], args[0]]
                else:
                    raise LoweringError(f"fx front end: scalar / tensor at {fxn.name}; use trace='export'")
        if not path:
            caller = fxn.meta.get("nn_module_stack")
            path = clean_path(list(caller.values())[-1][0]) if caller else ""
        if "val" not in fxn.meta:
            fxn.meta["val"] = tm
        b.emit(opdef_for_target(target), fxn, args, kwargs, path)
    raise LoweringError("fx graph has no output node")
