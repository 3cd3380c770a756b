"""The op registry: every IR op once, with its dim annotation, FLOP/byte counts and the
reference torch implementation the interpreter runs.

IR op names are ATen names without the common overload (`aten.linear.default` ->
`linear`, `aten.mean.dim` -> `mean.dim`). Any ATen op can be lowered and run: ops without
a sharding rule get `dims.replicated` (only `R` is ever chosen) and a warning.
Ops without a FLOP rule are priced by what `torch.utils.flop_counter` counts for them
(`node_flops`), so an opaque matmul is not mistaken for elementwise work.

    >>> opdef("linear").annotate([(8, 64), (32, 64), (32,)], [(8, 32)], {})   # doctest: +SKIP
    b k+, n k+, n -> b n
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod
from typing import Any, Callable

import torch

from . import collectives, dims, moe
from .dims import DimAnno

aten = torch.ops.aten

# In a tensor list's attribute (`indices=[None, "tensor"]` for `x[:, idx]`): an operand.
TENSOR = "tensor"


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

    def bind(self, inputs: list, attrs: dict[str, Any]) -> dict[str, Any]:
        """Schema argument name -> operand (from `inputs`, in order) or attribute value;
        arguments neither given nor recorded are left out (their defaults apply).

        A tensor list takes the operands left after the tensor arguments that follow it
        (`index_put(self, indices, values)`), so operands need no count of their own:

            >>> opdef("index_put").bind(["x", "i", "v"], {})      # doctest: +SKIP
            {'self': 'x', 'indices': ['i'], 'values': 'v'}
        """
        out: dict[str, Any] = {}
        pos = 0
        for k, a in enumerate(self.args):
            if a.kind in ("tensor", "opt_tensor"):
                if a.name in attrs:           # a python scalar, or recorded as absent (None)
                    out[a.name] = attrs[a.name]
                elif a.kind == "opt_tensor" and pos == len(inputs):
                    continue                  # trailing optional tensors left out
                else:
                    out[a.name] = inputs[pos]
                    pos += 1
            elif a.kind == "tensor_list" and a.name in attrs:
                marks = attrs[a.name]         # None where the list holds None
                n = sum(m is not None for m in marks)
                it = iter(inputs[pos:pos + n])
                out[a.name] = [None if m is None else next(it) for m in marks]
                pos += n
            elif a.kind == "tensor_list":
                after = sum(1 for b in self.args[k + 1:]
                            if b.kind in ("tensor", "opt_tensor") and b.name not in attrs)
                n = len(inputs) - pos - after
                out[a.name] = list(inputs[pos:pos + n])
                pos += n
            elif a.name in attrs:
                out[a.name] = attrs[a.name]
        if pos != len(inputs):
            raise ValueError(f"{self.name}: {len(inputs)} operands, schema binds {pos}")
        return out

    def build_call(self, inputs: list, attrs: dict[str, Any]):
        """Rebuild the ATen call (args, kwargs) from tensor operands and named attributes."""
        bound = self.bind(inputs, attrs)
        args, kwargs = [], {}
        gap = False                  # after a left-out argument, later ones go by name
        for a in self.args:
            if a.name not in bound:
                gap = True
            elif a.kwarg_only or gap:
                kwargs[a.name] = bound[a.name]
            else:
                args.append(bound[a.name])
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
        d = register(target, *NAMED_RULES.get(name, (None, None)))
    return d


def functional_target(target):
    """The out-of-place overload of an in-place ATen op (`div_.Tensor` -> `div.Tensor`,
    `index_put_` -> `index_put`), or None when `target` mutates nothing. Lowering uses it
    so the IR stays free of mutation (the value the op wrote replaces the old one).

        >>> functional_target(torch.ops.aten.div_.Tensor)      # doctest: +SKIP
        <OpOverload(op='aten.div', overload='Tensor')>
    """
    schema = target._schema
    if not schema.is_mutable:
        return None
    base = schema.name.split("::")[-1]
    packet = getattr(aten, base[:-1], None) if base.endswith("_") and not base.endswith("__") else None
    if packet is None:
        return None
    overload = getattr(packet, target._overloadname, None)
    if overload is None or overload._schema.is_mutable:
        return None
    return overload


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
    """torch.matmul of any rank: 1-D operands are a vector (contracted, no m or n),
    batch dims broadcast (a size-1 batch dim takes no label)."""
    a, b = ins
    out = outs[0]
    rank = len(out)
    if len(a) == 1 and len(b) == 1:
        return DimAnno((("k",), ("k",)), ((),), reduce=frozenset({"k"}))
    mdims = () if len(a) == 1 else ("m",)
    ndims = () if len(b) == 1 else ("n",)
    nb = rank - len(mdims) - len(ndims)
    batch = [f"b{i}" for i in range(nb)]

    def side(shape, last):
        lead = shape[:len(shape) - len(last)]
        off = nb - len(lead)
        return tuple(None if (s == 1 and out[off + i] != 1) else batch[off + i]
                     for i, s in enumerate(lead)) + last
    return DimAnno((side(a, mdims + ("k",)), side(b, ("k",) + ndims)),
                   (tuple(batch) + mdims + ndims,), reduce=frozenset({"k"}))


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


def class_splittable(ins, attrs) -> bool:
    """Whether a cross-entropy can keep its class dim split (the vocab-parallel loss,
    `VOCAB_PARALLEL_CE`): 2-D logits over class-index targets, reduction sum or none, no
    class weights and no label smoothing. A mean (left when the batch mean could not be
    written as sum / kept targets), weights and smoothing need per-class sums this op
    does not reduce, so their class dim stays whole."""
    return (len(ins) == 2 and len(ins[0]) == 2 and len(ins[1]) == 1
            and attrs.get("reduction", 1) in (0, 2) and not attrs.get("label_smoothing", 0.0))


def a_loss(ins, outs, attrs):
    """cross_entropy(logits [N, C] or [N], target [N]); mean over N splits into partials.
    Where `class_splittable`, an axis may split the class dim "c": each rank's result is
    then a partial sum over that axis (plan application runs the vocab-parallel loss)."""
    logits, target = ins[0], ins[1]
    reduction = attrs.get("reduction", 1)
    split_c = class_splittable(ins, attrs)
    if reduction == 0:
        lead = ("n",) + tuple(f"e{i}" for i in range(len(target) - 1))
        return DimAnno(((lead[0], "c") + lead[1:], lead) + tuple(("c",) for _ in ins[2:]),
                       (lead,), reduce=frozenset({"c"}) if split_c else frozenset(),
                       frozen=frozenset() if split_c else frozenset({"c"}))
    lead = ("n",) + tuple(f"e{i}" for i in range(len(target) - 1))
    lab_logits = (lead[0], "c") + lead[1:] if len(logits) > len(target) else lead
    mean = reduction == 1
    # a mean over class-index targets divides by the targets kept (not ignore_index) in the
    # whole batch: plan application sums each shard's losses and divides by the count of
    # kept targets all-reduced over the split axes (passes/apply.py). A class-weighted mean
    # divides by the kept targets' weights instead: its batch stays whole.
    frozen = (frozenset() if split_c else frozenset({"c"})) | frozenset(lead[1:])
    if mean and len(ins) > 2 and len(logits) > len(target):
        frozen |= frozenset(lead)
    reduce = frozenset(lead) | (frozenset({"c"}) if split_c else frozenset())
    return DimAnno((lab_logits, lead) + tuple(("c",) for _ in ins[2:]), ((),),
                   reduce=reduce, frozen=frozen,
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
    new = dims.Namer("e")
    # torch.cat skips 1-D empty operands of any other rank (T5 concatenates onto one)
    i = tuple(labs if len(s) == r else tuple(new() for _ in s) for s in ins)
    frozen = {labs[d]} | {lab for t in i if t is not labs for lab in t}
    return DimAnno(i, (labs,), frozen=frozenset(frozen))


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
    """ones/zeros/full/empty (and `new_*`, whose input only lends dtype and device): the
    value is the same everywhere, so each rank builds its own block of any split (plan
    application makes `size` local); the input is never read, so it stays replicated."""
    new = dims.Namer("r")
    out = tuple(f"d{k}" for k in range(len(outs[0])))
    # `x.new_zeros(x.shape)`: x may keep whatever split the output has (nothing gathered)
    i = tuple(out if tuple(s) == tuple(outs[0]) else tuple(new() for _ in s) for s in ins)
    return DimAnno(i, (out,), frozen=frozenset(lab for t in i if t is not out for lab in t))


def a_arange(ins, outs, attrs):
    """arange's values are global positions: a split would need a per-rank start offset,
    which plan application does not add; it is cheap, so every rank builds all of it."""
    return dims.replicated(ins, outs)


def a_along(attr: str = "dim", default: int = -1):
    """Ops that work along one dim and leave the others alone (cumsum, diff, sort, topk):
    every operand and output of full rank shares the other dims' labels; `dim` is frozen,
    and gets its own label per tensor where sizes may differ (topk's k, diff's n-1)."""
    def fn(ins, outs, attrs):
        r = len(outs[0])
        d = _norm(attrs.get(attr, default), r) if r else 0
        labs = [f"d{i}" for i in range(r)]
        frozen = set()

        def one(shape, tag):
            if len(shape) != r:
                t = tuple(f"{tag}_{i}" for i in range(len(shape)))
                frozen.update(t)
                return t
            t = list(labs)
            if r:
                t[d] = f"{tag}_{d}"
                frozen.add(t[d])
            return tuple(t)
        i = tuple(one(s, f"i{k}") for k, s in enumerate(ins))
        o = tuple(one(s, f"o{k}") for k, s in enumerate(outs))
        return DimAnno(i, o, frozen=frozenset(frozen))
    return fn


def a_one_hot(ins, outs, attrs):
    """one_hot(index, num_classes): each index element becomes a row of classes, so every
    index dim keeps its split and the new class dim is whole. With num_classes -1 the
    class count is the largest index, a global value: nothing may split then."""
    labs = tuple(f"d{i}" for i in range(len(ins[0])))
    out = labs + ("c",)
    frozen = {"c"} | (set(labs) if attrs.get("num_classes", -1) < 0 else set())
    return DimAnno((labs,), (out,), frozen=frozenset(frozen))


def a_pad(ins, outs, attrs):
    """pad / constant_pad_nd: `pad` lists (before, after) pairs from the last dim back;
    padded dims are frozen, untouched dims split freely."""
    r = len(outs[0])
    pad = list(attrs.get("pad", ()))
    padded = {r - 1 - j for j in range(len(pad) // 2) if pad[2 * j] or pad[2 * j + 1]}
    labs = tuple(f"d{i}" for i in range(r))
    out = tuple(f"p{i}" if i in padded else lab for i, lab in enumerate(labs))
    return DimAnno((labs,), (out,), frozen=frozenset({labs[i] for i in padded} | {out[i] for i in padded}))


def a_select_scatter(ins, outs, attrs):
    """select_scatter(self, src, dim, index): `src` is `self` without `dim`; writing it
    at `index` keeps every other dim aligned, so those split, `dim` does not."""
    r = len(ins[0])
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    return DimAnno((labs, tuple(l for i, l in enumerate(labs) if i != d)), (labs,),
                   frozen=frozenset({labs[d]}))


def a_histc(ins, outs, attrs):
    """Counts per bin: the histogram of a split input is the sum of the ranks' partial
    histograms, so every input dim may split (a partial-sum output); the bins may not."""
    labs = tuple(f"d{i}" for i in range(len(ins[0])))
    return DimAnno((labs,), (("bins",),), reduce=frozenset(labs), frozen=frozenset({"bins"}))


def a_gather(ins, outs, attrs):
    """gather(self, dim, index): out[.., j, ..] = self[.., index[.., j, ..], ..]. `self`
    is read whole along `dim` (frozen there); `index` and the output share every label,
    so they split on any dim, `dim` included. Other dims of `self` share the label only
    where its size equals the index's."""
    x, idx = ins
    r = len(idx)
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    xl = tuple("s" if i == d else labs[i] if x[i] == idx[i] else f"x{i}" for i in range(r))
    frozen = {lab for lab in xl if lab not in labs}
    return DimAnno((xl, labs), (labs,), frozen=frozenset(frozen))


def a_index_select(ins, outs, attrs):
    """index_select(self, dim, index): the indexed dim of `self` is read whole; the
    index (and the output's dim) splits, each rank selecting its block of rows."""
    x = ins[0]
    r = len(x)
    d = _norm(attrs.get("dim", 0), r)
    labs = tuple(f"d{i}" for i in range(r))
    xl = tuple("s" if i == d else lab for i, lab in enumerate(labs))
    return DimAnno((xl, (labs[d],)), (labs,), frozen=frozenset({"s"}))


def a_index_tensor(ins, outs, attrs):
    """`self[i0, i1]`, `self[:, idx]` (index tensors, `None` for whole dims): the indexed
    dims of `self` are read whole; the broadcast index shape splits (each rank gathers its
    block of positions), and so do self's other dims, which the output keeps."""
    x, idx = ins[0], ins[1:]
    marks = attrs.get("indices") or [TENSOR] * len(idx)
    where = [i for i, m in enumerate(marks) if m is not None]
    out = outs[0]
    ir = len(out) - (len(x) - len(where))
    ilabs = tuple(f"i{j}" for j in range(ir))
    xl = tuple(f"s{i}" if i in where else f"d{i}" for i in range(len(x)))
    kept = [lab for lab in xl if lab[0] == "d"]
    # torch puts the index dims where the (adjacent) index tensors were, else first
    at = where[0] if where == list(range(where[0], where[-1] + 1)) else 0
    lead = [lab for lab in xl[:at] if lab[0] == "d"] if at else []
    ol = tuple(lead) + ilabs + tuple(kept[len(lead):])
    il = []
    for shape in idx:
        off = ir - len(shape)
        il.append(tuple(None if (sz == 1 and out[at + off + j] != 1) else ilabs[off + j]
                        for j, sz in enumerate(shape)))
    return DimAnno((xl, *il), (ol,), frozen=frozenset(f"s{i}" for i in where))


def a_index_put(ins, outs, attrs):
    """index_put(self, indices, values): the indexed dims of `self` and the indices stay
    whole (a write may land anywhere); self's remaining dims split with `values`."""
    x, idx, val = ins[0], ins[1:-1], ins[-1]
    k = len(idx)
    rest = tuple(f"d{j}" for j in range(len(x) - k))
    xl = tuple(f"s{j}" for j in range(k)) + rest
    new = dims.Namer("i")
    il = [tuple(new() for _ in sh) for sh in idx]
    ni = max((len(sh) for sh in idx), default=0)      # rank of the broadcast index shape
    off = ni + len(rest) - len(val)
    vl = []
    for j, sz in enumerate(val):
        t = j + off
        if t < ni:
            vl.append(f"v{t}")
        else:
            r = t - ni
            vl.append(None if (sz == 1 and x[k + r] != 1) else rest[r])
    frozen = set(xl[:k]) | {lab for t in il for lab in t} | {lab for lab in vl if lab and lab[0] == "v"}
    return DimAnno((xl, *il, tuple(vl)), (xl,), frozen=frozenset(frozen))


def a_baddbmm(ins, outs, attrs):
    """self + batch1 @ batch2 (beta, alpha scale them). The contraction stays whole: a
    split would add `self` once per rank (plan application shares only linear's bias)."""
    b = dims.broadcast([ins[0]], outs[0])
    return DimAnno((b.inputs[0], ("d0", "d1", "k"), ("d0", "k", "d2")), (("d0", "d1", "d2"),),
                   frozen=frozenset({"k"}))


def a_addmm(ins, outs, attrs):
    """bias + mat1 @ mat2 (HF Conv1D: mat2 is the [in, out] weight). With a bias over the
    output features (a row vector) it splits like linear: column (n) or row parallel (k,
    partial sums; plan application adds 1/n of the bias on each rank, as for linear's). A
    bias with rows keeps the contraction whole: it would be summed once per rank."""
    bias = ins[0]
    if attrs.get("beta", 1) == 1 and attrs.get("alpha", 1) == 1 and (
            len(bias) == 1 or (len(bias) == 2 and bias[0] == 1)) and bias[-1] == outs[0][1] > 1:
        lead = (None,) if len(bias) == 2 else ()
        return DimAnno((lead + ("n",), ("m", "k"), ("k", "n")), (("m", "n"),), reduce=frozenset({"k"}))
    b = dims.broadcast([ins[0]], outs[0])
    return DimAnno((b.inputs[0], ("d0", "k"), ("k", "d1")), (("d0", "d1"),), frozen=frozenset({"k"}))


def f_addmm(ins, outs, attrs):
    k = ins[1][-1]
    return 2 * prod(outs[0]) * k + prod(outs[0])


def a_grouped_mm(ins, outs, attrs):
    """grouped_mm(x (S, k), w (E, k, n), offs (E,)): rows of x are grouped by expert
    through `offs` (global positions), so tokens and experts stay whole; the output
    features split (column parallel) and the contraction splits into partial sums."""
    if len(ins) != 3 or len(ins[0]) != 2 or len(ins[1]) != 3 or attrs.get("bias", None) is not None:
        return dims.replicated(ins, outs)
    return dims.parse("s^ k+, e^ k+ n, e^ -> s^ n")


def f_grouped_mm(ins, outs, attrs):
    return 2 * prod(outs[0]) * ins[0][-1]


def a_moe_experts(ins, outs, attrs):
    """moe_experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k], gate [E, I, H],
    up [E, I, H], down [E, H, I]) -> [T, H] (compiler/moe.py). Three splits: the tokens "t"
    (every expert on each rank's tokens), the experts' intermediate "i" (tensor-parallel
    experts: a partial sum), and "x", the experts together with the tokens (expert
    parallelism: plan application writes `EXPERT_PARALLEL_MOE`, which dispatches rows to
    the experts' ranks with all_to_all). H and k stay whole."""
    return DimAnno((("t", "h"), ("t", "k"), ("t", "k"), ("x", "i", "h"), ("x", "i", "h"), ("x", "h", "i")),
                   (("t", "h"),), reduce=frozenset({"i"}), frozen=frozenset({"h", "k"}),
                   joint=(("x", "t"),))


def f_moe_experts(ins, outs, attrs):
    """Each (token, expert) row: two [H] x [H, I] matmuls, the gate, one [I] x [I, H]."""
    (T, H), (_, k), (_, I, _) = ins[0], ins[1], ins[3]
    return 6 * T * k * H * I + 4 * T * k * I + 2 * T * k * H


# ---- the table -------------------------------------------------------------------------
#
# What real model code emits. Every opaque-op warning (and lowering failure) of tiny HF
# GPT-2, Llama, Qwen2, BERT, T5 and Mixtral (transformers 5.23, torch.export) and what it
# became; tests/test_hf_models.py checks that no op of those six is left without a rule.
#
#   op (model)                          rule, or why not
#   addmm (GPT-2 Conv1D)                lowered as mm + add, folded back into addmm by
#                                       passes/unfuse.py where the bias is a parameter row:
#                                       column (n) or row parallel (k, partial sums, 1/n of
#                                       the bias per rank, like linear); baddbmm and an addmm
#                                       with a matrix bias split all but k (the added input
#                                       would be summed once per rank)
#   to.dtype_layout, to.device (all)    elementwise casts
#   le, __and__, min.other (masks, T5)  elementwise, like every comparison / logical op
#   floor_divide (Mixtral)              elementwise
#   cumsum, diff (position ids)         along `dim`: the other dims split
#   pad (label shift in the LM loss)    padded dims whole, the others split
#   new_ones (attention mask)           any dim splits: same value everywhere, size made local
#   arange (positions)                  whole: its values are global positions, a split
#                                       needs a per-rank offset plan application does not add
#   gather (BERT token types)           index and output split on every dim, self whole on dim
#   topk, sort (Mixtral router, sort)   along `dim`: tokens split, experts do not
#   histc (tokens per expert)           every input dim splits into partial counts
#   grouped_mm_fallback (experts)       output features (column) or contraction (partial
#                                       sums) split; tokens and experts whole (offsets are
#                                       global positions)
#   index (x[perm], x[:, idx])          index positions and self's other dims split
#   empty_like (inverse permutation)    elementwise; the interpreter fills it with zeros
#   index_put_, div_, copy_, fill_,     in place: lowered out of place (index_put, div,
#   masked_fill_ (router, T5 shift)     slice_scatter / select_scatter for x[.., 1:] = y)
#   cat of an empty (0,) tensor (T5)    the empty operand takes labels of its own
#   wrap_with_set_grad_enabled (rotary) a no_grad region: inlined at lowering
#   moe_experts (Mixtral's experts,      tokens, the experts' intermediate (partial sums) or
#   traced through compiler/moe.py)     the experts with their tokens (expert parallelism)
#   einsum, logcumsumexp, ...           no rule (not in these models): replicated, priced
#                                       by FlopCounterMode (node_flops)

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
    aten.lift_fresh_copy.default, aten.to.dtype_layout, aten.to.device,
    aten.log1p.default, aten.expm1.default, aten.sign.default, aten.isnan.default,
    aten.isinf.default, aten.bitwise_not.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.floor_divide.Scalar, aten.remainder.Scalar,
    aten.floor.default, aten.ceil.default, aten.round.default, aten.trunc.default,
    aten.ne.Scalar, aten.eq.Scalar, aten.where.ScalarSelf, aten.where.ScalarOther,
]
ELEMENTWISE_BINARY = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Tensor,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.eq.Tensor,
    aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.gt.Scalar, aten.le.Scalar,
    aten.ge.Scalar, aten.maximum.default, aten.minimum.default, aten.rsub.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.lt.Tensor, aten.gt.Tensor,
    aten.le.Tensor, aten.ge.Tensor, aten.ne.Tensor, aten.logical_xor.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_xor.Tensor,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor,
    aten.floor_divide.default, aten.remainder.Tensor, aten.fmod.Tensor, aten.where.Scalar,
    aten.min.other, aten.max.other,
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
register(aten.arange.start, a_arange)
register(aten.arange.default, a_arange)
register(aten.arange.start_step, a_arange)
for _t in (aten.ones.default, aten.zeros.default, aten.full.default, aten.empty.memory_format,
           aten.new_ones.default, aten.new_zeros.default, aten.new_full.default,
           aten.new_empty.default):
    register(_t, a_creation, lambda i, o, a: 0)
# uninitialised memory has no values to reproduce: the interpreter fills it with zeros
register(aten.empty_like.default, ew(), lambda i, o, a: 0, elementwise=True)
REGISTRY["empty_like"].target = aten.zeros_like.default
register(aten.index.Tensor, a_index_tensor, lambda i, o, a: 0)
register(aten.index_select.default, a_index_select, lambda i, o, a: 0)
register(aten.gather.default, a_gather, lambda i, o, a: 0)
register(aten.index_put.default, a_index_put)
register(aten.cumsum.default, a_along())
register(aten.cumprod.default, a_along())
register(aten.diff.default, a_along())
register(aten.sort.default, a_along())
register(aten.sort.stable, a_along())
register(aten.argsort.default, a_along())
register(aten.topk.default, a_along())
register(aten.one_hot.default, a_one_hot, lambda i, o, a: 0)
register(aten.pad.default, a_pad)
register(aten.constant_pad_nd.default, a_pad)
register(aten.histc.default, a_histc)
register(aten.slice_scatter.default, a_along())
register(aten.select_scatter.default, a_select_scatter)
# out-of-place forms of `x.copy_(y)` and `x.fill_(v)`, which lowering writes functionally
register(aten.copy.default, ew(), elementwise=True)
register(aten.fill.Scalar, ew(), elementwise=True)
register(aten.fill.Tensor, ew(), elementwise=True)
register(aten.baddbmm.default, a_baddbmm,
         lambda i, o, a: 2 * prod(o[0]) * i[1][-1] + prod(o[0]))
register(aten.addmm.default, a_addmm, f_addmm)
register(aten._grouped_mm.default, a_grouped_mm, f_grouped_mm)
register(torch.ops.autopar.moe_experts.default, a_moe_experts, f_moe_experts)

# Ops of other libraries' torch.library namespaces, by IR name: registered with their
# rule the first time a traced graph holds one (the library must be imported by then).
NAMED_RULES: dict[str, tuple[Callable, Callable | None]] = {
    # transformers' MoE experts on CPU / fp32 (transformers.integrations.moe)
    "grouped_mm_fallback": (a_grouped_mm, f_grouped_mm),
}

# The program steps of the collective table: one tensor operand, then `axis` and the step's
# own attributes; plan application inserts them (no reference implementation: they only run
# in a launched rank, through the runtime).
for _op in collectives.OPS.values():
    REGISTRY[_op.name] = OpDef(_op.name, None, (ArgSpec("x", "tensor"), ArgSpec("axis", "other"))
                               + tuple(ArgSpec(a, "other") for a in _op.attrs))

# The vocab-parallel cross-entropy: what plan application writes for a `cross_entropy_loss`
# whose class dim an axis splits (logits [N, C/k], targets [N] whole on that axis). Each
# rank's result is its partial sum over the axis; inside, two all_reduces of N fp32 values
# (the rows' max, then their sum of exp) make the log-sum-exp global
# (`sharding.split_class_collectives` prices them, backends/runtime/losses.py runs them).
VOCAB_PARALLEL_CE = "vocab_parallel_cross_entropy"
REGISTRY[VOCAB_PARALLEL_CE] = OpDef(VOCAB_PARALLEL_CE, None, (
    ArgSpec("self", "tensor"), ArgSpec("target", "tensor"), ArgSpec("axis", "other"),
    ArgSpec("ignore_index", "other", -100, True), ArgSpec("reduction", "other", 1, True)))

# Expert parallelism: what plan application writes for a `moe_experts` whose experts an
# axis splits together with its tokens ("x"). The operands are this rank's tokens and its
# E/n experts; inside, the per-expert row counts and then the rows go to the ranks holding
# their experts and the results come back (all_to_all on `axis`; `sharded.moe_traffic`
# counts them, backends/runtime/moe.py runs them).
EXPERT_PARALLEL_MOE = "expert_parallel_moe"
REGISTRY[EXPERT_PARALLEL_MOE] = OpDef(EXPERT_PARALLEL_MOE, None, tuple(
    ArgSpec(a, "tensor") for a in ("hidden", "top_k_index", "top_k_weights", "gate", "up", "down"))
    + (ArgSpec("axis", "other"),))

# Ops that never change values: pruning removes them (`same-dtype to` is checked there).
NOOPS = {"alias", "detach", "lift_fresh_copy", "clone", "contiguous", "_assert_tensor_metadata"}


def library_modules(ops) -> list[str]:
    """The Python modules that define the ops of other libraries among `ops` (IR names):
    a program calling `torch.ops.transformers.grouped_mm_fallback` imports
    `transformers.integrations.moe` first, or the op does not exist in its ranks."""
    from torch._library.custom_ops import OPDEFS
    out = []
    for op in ops:
        d = REGISTRY.get(op)
        schema = getattr(getattr(d, "target", None), "_schema", None)
        if schema is None or schema.name.split("::")[0] in ("aten", "prims"):
            continue
        opdef_ = OPDEFS.get(schema.name)
        module = getattr(getattr(opdef_, "_init_fn", None), "__module__", None)
        if module and module not in out:
            out.append(module)
    return out


def bytes_moved(in_values, out_values) -> int:
    """Bytes read and written by an op (the memory side of the roofline)."""
    return sum(v.nbytes for v in in_values) + sum(v.nbytes for v in out_values)


def node_anno(node) -> DimAnno:
    return REGISTRY[node.op].annotate([v.shape for v in node.inputs],
                                      [v.shape for v in node.outputs], node.attrs)


def node_flops(node) -> int:
    """FLOPs of one node: the op's own count where the registry has one, else what
    `torch.utils.flop_counter` counts for the ATen call (an opaque einsum costs what `mm`
    costs), else one per output element (elementwise-like work).

        >>> node_flops(Node("einsum", (x, w), (("equation", "mk,kn->mn"),), (y,)))  # doctest: +SKIP
        25165824
    """
    d = REGISTRY[node.op]
    if d.flops_fn is None and not d.view and not d.elementwise and d.target is not None:
        counted = counted_flops(d, node.inputs, node.attrs)
        if counted:
            return counted
    return d.flops([v.shape for v in node.inputs], [v.shape for v in node.outputs], node.attrs)


_COUNTED: dict[tuple, int] = {}


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def counted_flops(d: OpDef, inputs, attrs) -> int:
    """FLOPs `FlopCounterMode` counts for `d` on `meta` tensors of the inputs' shapes and
    dtypes; cached per (op, shapes, dtypes, attrs), since the cost model asks per node and
    per search. 0 when torch has no formula for the op or it cannot run on `meta`.

        >>> x, w = Value("x", (8, 64)), Value("w", (64, 32))    # doctest: +SKIP
        >>> counted_flops(opdef("mm"), [x, w], ())               # doctest: +SKIP
        32768
    """
    key = (d.name, tuple((v.shape, v.dtype) for v in inputs), _hashable(attrs))
    n = _COUNTED.get(key)
    if n is None:
        from torch.utils.flop_counter import FlopCounterMode
        metas = [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in inputs]
        at = {k: (torch.device("meta") if k == "device" and v is not None else v) for k, v in attrs}
        try:
            counter = FlopCounterMode(display=False)
            with counter:
                d.run(metas, at)
            n = int(counter.get_total_flops())
        except Exception:            # no meta kernel, data-dependent output size, ...
            n = 0
        _COUNTED[key] = n
    return n


__all__ = ["OpDef", "REGISTRY", "opdef", "opdef_for_target", "register", "node_anno",
           "node_flops", "counted_flops", "bytes_moved", "NOOPS", "ir_name", "warn_opaque",
           "functional_target", "NAMED_RULES", "VOCAB_PARALLEL_CE", "EXPERT_PARALLEL_MOE",
           "class_splittable"]
