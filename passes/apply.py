"""Plan application: rewrite the IR to one rank's local shapes with explicit collectives.

Every edge (a value consumed by a node) is resharded from the layout its producer gives to
the layout the consumer's strategy needs: the program steps `sharding.reshard_steps` lists
(from the collective table, `compiler/collectives.py`), one collective node each, whose
forward and backward are the runtime's differentiable collectives.

A value resharded the same way for several consumers is resharded once (collective CSE):
GPT's `ln_1` output is gathered once for q, k and v, so its gradient is reduced once. A
shared step lives where its first consumer needs it and takes the module its consumers
share; consumers in different recompute regions never share a step (each region recomputes
its own), exactly as the cost model prices it.

A mean over a split dim leaves each rank the mean of its shard: the rewrite divides the
partial result by the number of shards (`div.Scalar`). A cross-entropy whose class dim an
axis splits becomes the vocab-parallel loss (`vocab_parallel_loss`): the logits stay split
and each rank's result is a partial sum over that axis. A bias added under a contraction
split (row-parallel linear) is added as 1/n of it on each rank. Shape attributes (view /
reshape / expand sizes) become local sizes.

    >>> sharded = apply_plan(graph, plan)                                # doctest: +SKIP
    >>> print(print_sharded(sharded))                                    # doctest: +SKIP

ZeRO over the data-parallel axis is applied here as well (`zero_params`): stage 2 drops the
per-use gradient all_reduce of a parameter in favour of one reduce_scatter after backward.
"""
from __future__ import annotations

from math import prod

from autopar.compiler import sharding
from autopar.compiler.errors import UserError
from autopar.compiler.gradients import grad_info
from autopar.compiler.ir import Graph, Node, NodeMeta, SymInt, Value, namer
from autopar.compiler.ops import EXPERT_PARALLEL_MOE, VOCAB_PARALLEL_CE, node_anno
from autopar.compiler.patterns import recompute_runs
from autopar.compiler.plan import Plan
from autopar.compiler.sharded import (BIAS_SHARE, MEAN_SCALE, Region, ShardedGraph, ZeroParams,
                                      is_collective, predict_traffic, print_sharded, zero_chunk)


class PlanError(UserError, ValueError):
    """The plan does not fit the graph (unknown key, shard sizes not divisible...)."""


SHAPE_ATTRS = ("size", "shape")


def common_module(a: str, b: str) -> str:
    """The innermost module containing both paths (`transformer.h.0.attn.c_attn` and
    `transformer.h.0.attn.c_proj` -> `transformer.h.0.attn`)."""
    pa, pb = a.split("."), b.split(".")
    k = 0
    while k < min(len(pa), len(pb)) and pa[k] == pb[k]:
        k += 1
    return ".".join(pa[:k])


def apply_plan(graph: Graph, plan: Plan) -> ShardedGraph:
    """One rank's program: local shapes, explicit (shared) collectives, mean scaling."""
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
    # each node's recompute region (module, run) -- the same runs the cost model prices
    region: dict[int, tuple[str, int]] = {}
    for k, (path, start, end) in enumerate(recompute_runs(graph.nodes, plan.recompute)):
        for i in range(start, end):
            region[i] = (path, k)

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

    fresh = namer(used)

    inputs = [local(v, layouts[v.name]) for v in graph.inputs]
    params = [local(v, layouts[v.name]) for v in graph.params]
    new.update(zip(graph.inputs, inputs))
    new.update(zip(graph.params, params))
    # the program, as [node, region] entries (a list, so steps can be placed before a region)
    entries: list[list] = []
    shared: dict[tuple, list] = {}                   # (value, step, region) -> entry
    run_start: dict[tuple, list] = {}                # region -> its first entry
    producer = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}

    def append(node: Node, r, before_region=None) -> list:
        entry = [node, r]
        if before_region is not None and before_region in run_start:
            at = next(k for k, e in enumerate(entries) if e is run_start[before_region])
            entries.insert(at, entry)
        else:
            entries.append(entry)
            if r is not None:
                run_start.setdefault(r, entry)
        return entry

    for idx, node in enumerate(graph.nodes):
        key = node.outputs[0].name
        strat = strategies.get(key, rep)
        anno = annos[key]
        splits = sharding.split_axes(strat)
        here = region.get(idx)
        module = node.meta.module
        meta = NodeMeta(module, "", node.meta.line)
        operands = []
        for i, v in enumerate(node.inputs):
            src, dst = layouts[v.name], sharding.input_layout(anno, strat, i)
            grad = v.name in needs
            skip = zero.skips_grad_reduce(v.name)
            # an activation made outside this node's recompute region is resharded outside
            # it, once for every consumer that needs it so (the region recomputes its own
            # work); a parameter is resharded inside (gathered again when recomputed)
            inside = v.kind in ("param", "buffer") or region.get(producer.get(v, -1)) == here
            chain_region = here if inside else None
            x = new[v]
            for step in sharding.reshard_steps(src, dst, v.shape, v.itemsize, mesh, splits, grad):
                if skip and step.op == "copy_to" and step.axis == dp:
                    continue          # ZeRO-2: the gradient is reduce_scattered after backward
                attrs = (("axis", step.axis),) + tuple(step.attrs)
                ck = (x, step.op, attrs, chain_region)
                hit = shared.get(ck)
                if hit is not None:
                    m = hit[0]
                    hit[0] = m.replace(meta=NodeMeta(common_module(m.meta.module, module), ""))
                    y = m.outputs[0]
                else:
                    y = local(Value(x.name, v.shape, v.dtype), step.after, fresh(f"{v.name}_{step.axis}"))
                    shared[ck] = append(Node(step.op, (x,), attrs, (y,), NodeMeta(module, "")),
                                        chain_region, before_region=here if chain_region is None else None)
                    if grad:
                        needs.add(y.name)
                x = y
            ways = prod(n for lab, n in zip(strat, mesh.values()) if lab is not None and lab in anno.reduce)
            if ways > 1 and ((node.op == "linear" and i == 2) or (node.op == "addmm" and i == 0)):
                # the contraction dim is split: each rank holds a partial sum, and would add
                # the replicated bias once per rank; each adds 1/n of it (DTensor's R -> P)
                y = local(Value(x.name, v.shape, v.dtype), out_layouts[x.name], fresh(f"{v.name}_share"))
                append(Node("div.Scalar", (x,), (("other", ways),), (y,), NodeMeta(module, BIAS_SHARE)), here)
                if grad:
                    needs.add(y.name)
                x = y
            operands.append(x)
        outs = tuple(local(v, layouts[v.name]) for v in node.outputs)
        local_node = node.replace(inputs=tuple(operands), outputs=outs, attrs=localize_attrs(node, outs),
                                  meta=meta)
        class_axis = sharding.split_class_axis(node.op, anno, strat, mesh)
        if class_axis is not None:
            local_node = vocab_parallel_loss(local_node, class_axis)
        expert_axis = sharding.split_expert_axis(node.op, anno, strat, mesh)
        if expert_axis is not None:
            local_node = local_node.replace(op=EXPERT_PARALLEL_MOE, attrs=(("axis", expert_axis),))
        append(local_node, here)
        new.update(zip(node.outputs, outs))
        # a mean over a split dim: each rank holds the mean of its shard
        ways = prod(n for lab, n in zip(strat, mesh.values()) if lab is not None and lab in anno.mean)
        if ways > 1:
            (v,) = node.outputs
            y = local(v, layouts[v.name], fresh(f"{v.name}_mean"))
            append(Node("div.Scalar", (outs[0],), (("other", ways),), (y,), NodeMeta(module, MEAN_SCALE)), here)
            if v.name in needs:
                needs.add(y.name)
            new[v] = y

    nodes = [e[0] for e in entries]
    node_region = [e[1] for e in entries]
    g = graph.copy(inputs=inputs, params=params, nodes=nodes, outputs=[new[v] for v in graph.outputs])
    g.notes = list(graph.notes) + [f"apply_plan: mesh {sharding.format_mesh(mesh)}, "
                                   f"{sum(map(is_collective, nodes))} collectives, zero={plan.zero}"]
    regions, start = [], 0
    for i in range(1, len(nodes) + 1):
        if i == len(nodes) or node_region[i] != node_region[start]:
            if node_region[start] is not None:
                regions.append(Region(node_region[start][0], start, i))
            start = i
    return ShardedGraph(g, mesh, plan, out_layouts, global_shapes, needs, zero, regions)


def vocab_parallel_loss(node: Node, axis: str) -> Node:
    """A cross-entropy whose class dim `axis` splits, as the vocab-parallel loss: the same
    operands (logits [N, C/k], targets [N]) and result, now this rank's partial sum over
    `axis`, with the global log-sum-exp reduced inside (compiler/ops.VOCAB_PARALLEL_CE)."""
    a = node.attr
    attrs = (("axis", axis), ("ignore_index", a.get("ignore_index", -100)),
             ("reduction", a.get("reduction", 1)))
    return node.replace(op=VOCAB_PARALLEL_CE, attrs=attrs)


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
    """View / reshape / expand sizes become this rank's output shape: an inferred `-1`
    stays, a size from the batch (`SymInt`) keeps its expression, divided by its shards."""
    if len(outs) != 1:
        return node.attrs
    out = []
    full = node.outputs[0].shape
    for k, v in node.attrs:
        if k in SHAPE_ATTRS and isinstance(v, (list, tuple)) and len(v) == len(full):
            v = [a if a == -1 else a.scaled(g // n) if isinstance(a, SymInt) and n else n
                 for a, g, n in zip(v, full, outs[0].shape)]
        out.append((k, v))
    return tuple(out)


# ---- ZeRO ---------------------------------------------------------------------------------

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
        if plan.zero >= 2 and users[p] and every_use_splits(p, users[p], strategies, annos, rep, i):
            rs.add(p.name)
    return ZeroParams(axis, plan.zero, chosen, rs)


def every_use_splits(p: Value, users, strategies, annos, rep, i: int) -> bool:
    """Every use of `p` splits axis `i` and reads `p` replicated there: the gradient of each
    use is a partial sum over that axis."""
    for n in users:
        key = n.outputs[0].name
        strat = strategies.get(key, rep)
        for j, v in enumerate(n.inputs):
            if v is p and not (strat[i] is not None
                               and sharding.input_layout(annos[key], strat, j)[i] == "R"):
                return False
    return True


__all__ = ["apply_plan", "print_sharded", "predict_traffic", "PlanError", "ZeroParams", "zero_chunk",
           "dp_axis", "every_use_splits", "common_module"]
