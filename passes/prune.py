"""Pruning: no-op removal, common-subexpression elimination and dead-code elimination; the
frozen-parameter analysis they report lives in `compiler/gradients.py`.

Each pass is a plain function `Graph -> Graph` that records how many nodes it removed in
`graph.notes`, so the printed IR says what pruning did:

    >>> g = prune(graph); print(g.notes[-1])                      # doctest: +SKIP
    prune: remove_noops -6, eliminate_common_subexpressions -1, eliminate_dead_code -2
"""
from __future__ import annotations

from autopar.compiler.gradients import grad_info
from autopar.compiler.ir import Graph, Node, Value, format_attr
from autopar.compiler.ops import NOOPS


def _substitute(graph: Graph, nodes: list[Node], subst: dict[Value, Value]) -> Graph:
    def s(v):
        while v in subst:
            v = subst[v]
        return v
    new_nodes = [n.replace(inputs=tuple(s(v) for v in n.inputs))
                 if any(v in subst for v in n.inputs) else n for n in nodes]
    return graph.copy(nodes=new_nodes, outputs=[s(v) for v in graph.outputs])


def is_noop(node: Node) -> bool:
    """Nodes whose single output equals their first input (same shape, dtype, values)."""
    if len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    x, y = node.inputs[0], node.outputs[0]
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    a = node.attr
    if node.op == "detach":
        return False                    # same values, but it stops the gradient (x + (f(x) - x).detach())
    if node.op in NOOPS:
        return True
    if node.op in ("dropout", "native_dropout"):
        return a.get("p", 0.5) == 0.0 or a.get("train") is False
    if node.op in ("to.dtype", "_to_copy", "type_as"):
        return True                     # same dtype checked above
    if node.op in ("view", "reshape", "_unsafe_view", "expand", "flatten.using_ints", "slice"):
        return True                     # same shape checked above
    return False


def remove_noops(graph: Graph) -> Graph:
    """Drop alias/clone/contiguous, same-dtype casts, same-shape views and
    dropout with p=0 or in eval mode; their users read the input instead."""
    subst, kept = {}, []
    for n in graph.nodes:
        if n.op == "broadcast_tensors" and all(
                a.shape == b.shape for a, b in zip(n.inputs, n.outputs)):
            subst.update(zip(n.outputs, n.inputs))      # nothing to broadcast
        elif is_noop(n):
            subst[n.outputs[0]] = n.inputs[0]
        else:
            kept.append(n)
    return _note(graph, _substitute(graph, kept, subst), "remove_noops")


RANDOM_OPS = {"dropout", "native_dropout", "rand", "randn", "randint", "bernoulli", "rand_like",
              "randn_like", "multinomial", "normal"}


def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Merge nodes with the same op, operands and attributes (random ops excepted)."""
    seen: dict[tuple, Node] = {}
    subst, kept = {}, []
    for n in graph.nodes:
        n2 = n.replace(inputs=tuple(subst.get(v, v) for v in n.inputs))
        if n2.op in RANDOM_OPS:
            kept.append(n2)
            continue
        key = (n2.op, tuple(id(v) for v in n2.inputs), format_attr(list(n2.attrs)),
               tuple((v.shape, v.dtype) for v in n2.outputs))
        if key in seen:
            for a, b in zip(n2.outputs, seen[key].outputs):
                subst[a] = b
        else:
            seen[key] = n2
            kept.append(n2)
    return _note(graph, _substitute(graph, kept, subst), "eliminate_common_subexpressions")


def eliminate_dead_code(graph: Graph) -> Graph:
    """Remove nodes none of whose outputs reach a graph output, and parameters/buffers
    no node reads (named in a note so nothing disappears silently)."""
    live = set(graph.outputs)
    kept = []
    for n in reversed(graph.nodes):
        if any(v in live for v in n.outputs):
            kept.append(n)
            live.update(n.inputs)
    kept.reverse()
    unused = [p for p in graph.params if p not in live]
    g = _note(graph, graph.copy(nodes=kept, params=[p for p in graph.params if p in live]),
              "eliminate_dead_code")
    if unused:
        g.notes.append("unused, left out of the plan: " + ", ".join(p.name for p in unused))
        g.aliases = {a: t for a, t in g.aliases.items() if t not in {p.name for p in unused}}
    return g


def _note(before: Graph, after: Graph, name: str) -> Graph:
    after.pass_counts = dict(getattr(before, "pass_counts", {}))   # type: ignore[attr-defined]
    after.pass_counts[name] = len(before.nodes) - len(after.nodes)
    return after


PRUNE_PASSES = [
    remove_noops,                       # first: exposes duplicates hidden behind aliases
    eliminate_common_subexpressions,    # merges identical reads (e.g. repeated views)
    eliminate_dead_code,                # last: drops what the others left unused
]


def prune(graph: Graph) -> Graph:
    """Run the pruning passes in order and note what each removed."""
    g = graph
    for p in PRUNE_PASSES:
        g = p(g)
    counts = getattr(g, "pass_counts", {})
    g.notes.append("prune: " + ", ".join(f"{k} -{v}" for k, v in counts.items())
                   + f" ({len(graph.nodes)} -> {len(g.nodes)} nodes)")
    info = grad_info(g)
    g.notes.append(info.summary())
    return g
