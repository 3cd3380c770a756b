"""The sharded program of one rank: what plan application (passes/apply.py) returns and the
code generators read.

A `ShardedGraph` is the rank's IR (local shapes, explicit collective nodes from the
collective table) with everything later stages need beside it: the mesh and plan, every
value's layout and global shape, which values need a gradient, the ZeRO state sharded over
the data-parallel axis and the recompute regions. Its bytes per step come from the same
table the cost model prices (`collectives.traffic`):

    >>> sharded = apply_plan(graph, plan)                           # doctest: +SKIP
    >>> sharded.traffic()                                           # doctest: +SKIP
    {'all_gather:tp': 368640, 'all_reduce:dp': 234752, ...}
    >>> print(print_sharded(sharded))                               # doctest: +SKIP
      %linear_2: f32[4,64] {dp:S(0), tp:P} = linear(%gelu_1, %net.4.weight, %net.4.bias)  # net.4
      %linear_2_tp: f32[4,64] {dp:S(0), tp:R} = all_reduce(%linear_2, axis=tp)          # 1 KiB fwd
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from autopar.compiler import collectives, sharding
from autopar.compiler.ir import Graph, Node, Value, format_attr
from autopar.compiler.ops import EXPERT_PARALLEL_MOE, VOCAB_PARALLEL_CE
from autopar.compiler.plan import Plan

# `NodeMeta.source` of the scaling nodes plan application inserts (codegen comments on them)
MEAN_SCALE = "autopar:mean_over_shards"
BIAS_SHARE = "autopar:bias_share"


def is_collective(node: Node) -> bool:
    return node.op in collectives.OPS


def moves_data(node: Node) -> bool:
    """A collective node, or an op that communicates inside (the vocab-parallel loss, an
    expert-parallel layer)."""
    return is_collective(node) or node.op in (VOCAB_PARALLEL_CE, EXPERT_PARALLEL_MOE)


def is_inserted_scale(node: Node) -> bool:
    return node.meta.source in (MEAN_SCALE, BIAS_SHARE)


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


def zero_chunk(numel: int, n: int) -> int:
    """Elements of a parameter each rank owns under ZeRO-1/2 (padded to n equal chunks)."""
    return math.ceil(numel / n)


@dataclass
class Region:
    """A recompute region of the sharded program: nodes [start, end) of module `module`."""
    module: str
    start: int
    end: int


@dataclass
class ShardedGraph:
    """One rank's program and what it was made from (see the module docstring)."""
    graph: Graph
    mesh: dict[str, int]
    plan: Plan
    layouts: dict[str, tuple]             # value name -> layout
    global_shapes: dict[str, tuple]       # value name -> unsharded shape
    needs_grad: set[str]                  # value names whose gradient is computed
    zero: ZeroParams
    regions: list[Region] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overlap: Any = None                   # passes/overlap.Overlap: buckets, prefetch (None: not run)

    # the local graph's parts, read through
    @property
    def nodes(self) -> list[Node]:
        return self.graph.nodes

    @property
    def inputs(self) -> list[Value]:
        return self.graph.inputs

    @property
    def params(self) -> list[Value]:
        return self.graph.params

    @property
    def outputs(self) -> list[Value]:
        return self.graph.outputs

    def node_traffic(self, node: Node) -> list[tuple[str, str, int, str]]:
        """(kind, axis, bytes, phase) the runtime records for one collective node, or for
        the vocab-parallel loss (its two all_reduces inside the op)."""
        if node.op == VOCAB_PARALLEL_CE:
            return loss_traffic(node)
        if node.op == EXPERT_PARALLEL_MOE:
            grads = (node.outputs[0].name in self.needs_grad) + (node.inputs[0].name in self.needs_grad)
            return moe_traffic(node, self.mesh, grads)
        return node_traffic(node, node.inputs[0].name in self.needs_grad)

    def recomputed(self) -> set[int]:
        """Indices of nodes inside a recompute region whose result backward needs (their
        forward collectives run again during backward)."""
        again: set[int] = set()
        for r in self.regions:
            _, outs = region_io(self.graph, r.start, r.end)
            if any(v.name in self.needs_grad for v in outs):
                again.update(range(r.start, r.end))
        return again

    def calls(self) -> list[tuple[str, int]]:
        """Every collective call of one training step and rank as (`kind:axis`, bytes), the
        runtime's accounting: forward and backward collectives (and ZeRO-3's gathers again in
        backward) once per microbatch (a collective matmul's ring as the one collective it
        replaces), the forward collectives of recompute regions again in backward, the
        gradient buckets of the overlap schedule once per step, and ZeRO-1/2's
        reduce_scatter / all_gather around the optimizer step."""
        out: list[tuple[str, int]] = []
        again = self.recomputed()
        per_microbatch: list[tuple[str, int]] = []
        seen: set[tuple] = set()           # (weight, kind) already in its unit's flat call
        m = max(1, int(getattr(self.plan, "microbatches", 1) or 1))
        batch = self.batch_symbols() if m > 1 else set()
        o = self.overlap
        groups = o.gather_groups if o is not None and o.gathers else {}
        flat: dict[tuple, int] = {}         # (ZeRO-3 unit, kind) -> index of its one flat call
        for i, n in enumerate(self.nodes):
            if not moves_data(n):
                continue
            # a microbatch moves 1/m of a value whose size comes from the batch
            share = m if batch and depends_on(self.global_shapes.get(n.inputs[0].name, ()), batch) else 1
            for j, (kind, axis, b, phase) in enumerate(self.node_traffic(n)):
                if n.op == EXPERT_PARALLEL_MOE and j == 0:
                    per_microbatch.append((f"{kind}:{axis}", b))    # the counts: E values each time
                    continue
                g = groups.get(n.inputs[0].name) if groups and n.outputs[0].name in o.gathers else None
                if g is not None and (kind, phase) in (("all_gather", "forward"), ("reduce_scatter", "backward")):
                    # ZeRO-3 gathers a unit's weights of one dtype in one flat all_gather
                    # (the first gather of each weight; a second one runs on its own), and
                    # reduce_scatters their gradients in one flat call (a weight used twice
                    # sends its summed gradient once)
                    if (g, kind) not in flat:
                        flat[(g, kind)] = len(per_microbatch)
                        per_microbatch.append((f"{kind}:{axis}", 0))
                    if (n.inputs[0].name, kind) not in seen:
                        seen.add((n.inputs[0].name, kind))
                        k, total = per_microbatch[flat[(g, kind)]]
                        per_microbatch[flat[(g, kind)]] = (k, total + b // share)
                        continue
                    if kind == "reduce_scatter":
                        continue
                per_microbatch.append((f"{kind}:{axis}", b // share))
                if phase == "forward" and i in again:
                    per_microbatch.append((f"{kind}:{axis}", b // share))
        if self.overlap is not None:
            per_microbatch += self.overlap.per_microbatch()
        for _ in range(m):          # every microbatch runs the graph's collectives
            out += per_microbatch
        if self.overlap is not None:
            out += self.overlap.call_list()       # the buckets: once, after the last
        z = self.zero
        if z.params:
            n = self.mesh[z.axis]
            bucketed = self.overlap.scattered() if self.overlap is not None else set()
            for p in self.params:
                if p.name in z.params:
                    padded = zero_chunk(p.numel, n) * n * p.itemsize
                    if p.name in z.reduce_scatter and p.name not in bucketed:
                        out.append((f"reduce_scatter:{z.axis}", padded))
                    out.append((f"all_gather:{z.axis}", padded))
        return out

    def batch_symbols(self) -> set[str]:
        """The traced symbols of the inputs' batch dim (dim 0 of the inputs whose dim 0 is the
        first input's): what microbatching divides."""
        sizes = self.graph.input_sizes
        if not self.inputs:
            return set()
        n = self.global_shapes[self.inputs[0].name][0] if self.global_shapes[self.inputs[0].name] else None
        out = set()
        for v in self.inputs:
            d0 = (sizes.get(v.name) or [None])[0]
            if isinstance(d0, str) and self.global_shapes[v.name] and self.global_shapes[v.name][0] == n:
                out.add(d0)
        return out

    def traffic(self) -> dict[str, int]:
        """Bytes per training step and rank, keyed `kind:axis` (see `calls`)."""
        total: dict[str, int] = {}
        for k, b in self.calls():
            total[k] = total.get(k, 0) + b
        return dict(sorted(total.items()))

    def call_counts(self) -> dict[str, int]:
        """Collective calls per training step and rank, keyed `kind:axis`."""
        total: dict[str, int] = {}
        for k, _ in self.calls():
            total[k] = total.get(k, 0) + 1
        return dict(sorted(total.items()))


def depends_on(shape, symbols: set[str]) -> bool:
    """Whether one of the sizes of `shape` is an expression over one of `symbols`."""
    for d in shape:
        expr = getattr(d, "expr", None)
        if expr and any(re.search(rf"\b{re.escape(sym)}\b", expr) for sym in symbols):
            return True
    return False


def nbytes(v: Value) -> int:
    return v.numel * v.itemsize


def node_traffic(node: Node, needs_grad: bool) -> list[tuple[str, str, int, str]]:
    """(kind, axis, bytes, phase) of one collective node, from the collective table."""
    a = node.attr
    return [(kind, a["axis"], b, phase) for kind, phase, b in
            collectives.traffic(node.op, a, nbytes(node.inputs[0]), nbytes(node.outputs[0]), needs_grad)]


def loss_traffic(node: Node) -> list[tuple[str, str, int, str]]:
    """(kind, axis, bytes, phase) of the vocab-parallel loss: its rows' max and sum of exp
    all_reduced on its axis (`sharding.split_class_collectives`)."""
    rows = node.inputs[1].shape[0]
    return [(c.kind, c.axis, c.bytes, c.phase)
            for c in sharding.split_class_collectives(node.attr["axis"], rows)]


def moe_traffic(node: Node, mesh: dict[str, int], grads: int) -> list[tuple[str, str, int, str]]:
    """(kind, axis, bytes, phase) of an expert-parallel layer: the counts, its rows out and
    back, and `grads` gradients in backward (`sharding.expert_collectives`). The first entry,
    the counts, does not shrink with a microbatch."""
    hidden, index, gate = node.inputs[0], node.inputs[1], node.inputs[3]
    axis = node.attr["axis"]
    rows = index.shape[0] * index.shape[1]
    return [(c.kind, c.axis, c.bytes, c.phase) for c in sharding.expert_collectives(
        axis, gate.shape[0] * mesh[axis], rows, hidden.shape[1] * hidden.itemsize, grads)]


def region_io(graph: Graph, start: int, end: int) -> tuple[list[Value], list[Value]]:
    """Activations a region reads from before it, and values it defines that are used after
    it (or returned). Parameters are not listed: the region reads them from the module."""
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


def format_bytes(b: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            v = b / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{b} B"


def collective_comment(sharded: ShardedGraph, node: Node) -> str:
    parts = []
    for kind, axis, b, phase in sharded.node_traffic(node):
        tag = "fwd" if phase == "forward" else "bwd"
        parts.append(f"{format_bytes(b)} {tag}" if kind == node.op else f"{kind} {format_bytes(b)} {tag}")
    return ", ".join(parts) or "no data moved"


def print_sharded(sharded: ShardedGraph) -> str:
    """The sharded IR: local types, layouts after the type, bytes on collectives.

        %y: f32[8,64] {dp:S(0), tp:P} = linear(%h1, %fc2.weight)            # fc2
        %y_tp: f32[8,64] {dp:S(0), tp:R} = all_reduce(%y, axis=tp)          # 2 KiB fwd
    """
    mesh, lay, plan, g = sharded.mesh, sharded.layouts, sharded.plan, sharded.graph

    def note(v: Value) -> str:
        return " " + sharding.format_layout(mesh, lay[v.name])

    lines = [f"# {n}" for n in g.notes]
    lines.append(f"# mesh {sharding.format_mesh(mesh)}; zero={plan.zero}"
                 + (f"; recompute {', '.join(plan.recompute)}" if plan.recompute else ""))
    ins = ", ".join(f"{v!r}{note(v)}" for v in g.inputs)
    lines.append(f"graph {g.name}({ins}) {{")
    tied: dict[str, list[str]] = {}
    for alias, target in sorted(g.aliases.items()):
        tied.setdefault(target, []).append(alias)
    for p in g.params:
        flag = "" if p.kind == "buffer" else (" trainable" if p.requires_grad else " frozen")
        extra = f"  (tied: {', '.join(tied[p.name])})" if p.name in tied else ""
        lines.append(f"  {p.kind} {p!r}{note(p)}{flag}{extra}")
    regions = {r.start: r.end for r in sharded.regions}
    end = None
    for i, node in enumerate(g.nodes):
        if i in regions:
            end = regions[i]
            lines.append("  recompute {")
        lhs = ", ".join(f"{o!r}{note(o)}" for o in node.outputs)
        args = [f"%{v.name}" for v in node.inputs]
        args += [f"{k}={v}" if k == "axis" else f"{k}={format_attr(v)}" for k, v in node.attrs]
        indent = "    " if end is not None else "  "
        line = f"{indent}{lhs} = {node.op}({', '.join(args)})"
        comment = collective_comment(sharded, node) if is_collective(node) else node.meta.module
        if node.op in (VOCAB_PARALLEL_CE, EXPERT_PARALLEL_MOE):
            comment = f"{node.meta.module}; " * bool(node.meta.module) + collective_comment(sharded, node)
        if comment:
            line = f"{line:<90}  # {comment}"
        lines.append(line)
        if end is not None and i + 1 == end:
            lines.append("  }")
            end = None
    lines.append(f"  return {', '.join('%' + v.name for v in g.outputs)}")
    lines.append("}")
    traffic = sharded.traffic()
    if traffic:
        lines.append("# bytes per step and rank: " + ", ".join(
            f"{k} {format_bytes(b)}" for k, b in traffic.items()))
    return "\n".join(lines) + "\n"


def predict_traffic(sharded: ShardedGraph) -> dict[str, int]:
    return sharded.traffic()


__all__ = ["ShardedGraph", "ZeroParams", "Region", "zero_chunk", "node_traffic", "region_io",
           "print_sharded", "predict_traffic", "format_bytes", "is_collective", "is_inserted_scale",
           "MEAN_SCALE", "BIAS_SHARE", "nbytes", "moves_data", "loss_traffic"]
