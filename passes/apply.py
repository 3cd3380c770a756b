"""Plan application: rewrite the IR to one rank's local shapes with explicit collectives.

Every edge (a value consumed by a node) is resharded from the layout its producer gives to
the layout the consumer's strategy needs, exactly as `sharding.reshard` says, one mesh
axis at a time in mesh order. Each step becomes one collective node whose forward and
backward are the runtime's differentiable collectives:

    reshard case (one axis)          node                          backward
    R -> R, consumer splits axis     copy_to(x, axis)              all_reduce
    R -> S(d)                        scatter(x, axis, dim=d)       all_gather
    S(d) -> R                        all_gather(x, axis, dim=d)    slice / reduce_scatter
    S(a) -> S(b)                     all_to_all(x, axis, b, a)     all_to_all
    P -> R                           all_reduce(x, axis)           identity (+ copy_to)
    P -> S(d)                        reduce_scatter(x, axis, d)    all_gather

A mean over a split dim leaves each rank the mean of its shard: the rewrite divides the
partial result by the number of shards (`div.Scalar`). Shape attributes (view / reshape /
expand sizes) become local sizes. The result prints in the sharded IR form:

    >>> print(print_sharded(apply_plan(graph, plan)))           # doctest: +SKIP
      %linear: f32[4,512] {dp:S(0), tp:S(1)} = linear(%x, %net.0.weight, %net.0.bias)  # net.0
      %linear_2: f32[4,64] {dp:S(0), tp:P} = linear(%gelu_1, %net.4.weight, %net.4.bias)  # net.4
      %linear_2_tp: f32[4,64] {dp:S(0), tp:R} = all_reduce(%linear_2, axis=tp)  # 1 KiB fwd

ZeRO over the data-parallel axis is applied here as well (`zero_params`): stage 2 drops the
per-use gradient all_reduces of a parameter in favour of one reduce_scatter after backward.
`predict_traffic` gives the bytes per step and rank that the runtime will count.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from math import prod

from autopar.compiler import sharding
from autopar.compiler.errors import UserError
from autopar.compiler.ir import Graph, Node, NodeMeta, Value, format_attr
from autopar.compiler.ops import REGISTRY, ArgSpec, OpDef, node_anno
from autopar.compiler.plan import Plan
from autopar.compiler.gradients import grad_info

# ---- collective ops ---------------------------------------------------------------------

COLLECTIVES = {
    # name: non-tensor arguments (the runtime function's signature after `x, mesh`)
    "copy_to": ("axis",),
    "all_reduce": ("axis",),
    "all_gather": ("axis", "dim", "partial_grad"),
    "scatter": ("axis", "dim"),
    "reduce_scatter": ("axis", "dim"),
    "all_to_all": ("axis", "split_dim", "concat_dim"),
}

for _name, _attrs in COLLECTIVES.items():
    if _name not in REGISTRY:
        REGISTRY[_name] = OpDef(_name, None, (ArgSpec("x", "tensor"),)
                                + tuple(ArgSpec(a, "other") for a in _attrs))


def is_collective(node: Node) -> bool:
    return node.op in COLLECTIVES


# `NodeMeta.source` of the scaling nodes the rewrite inserts (codegen comments on them)
MEAN_SCALE = "autopar:mean_over_shards"
BIAS_SHARE = "autopar:bias_share"


def is_inserted_scale(node: Node) -> bool:
    return node.meta.source in (MEAN_SCALE, BIAS_SHARE)


# ---- the rewrite ------------------------------------------------------------------------

class PlanError(UserError, ValueError):
    """The plan does not fit the graph (unknown key, shard sizes not divisible...)."""


SHAPE_ATTRS = ("size", "shape")


def apply_plan(graph: Graph, plan: Plan) -> Graph:
    """One rank's program: local shapes, explicit collectives, mean scaling.

    The returned graph carries `layouts` (value name -> layout), `global_shapes`,
    `needs_grad` (value names whose gradient is computed), `mesh`, `plan`, `edge_bytes`
    (what `sharding.reshard` predicts, summed) and `zero` (a `ZeroParams`)."""
    mesh = dict(plan.mesh)
    rep = tuple(None for _ in mesh)
    strategies = {k: tuple(v) for k, v in plan.strategies.items()}
    known = {v.name for v in (*graph.inputs, *graph.params)} | {n.outputs[0].name for n in graph.nodes}
    unknown = sorted(set(strategies) - known)
    if unknown:
        raise PlanError(f"plan for {plan.model} names {len(unknown)} values the graph does not have "
                        f"(first: {unknown[0]}); was it made for another model or version?")
    annos = {n.outputs[0].name: node_anno(n) for n in graph.nodes}
    layouts = sharding.derive_layouts(graph, mesh, strategies, annos)
    for name, lay in plan.layouts.items():
        if name in layouts and tuple(lay) != layouts[name]:
            raise PlanError(f"plan layout of %{name} is {sharding.format_layout(mesh, tuple(lay))} but "
                            f"its strategy gives {sharding.format_layout(mesh, layouts[name])}")
    needs = set(grad_info(graph).needs_grad)
    dp = dp_axis(plan)
    zero = zero_params(graph, plan, strategies, annos, layouts) if dp else ZeroParams(dp, 0, [], set())

    out_layouts: dict[str, tuple] = {}
    global_shapes: dict[str, tuple] = {}
    used = {v.name for v in graph.values()}
    new: dict[Value, Value] = {}

    def local(v: Value, layout, name=None) -> Value:
        shape = local_shape_checked(v.shape, layout, mesh, name or v.name)
        nv = Value(name or v.name, shape, v.dtype, v.kind, v.requires_grad)
        out_layouts[nv.name] = tuple(layout)
        global_shapes[nv.name] = tuple(v.shape)
        return nv

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        return name

    inputs = [local(v, layouts[v.name]) for v in graph.inputs]
    params = [local(v, layouts[v.name]) for v in graph.params]
    new.update(zip(graph.inputs, inputs))
    new.update(zip(graph.params, params))
    nodes: list[Node] = []
    edge_bytes: dict[tuple[str, str], int] = {}

    for node in graph.nodes:
        key = node.outputs[0].name
        strat = strategies.get(key, rep)
        anno = annos[key]
        splits = sharding.split_axes(strat)
        meta = NodeMeta(node.meta.module, "")
        operands = []
        for i, v in enumerate(node.inputs):
            src, dst = layouts[v.name], sharding.input_layout(anno, strat, i)
            grad = v.name in needs
            skip = zero.skips_grad_reduce(v.name)
            cols = sharding.reshard(src, dst, v.shape, v.itemsize, mesh, splits, grad)
            for c in cols:
                if skip and c.kind == "all_reduce" and c.phase == "backward" and c.axis == dp:
                    continue
                edge_bytes[(c.kind, c.axis)] = edge_bytes.get((c.kind, c.axis), 0) + c.bytes
            x = new[v]
            for step in reshard_steps(src, dst, mesh, splits, grad, skip_axis=dp if skip else None):
                lay = step.layout
                g = Value(x.name, v.shape, v.dtype)   # global type of the step's result
                y = local(g, lay, fresh(f"{v.name}_{step.axis}"))
                nodes.append(Node(step.op, (x,), step.attrs, (y,), meta))
                if grad:
                    needs.add(y.name)
                x = y
            ways = prod(n for lab, n in zip(strat, mesh.values()) if lab is not None and lab in anno.reduce)
            if node.op == "linear" and i == 2 and ways > 1:
                # the contraction dim is split: each rank holds a partial sum, and would add
                # the replicated bias once per rank; each adds 1/n of it (DTensor's R -> P)
                y = local(Value(x.name, v.shape, v.dtype), out_layouts[x.name], fresh(f"{v.name}_share"))
                nodes.append(Node("div.Scalar", (x,), (("other", ways),), (y,), NodeMeta(meta.module, BIAS_SHARE)))
                if grad:
                    needs.add(y.name)
                x = y
            operands.append(x)
        outs = tuple(local(v, layouts[v.name]) for v in node.outputs)
        nodes.append(node.replace(inputs=tuple(operands), outputs=outs,
                                  attrs=localize_attrs(node, outs), meta=meta))
        new.update(zip(node.outputs, outs))
        # a mean over a split dim: each rank holds the mean of its shard
        ways = prod(n for lab, n in zip(strat, mesh.values()) if lab is not None and lab in anno.mean)
        if ways > 1:
            (v,) = node.outputs
            y = local(v, layouts[v.name], fresh(f"{v.name}_mean"))
            nodes.append(Node("div.Scalar", (outs[0],), (("other", ways),), (y,), NodeMeta(meta.module, MEAN_SCALE)))
            if v.name in needs:
                needs.add(y.name)
            new[v] = y

    g = graph.copy(inputs=inputs, params=params, nodes=nodes, outputs=[new[v] for v in graph.outputs])
    g.name = graph.name
    g.notes = list(graph.notes) + [f"apply_plan: mesh {sharding.format_mesh(mesh)}, "
                                   f"{sum(map(is_collective, nodes))} collectives, zero={plan.zero}"]
    g.layouts = out_layouts                              # type: ignore[attr-defined]
    g.global_shapes = global_shapes                      # type: ignore[attr-defined]
    g.needs_grad = needs                                 # type: ignore[attr-defined]
    g.mesh = mesh                                        # type: ignore[attr-defined]
    g.plan = plan                                        # type: ignore[attr-defined]
    g.edge_bytes = edge_bytes                            # type: ignore[attr-defined]
    g.zero = zero                                        # type: ignore[attr-defined]
    return g


def dp_axis(plan: Plan) -> str | None:
    """The data-parallel axis ZeRO shards over: the plan's, else `dp` when the mesh has it."""
    if plan.dp_axis:
        return plan.dp_axis
    return "dp" if "dp" in plan.mesh else None


def local_shape_checked(shape, layout, mesh, name) -> tuple[int, ...]:
    for p, (axis, n) in zip(layout, mesh.items()):
        d = sharding.shard_dim(p)
        if d is not None and shape[d] % n:
            raise PlanError(f"%{name}: dim {d} of size {shape[d]} cannot be split {n} ways over "
                            f"{axis} (layout {sharding.format_layout(mesh, tuple(layout))})")
    return sharding.local_shape(shape, layout, mesh)


def localize_attrs(node: Node, outs: tuple[Value, ...]) -> tuple:
    """View / reshape / expand sizes become this rank's output shape."""
    if len(outs) != 1:
        return node.attrs
    out = []
    for k, v in node.attrs:
        if k in SHAPE_ATTRS and isinstance(v, (list, tuple)) and len(v) == len(node.outputs[0].shape):
            v = list(outs[0].shape)
        out.append((k, v))
    return tuple(out)


@dataclass(frozen=True)
class Step:
    op: str
    axis: str
    attrs: tuple
    layout: tuple          # layout after this step


def reshard_steps(src, dst, mesh, splits=frozenset(), needs_grad=True, skip_axis=None) -> list[Step]:
    """The runtime calls that carry out `sharding.reshard(src, dst, ...)`, one per axis in
    mesh order (a P -> R step whose consumer splits the axis is all_reduce then copy_to).
    `skip_axis`: ZeRO-2 leaves the gradient of a parameter partial there (no copy_to)."""
    cur = list(src)
    steps: list[Step] = []
    for i, (a, n) in enumerate(mesh.items()):
        s, d = cur[i], dst[i]
        cur[i] = d
        if n == 1:
            continue
        sd, dd = sharding.shard_dim(s), sharding.shard_dim(d)
        split_here = i in splits and needs_grad and a != skip_axis
        lay = tuple(cur)
        if s == d:
            if d == "R" and split_here:
                steps.append(Step("copy_to", a, (("axis", a),), lay))
        elif s == "R" and dd is not None:
            steps.append(Step("scatter", a, (("axis", a), ("dim", dd)), lay))
        elif sd is not None and d == "R":
            steps.append(Step("all_gather", a, (("axis", a), ("dim", sd), ("partial_grad", split_here)), lay))
        elif sd is not None and dd is not None:
            steps.append(Step("all_to_all", a, (("axis", a), ("split_dim", dd), ("concat_dim", sd)), lay))
        elif s == "P" and d == "R":
            steps.append(Step("all_reduce", a, (("axis", a),), lay))
            if split_here:
                steps.append(Step("copy_to", a, (("axis", a),), lay))
        elif s == "P" and dd is not None:
            steps.append(Step("reduce_scatter", a, (("axis", a), ("dim", dd)), lay))
        else:
            raise PlanError(f"cannot reshard {s} -> {d} on axis {a}")
    return steps


# ---- ZeRO ---------------------------------------------------------------------------------

@dataclass
class ZeroParams:
    """Which parameters ZeRO-1/2 shards over `axis` (flattened, padded to a multiple of the
    axis size), and for stage 2 which of them skip the per-use gradient all_reduce."""
    axis: str | None
    stage: int
    params: list[str]                 # optimizer state sharded (stages 1, 2)
    reduce_scatter: set[str]          # stage 2: gradients reduce_scattered after backward

    def skips_grad_reduce(self, value: str) -> bool:
        return value in self.reduce_scatter


def zero_params(graph: Graph, plan: Plan, strategies, annos, layouts) -> ZeroParams:
    """Stage 1 and 2 apply to trainable parameters replicated over dp. A stage-3 plan shards
    parameters through their own strategy; one it leaves R on dp (no dim divides) is treated
    as stage 2. Stage 2 reduce_scatters a gradient only when every direct use splits dp,
    i.e. each use's gradient is a partial sum over dp."""
    axis = dp_axis(plan)
    if plan.zero not in (1, 2, 3) or axis not in plan.mesh or plan.mesh[axis] == 1:
        return ZeroParams(axis, plan.zero, [], set())
    i = list(plan.mesh).index(axis)
    users = graph.users()
    rep = tuple(None for _ in plan.mesh)
    chosen, rs = [], set()
    for p in graph.params:
        if not p.requires_grad or layouts[p.name][i] != "R":
            continue
        chosen.append(p.name)
        if plan.zero >= 2 and users[p]:
            ok = True
            for n in users[p]:
                key = n.outputs[0].name
                strat = strategies.get(key, rep)
                for j, v in enumerate(n.inputs):
                    if v is p and not (strat[i] is not None
                                       and sharding.input_layout(annos[key], strat, j)[i] == "R"):
                        ok = False
            if ok:
                rs.add(p.name)
    return ZeroParams(axis, plan.zero, chosen, rs)


def zero_chunk(numel: int, n: int) -> int:
    """Elements of a parameter each rank owns under ZeRO-1/2 (padded to n equal chunks)."""
    return math.ceil(numel / n)


# ---- recompute regions ------------------------------------------------------------------------

def matches(module: str, patterns) -> bool:
    """`transformer.h.*` matches every node under `transformer.h.<i>`; a plain path matches
    its module and everything below it."""
    return bool(module) and any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(module, p + ".*")
                                for p in patterns)


def recompute_regions(graph: Graph, patterns) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive nodes whose module matches a pattern.
    Runs of one collective only (nothing to recompute) are dropped."""
    out, start = [], None
    for i, n in enumerate([*graph.nodes, None]):
        hit = n is not None and matches(n.meta.module, patterns)
        if hit and start is None:
            start = i
        elif not hit and start is not None:
            if not all(is_collective(m) for m in graph.nodes[start:i]):
                out.append((start, i))
            start = None
    return out


def region_io(graph: Graph, start: int, end: int) -> tuple[list[Value], list[Value]]:
    """Activations a region reads from before it, and values it defines that are used after it
    (or returned). Parameters are not listed: the region reads them from the module."""
    inside = graph.nodes[start:end]
    defined = {v for n in inside for v in n.outputs}
    ins: dict[Value, None] = {}
    for n in inside:
        for v in n.inputs:
            if v not in defined and v.kind not in ("param", "buffer"):
                ins.setdefault(v, None)
    later = {v for n in graph.nodes[end:] for v in n.inputs} | set(graph.outputs)
    outs = [v for n in inside for v in n.outputs if v in later]
    return list(ins), outs


# ---- traffic -------------------------------------------------------------------------------------

def nbytes(v: Value) -> int:
    return v.numel * v.itemsize


def collective_traffic(node: Node, needs_grad: bool) -> list[tuple[str, str, int, str]]:
    """(kind, axis, bytes, phase) that the runtime records for one collective node."""
    a = node.attr
    axis = a["axis"]
    x, y = node.inputs[0], node.outputs[0]
    out = []
    if node.op == "all_reduce":
        out.append(("all_reduce", axis, nbytes(x), "forward"))
    elif node.op == "copy_to" and needs_grad:
        out.append(("all_reduce", axis, nbytes(x), "backward"))
    elif node.op == "all_gather":
        out.append(("all_gather", axis, nbytes(y), "forward"))
        if needs_grad and a["partial_grad"]:
            out.append(("reduce_scatter", axis, nbytes(y), "backward"))
    elif node.op == "scatter" and needs_grad:
        out.append(("all_gather", axis, nbytes(x), "backward"))
    elif node.op == "reduce_scatter":
        out.append(("reduce_scatter", axis, nbytes(x), "forward"))
        if needs_grad:
            out.append(("all_gather", axis, nbytes(x), "backward"))
    elif node.op == "all_to_all":
        out.append(("all_to_all", axis, nbytes(x), "forward"))
        if needs_grad:
            out.append(("all_to_all", axis, nbytes(y), "backward"))
    return out


def predict_traffic(sharded: Graph) -> dict[str, int]:
    """Bytes per training step and rank, keyed `kind:axis` (the runtime's accounting):
    forward and backward collectives, forward collectives of recompute regions again in
    backward, and ZeRO-1/2's reduce_scatter / all_gather around the optimizer step."""
    needs = sharded.needs_grad                       # type: ignore[attr-defined]
    plan: Plan = sharded.plan                        # type: ignore[attr-defined]
    zero: ZeroParams = sharded.zero                  # type: ignore[attr-defined]
    mesh = sharded.mesh                              # type: ignore[attr-defined]
    total: dict[str, int] = {}

    def add(kind, axis, b):
        k = f"{kind}:{axis}"
        total[k] = total.get(k, 0) + b
    again = set()
    for start, end in recompute_regions(sharded, plan.recompute):
        _, outs = region_io(sharded, start, end)
        if any(v.name in needs for v in outs):
            again.update(range(start, end))
    for i, n in enumerate(sharded.nodes):
        if not is_collective(n):
            continue
        for kind, axis, b, phase in collective_traffic(n, n.inputs[0].name in needs):
            add(kind, axis, b)
            if phase == "forward" and i in again:
                add(kind, axis, b)
    if zero.params:
        n = mesh[zero.axis]
        for p in sharded.params:
            if p.name in zero.params:
                padded = zero_chunk(p.numel, n) * n * p.itemsize
                if p.name in zero.reduce_scatter:
                    add("reduce_scatter", zero.axis, padded)
                add("all_gather", zero.axis, padded)
    return dict(sorted(total.items()))


def format_bytes(b: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            v = b / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{b} B"


# ---- printer -------------------------------------------------------------------------------------

def collective_comment(node: Node, needs_grad: bool) -> str:
    parts = []
    for kind, axis, b, phase in collective_traffic(node, needs_grad):
        tag = "fwd" if phase == "forward" else "bwd"
        parts.append(f"{format_bytes(b)} {tag}" if kind == node.op else f"{kind} {format_bytes(b)} {tag}")
    return ", ".join(parts) or "no data moved"


def print_sharded(sharded: Graph) -> str:
    """The sharded IR: local types, layouts after the type, bytes on collectives.

        %y: f32[8,64] {dp:S(0), tp:P} = linear(%h1, %fc2.weight)            # fc2
        %y_tp: f32[8,64] {dp:S(0), tp:R} = all_reduce(%y, axis=tp)          # 2 KiB fwd
    """
    mesh = sharded.mesh                              # type: ignore[attr-defined]
    lay = sharded.layouts                            # type: ignore[attr-defined]
    needs = sharded.needs_grad                       # type: ignore[attr-defined]
    plan: Plan = sharded.plan                        # type: ignore[attr-defined]

    def note(v: Value) -> str:
        return " " + sharding.format_layout(mesh, lay[v.name])

    lines = [f"# {n}" for n in sharded.notes]
    lines.append(f"# mesh {sharding.format_mesh(mesh)}; zero={plan.zero}"
                 + (f"; recompute {', '.join(plan.recompute)}" if plan.recompute else ""))
    ins = ", ".join(f"{v!r}{note(v)}" for v in sharded.inputs)
    lines.append(f"graph {sharded.name}({ins}) {{")
    tied: dict[str, list[str]] = {}
    for alias, target in sorted(sharded.aliases.items()):
        tied.setdefault(target, []).append(alias)
    for p in sharded.params:
        flag = "" if p.kind == "buffer" else (" trainable" if p.requires_grad else " frozen")
        extra = f"  (tied: {', '.join(tied[p.name])})" if p.name in tied else ""
        lines.append(f"  {p.kind} {p!r}{note(p)}{flag}{extra}")
    regions = {s: e for s, e in recompute_regions(sharded, plan.recompute)}
    end = None
    for i, node in enumerate(sharded.nodes):
        if i in regions:
            end = regions[i]
            lines.append("  recompute {")
        lhs = ", ".join(f"{o!r}{note(o)}" for o in node.outputs)
        args = [f"%{v.name}" for v in node.inputs]
        args += [f"{k}={v}" if k == "axis" else f"{k}={format_attr(v)}" for k, v in node.attrs]
        indent = "    " if end is not None else "  "
        line = f"{indent}{lhs} = {node.op}({', '.join(args)})"
        comment = (collective_comment(node, node.inputs[0].name in needs) if is_collective(node)
                   else node.meta.module)
        if comment:
            line = f"{line:<90}  # {comment}"
        lines.append(line)
        if end is not None and i + 1 == end:
            lines.append("  }")
            end = None
    lines.append(f"  return {', '.join('%' + v.name for v in sharded.outputs)}")
    lines.append("}")
    traffic = predict_traffic(sharded)
    if traffic:
        lines.append("# bytes per step and rank: " + ", ".join(
            f"{k} {format_bytes(b)}" for k, b in traffic.items()))
    return "\n".join(lines) + "\n"


__all__ = ["apply_plan", "print_sharded", "predict_traffic", "reshard_steps", "recompute_regions",
           "region_io", "collective_traffic", "is_collective", "COLLECTIVES", "PlanError",
           "ZeroParams", "zero_chunk", "format_bytes", "dp_axis", "MEAN_SCALE", "BIAS_SHARE",
           "is_inserted_scale"]
