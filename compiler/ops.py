"""The op registry: every IR op once, with its dim annotation, FLOP/byte counts and the
reference torch implementation the interpreter runs.

IR op names are ATen names without the common overload (`aten.linear.default` ->
`linear`, `aten.mean.dim` -> `mean.dim`). Any ATen op can be lowered and run: ops without
a sharding rule get `dims.replicated` (only `R` is ever chosen) and a warning.

    >>> opdef("linear").annotate([(8, 64), (32, 64), (32,)], [(8, 32)], {})   # doctest: +SKIP
    b k+, n k+, n -> b n
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod
from typing import Any, Callable

import torch

from . import collectives, dims
from .dims import DimAnno

aten = torch.ops.aten

@dataclass(frozen=True)
class ArgSpec:
    name: str
    kind: str          # tensor | opt_tensor | tensor_list | other
    default: Any = None
    has_default: bool = False
    kwarg_only: bool = False


@dataclass
class OpDef:
    name: str
    target: Callable | None
    args: tuple[ArgSpec, ...]
    annotate_fn: Callable | None = None      # (in_shapes, out_shapes, attrs) -> DimAnno
    flops_fn: Callable | None = None         # (in_shapes, out_shapes, attrs) -> int
    elementwise: bool = False                # a follower: adopts its producer's layout
    view: bool = False                       # moves no data (shape ops)
    warned: bool = False

    def annotate(self, in_shapes, out_shapes, attrs) -> DimAnno:
        if self.annotate_fn is None:
            return dims.replicated(in_shapes, out_shapes)
        return self.annotate_fn(list(in_shapes), list(out_shapes), dict(attrs))

    def flops(self, in_shapes, out_shapes, attrs) -> int:
        if self.flops_fn is not None:
            return int(self.flops_fn(list(in_shapes), list(out_shapes), dict(attrs)))
        if self.view:
            return 0
        return sum(prod(s) for s in out_shapes)

    def run(self, inputs: list[torch.Tensor], attrs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.build_call(inputs, attrs)
        out = self.target(*args, **kwargs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def build_call(self, inputs: list, attrs: dict[str, Any]):
        """Rebuild the ATen call from tensor operands and named non-tensor arguments."""
        it = iter(inputs)
        args, kwargs = [], {}
        for a in self.args:
            if a.kind == "tensor":
                v = attrs[a.name] if a.name in attrs else next(it)
            elif a.kind == "tensor_list":
                v = list(it)
            elif a.kind == "opt_tensor":
                if a.name in attrs:           # recorded as absent (None)
                    v = attrs[a.name]
                else:
                    v = next(it)
            else:
                if a.name not in attrs:
                    continue
                v = attrs[a.name]
            if a.kwarg_only:
                kwargs[a.name] = v
            else:
                args.append(v)
        return args, kwargs

    @property
    def has_rule(self) -> bool:
        return self.annotate_fn is not None


REGISTRY: dict[str, OpDef] = {}


def schema_args(target) -> tuple[ArgSpec, ...]:
    out = []
    for a in target._schema.arguments:
        t = str(a.type)
        if t == "Tensor":
            kind = "tensor"
        elif t == "Optional[Tensor]":
            kind = "opt_tensor"
        elif t in ("List[Tensor]", "List[Optional[Tensor]]"):
            kind = "tensor_list"
        else:
            kind = "other"
        has_default = a.has_default_value()
        out.append(ArgSpec(a.name, kind, a.default_value if has_default else None,
                           has_default, a.kwarg_only))
    return tuple(out)


def ir_name(target) -> str:
    """`aten.linear.default` -> `linear`; `aten.mean.dim` -> `mean.dim`."""
    packet = target._schema.name.split("::")[-1]
    overload = target._overloadname
    if overload in ("default", "Tensor", "int", ""):
        return packet
    return f"{packet}.{overload}"


def register(target, annotate=None, flops=None, elementwise=False, view=False, name=None) -> OpDef:
    d = OpDef(name or ir_name(target), target, schema_args(target), annotate, flops,
              elementwise, view)
    REGISTRY[d.name] = d
    return d


def opdef(name: str) -> OpDef:
    return REGISTRY[name]


def opdef_for_target(target) -> OpDef:
    """The OpDef of an ATen overload; unknown ops are registered as opaque (replicated)."""
    name = ir_name(target)
    d = REGISTRY.get(name)
    if d is None:
        d = register(target)
    return d


def warn_opaque(d: OpDef, where: str) -> None:
    if not d.has_rule and not d.warned:
        d.warned = True
        warnings.warn(f"autopar: op '{d.name}' ({where}) has no sharding rule; it will be "
                      "replicated on every rank. Add a rule in compiler/ops.py to shard it.",
                      stacklevel=2)


# ---- annotation helpers ---------------------------------------------------------------

def _norm(d: int, rank: int) -> int:
    return d % rank if rank else 0


def ew(frozen_attr: str | None = None):
    """Elementwise with broadcasting over every tensor input."""
    def fn(ins, outs, attrs):
        fz = ()
        if frozen_attr is not None and frozen_attr in attrs:
            d = attrs[frozen_attr]
            fz = tuple(d) if isinstance(d, (list, tuple)) else (d,)
        return dims.broadcast(ins, outs[0], fz)
    return fn


def a_linear(ins, outs, attrs):
    x, w = ins[0], ins[1]
    batch = tuple(f"b{i}" for i in range(len(x) - 1))
    i = (batch + ("k",), ("n", "k")) + ((("n",),) if len(ins) > 2 else ())
    return DimAnno(i, (batch + ("n",),), reduce=frozenset({"k"}))


def f_linear(ins, outs, attrs):
    x, w = ins[0], ins[1]
    return 2 * prod(outs[0]) * w[1] + (prod(outs[0]) if len(ins) > 2 else 0)


def a_matmul(ins, outs, attrs):
    a, b = ins
    if len(a) == 1 or len(b) == 1:
        return dims.replicated(ins, outs)
    out = outs[0]
    rank = len(out)
    batch = [f"b{i}" for i in range(rank - 2)]

    def side(shape, last2):
        off = rank - 2 - (len(shape) - 2)
        lead = tuple(None if (s == 1 and out[off + i] != 1) else batch[off + i]
                     for i, s in enumerate(shape[:-2]))
        return lead + last2
    return DimAnno((side(a, ("m", "k")), side(b, ("k", "n"))), (tuple(batch) + ("m", "n"),),
                   reduce=frozenset({"k"}))


def f_matmul(ins, outs, attrs):
    return 2 * prod(outs[0]) * ins[0][-1]


def a_bmm(ins, outs, attrs):
    return dims.parse("b m k+, b k+ n -> b m n")


def a_sdpa(ins, outs, attrs):
    q = ins[0]
    lead = tuple(f"b{i}" for i in range(len(q) - 2))
    s = "s"
    frozen = {"t", "d"}
    if attrs.get("is_causal"):
        frozen.add(s)
    i = [lead + (s, "d"), lead + ("t", "d"), lead + ("t", "e")]
    if len(ins) > 3:      # attn_mask broadcast against (..., s, t)
        m = ins[3]
        full = lead + (s, "t")
        off = len(full) - len(m)
        i.append(tuple(None if sz == 1 else full[off + k] for k, sz in enumerate(m)))
    return DimAnno(tuple(i), (lead + (s, "e"),), frozen=frozenset(frozen))


def f_sdpa(ins, outs, attrs):
    q, k, v = ins[:3]
    lead = prod(q[:-2])
    return 2 * lead * q[-2] * k[-2] * q[-1] + 2 * lead * q[-2] * k[-2] * v[-1] + 5 * lead * q[-2] * k[-2]


def a_layer_norm(ins, outs, attrs):
    x = ins[0]
    k = len(attrs["normalized_shape"])
    labs = [f"d{i}" for i in range(len(x))]
    norm = tuple(labs[len(x) - k:])
    i = [tuple(labs)] + [norm for _ in ins[1:]]
    return DimAnno(tuple(i), (tuple(labs),), frozen=frozenset(norm))


def a_rms_norm(ins, outs, attrs):
    return a_layer_norm(ins, outs, attrs)


def a_embedding(ins, outs, attrs):
    w, idx = ins
    lead = tuple(f"b{i}" for i in range(len(idx)))
    return DimAnno((("v", "c"), lead), (lead + ("c",),), frozen=frozenset({"v"}))


def a_reduce(mean: bool):
    """sum/mean over `dim` (list) with keepdim; a split reduced dim gives a partial sum."""
    def fn(ins, outs, attrs):
        x = ins[0]
        r = len(x)
        d = attrs.get("dim")
        if d is None or d == []:
            red = set(range(r))
        else:
            red = {_norm(v, r) for v in (d if isinstance(d, (list, tuple)) else [d])}
        labs = [f"d{i}" for i in range(r)]
        keep = attrs.get("keepdim", False)
        out = tuple((f"k{i}" if i in red else labs[i]) for i in range(r) if keep or i not in red)
        rl = {labs[i] for i in red}
        return DimAnno((tuple(labs),), (out,), reduce=frozenset(rl),
                       frozen=frozenset(o for o in out if o.startswith("k")),
                       mean=frozenset(rl) if mean else frozenset())
    return fn


def a_loss(ins, outs, attrs):
    """cross_entropy(logits [N, C] or [N], target [N]); mean over N splits into partials."""
    logits, target = ins[0], ins[1]
    reduction = attrs.get("reduction", 1)
    if reduction == 0:
        lead = ("n",) + tuple(f"e{i}" for i in range(len(target) - 1))
        return DimAnno(((lead[0], "c") + lead[1:], lead) + tuple(("c",) for _ in ins[2:]),
                       (lead,), frozen=frozenset({"c"}))
    lead = ("n",) + tuple(f"e{i}" for i in range(len(target) - 1))
    lab_logits = (lead[0], "c") + lead[1:] if len(logits) > len(target) else lead
    mean = reduction == 1
    # mean with ignore_index depends on the global count of kept targets: only exact
    # when nothing is ignored, so mean-reduced losses split only the leading dim.
    return DimAnno((lab_logits, lead) + tuple(("c",) for _ in ins[2:]), ((),),
                   reduce=frozenset(lead), frozen=frozenset({"c"}) | frozenset(lead[1:]),
                   mean=frozenset(lead) if mean else frozenset())


def a_mse(ins, outs, attrs):
    r = len(ins[0])
    labs = tuple(f"d{i}" for i in range(r))
    reduction = attrs.get("reduction", 1)
    if reduction == 0:
        return DimAnno((labs, labs), (labs,))
    return DimAnno((labs, labs), ((),), reduce=frozenset(labs),
                   mean=frozenset(labs) if reduction == 1 else frozenset())


def a_view(ins, outs, attrs):
    return dims.reshape(ins[0], outs[0])


def a_transpose(ins, outs, attrs):
    r = len(ins[0])
    a, b = _norm(attrs["dim0"], r), _norm(attrs["dim1"], r)
    order = list(range(r))
    order[a], order[b] = order[b], order[a]
    return dims.permute(r, order)


def a_permute(ins, outs, attrs):
    r = len(ins[0])
    return dims.permute(r, [_norm(d, r) for d in attrs["dims"]])


def a_t(ins, outs, attrs):
    r = len(ins[0])
    return dims.permute(r, list(reversed(range(r))))


def a_split(ins, outs, attrs):
    r = len(ins[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    return DimAnno((labs,), tuple(labs for _ in outs), frozen=frozenset({labs[d]}))


def a_cat(ins, outs, attrs):
    r = len(outs[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    return DimAnno(tuple(labs for _ in ins), (labs,), frozen=frozenset({labs[d]}))


def a_stack(ins, outs, attrs):
    r = len(outs[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = [f"d{i}" for i in range(r)]
    inl = tuple(l for i, l in enumerate(labs) if i != d)
    return DimAnno(tuple(inl for _ in ins), (tuple(labs),), frozen=frozenset({labs[d]}))


def a_slice(ins, outs, attrs):
    r = len(ins[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    out = tuple(f"o{i}" if i == d else l for i, l in enumerate(labs))
    return DimAnno((labs,), (out,), frozen=frozenset({labs[d], out[d]}))


def a_select(ins, outs, attrs):
    r = len(ins[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    return DimAnno((labs,), (tuple(l for i, l in enumerate(labs) if i != d),),
                   frozen=frozenset({labs[d]}))


def a_unsqueeze(ins, outs, attrs):
    return dims.reshape(ins[0], outs[0])


def a_expand(ins, outs, attrs):
    x, out = ins[0], outs[0]
    off = len(out) - len(x)
    labs = tuple(f"d{i}" for i in range(len(out)))
    return DimAnno((tuple(None if (s == 1 and out[off + i] != 1) else labs[off + i]
                          for i, s in enumerate(x)),), (labs,))


def a_softmax(ins, outs, attrs):
    return dims.broadcast(ins, outs[0], (attrs.get("dim", -1),))


def a_broadcast_tensors(ins, outs, attrs):
    out = outs[0]
    b = dims.broadcast(ins, out)
    return DimAnno(b.inputs, tuple(b.outputs[0] for _ in outs))


def a_creation(ins, outs, attrs):
    """arange/zeros/ones/full: no inputs, one output that may be cut anywhere (each
    rank builds its own slice) -- kept replicated for now: a cut would need offsets."""
    return dims.replicated(ins, outs)


def a_index_tensor(ins, outs, attrs):
    return dims.replicated(ins, outs)


# ---- the table -------------------------------------------------------------------------

ELEMENTWISE_UNARY = [
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default,
    aten.sigmoid.default, aten.neg.default, aten.exp.default, aten.log.default,
    aten.rsqrt.default, aten.sqrt.default, aten.abs.default, aten.sin.default,
    aten.cos.default, aten.pow.Tensor_Scalar, aten.reciprocal.default,
    aten.dropout.default, aten.native_dropout.default, aten.clone.default,
    aten.contiguous.default, aten.to.dtype, aten._to_copy.default, aten.erf.default,
    aten.logical_not.default, aten.alias.default, aten.detach.default,
    aten.square.default, aten.type_as.default, aten.sign.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.lift_fresh_copy.default,
]
ELEMENTWISE_BINARY = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.eq.Tensor,
    aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.gt.Scalar, aten.le.Scalar,
    aten.ge.Scalar, aten.maximum.default, aten.minimum.default, aten.rsub.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.lt.Tensor, aten.gt.Tensor,
]
VIEWS = [aten.view.default, aten.reshape.default, aten._unsafe_view.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
         aten.flatten.using_ints]

for _t in ELEMENTWISE_UNARY + ELEMENTWISE_BINARY:
    if isinstance(_t, torch._ops.OpOverload):
        register(_t, ew(), elementwise=True)
# `tril`/`triu` are elementwise in their annotation but not followers (their result
# depends on each element's position in the last two dims)
register(aten.tril.default, ew())
register(aten.triu.default, ew())
for _t in VIEWS:
    register(_t, a_view, view=True)
# A `view` after pruning removed a `contiguous` may see a non-contiguous tensor: run
# views as reshapes (identical values; a copy only where a view is impossible).
REGISTRY["view"].target = lambda x, size: aten.reshape.default(x, size)
register(aten.expand.default, a_expand, view=True)
register(aten.transpose.int, a_transpose, view=True)
register(aten.permute.default, a_permute, view=True)
register(aten.t.default, a_t, view=True)
register(aten.numpy_T.default, a_t, view=True)
register(aten.broadcast_tensors.default, a_broadcast_tensors, view=True)
register(aten.zeros_like.default, ew(), elementwise=True)
register(aten.ones_like.default, ew(), elementwise=True)
register(aten.full_like.default, ew(), elementwise=True)
register(aten.split.Tensor, a_split, view=True)
register(aten.split_with_sizes.default, a_split, view=True)
register(aten.chunk.default, a_split, view=True)
register(aten.unbind.int, a_select, view=True)
register(aten.slice.Tensor, a_slice, view=True)
register(aten.select.int, a_select, view=True)
register(aten.cat.default, a_cat)
register(aten.stack.default, a_stack)
register(aten.linear.default, a_linear, f_linear)
register(aten.matmul.default, a_matmul, f_matmul)
register(aten.bmm.default, a_bmm, f_matmul)
register(aten.mm.default, lambda i, o, a: dims.parse("m k+, k+ n -> m n"), f_matmul)
register(aten.scaled_dot_product_attention.default, a_sdpa, f_sdpa)
register(aten.layer_norm.default, a_layer_norm, lambda i, o, a: 8 * prod(o[0]))
register(aten.rms_norm.default, a_rms_norm, lambda i, o, a: 4 * prod(o[0]))
register(aten.embedding.default, a_embedding, lambda i, o, a: 0)
register(aten.softmax.int, a_softmax, lambda i, o, a: 5 * prod(o[0]))
register(aten._softmax.default, a_softmax, lambda i, o, a: 5 * prod(o[0]))
register(aten.log_softmax.int, a_softmax, lambda i, o, a: 5 * prod(o[0]))
register(aten._log_softmax.default, a_softmax, lambda i, o, a: 5 * prod(o[0]))
register(aten.mean.dim, a_reduce(True))
register(aten.mean.default, a_reduce(True))
register(aten.sum.dim_IntList, a_reduce(False))
register(aten.sum.default, a_reduce(False))
register(aten.cross_entropy_loss.default, a_loss, lambda i, o, a: 6 * prod(i[0]))
register(aten.mse_loss.default, a_mse, lambda i, o, a: 3 * prod(i[0]))
register(aten.arange.start, a_creation)
register(aten.arange.default, a_creation)
register(aten.arange.start_step, a_creation)
register(aten.ones.default, a_creation)
register(aten.zeros.default, a_creation)
register(aten.full.default, a_creation)
register(aten.index.Tensor, a_index_tensor)

# The program steps of the collective table: one tensor operand, then `axis` and the step's
# own attributes; plan application inserts them (no reference implementation: they only run
# in a launched rank, through the runtime).
for _op in collectives.OPS.values():
    REGISTRY[_op.name] = OpDef(_op.name, None, (ArgSpec("x", "tensor"), ArgSpec("axis", "other"))
                               + tuple(ArgSpec(a, "other") for a in _op.attrs))

# Ops that never change values: pruning removes them (`same-dtype to` is checked there).
NOOPS = {"alias", "detach", "lift_fresh_copy", "clone", "contiguous", "_assert_tensor_metadata"}


def bytes_moved(in_values, out_values) -> int:
    """Bytes read and written by an op (the memory side of the roofline)."""
    return sum(v.nbytes for v in in_values) + sum(v.nbytes for v in out_values)


def node_anno(node) -> DimAnno:
    return REGISTRY[node.op].annotate([v.shape for v in node.inputs],
                                      [v.shape for v in node.outputs], node.attrs)


def node_flops(node) -> int:
    return REGISTRY[node.op].flops([v.shape for v in node.inputs],
                                   [v.shape for v in node.outputs], node.attrs)


__all__ = ["OpDef", "REGISTRY", "opdef", "opdef_for_target", "register", "node_anno",
           "node_flops", "bytes_moved", "NOOPS", "ir_name", "warn_opaque"]
