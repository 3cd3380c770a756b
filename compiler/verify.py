"""The verifier: a graph's invariants as data, run after every pass in tests.

    >>> verify(graph)            # raises VerifyError naming the broken rule and node
"""
from __future__ import annotations

from autopar.compiler.ir import Graph
from autopar.compiler.ops import REGISTRY


class VerifyError(Exception):
    pass


def verify(graph: Graph) -> Graph:
    """Check names unique, every operand defined before use (topological order), ops
    registered, annotations consistent with operand ranks, outputs defined. Returns the
    graph so it can sit in a pass pipeline."""
    defined = set()
    names = set()

    def define(v, where):
        if v.name in names:
            raise VerifyError(f"{where}: value name %{v.name} defined twice")
        names.add(v.name)
        defined.add(v)
    for v in graph.inputs:
        if v.kind != "input":
            raise VerifyError(f"input %{v.name} has kind {v.kind}")
        define(v, "inputs")
    for p in graph.params:
        if p.kind not in ("param", "buffer"):
            raise VerifyError(f"param %{p.name} has kind {p.kind}")
        if p.kind == "buffer" and p.requires_grad:
            raise VerifyError(f"buffer %{p.name} requires grad")
        define(p, "params")
    for i, n in enumerate(graph.nodes):
        where = f"node {i} ({n.op} -> %{n.outputs[0].name if n.outputs else '?'})"
        if n.op not in REGISTRY:
            raise VerifyError(f"{where}: op '{n.op}' is not registered")
        for v in n.inputs:
            if v not in defined:
                raise VerifyError(f"{where}: operand %{v.name} is used before it is defined")
        if not n.outputs:
            raise VerifyError(f"{where}: no outputs")
        anno = REGISTRY[n.op].annotate([v.shape for v in n.inputs], [v.shape for v in n.outputs], n.attrs)
        if len(anno.inputs) != len(n.inputs) or len(anno.outputs) != len(n.outputs):
            raise VerifyError(f"{where}: annotation {anno} does not match "
                              f"{len(n.inputs)} inputs / {len(n.outputs)} outputs")
        for labs, v in zip((*anno.inputs, *anno.outputs), (*n.inputs, *n.outputs)):
            if len(labs) != len(v.shape):
                raise VerifyError(f"{where}: annotation {anno} has rank {len(labs)} for "
                                  f"%{v.name} of rank {len(v.shape)}")
        for v in n.outputs:
            define(v, where)
    for v in graph.outputs:
        if v not in defined:
            raise VerifyError(f"output %{v.name} is not defined")
    for alias, target in graph.aliases.items():
        if target not in {p.name for p in graph.params}:
            raise VerifyError(f"alias {alias} -> {target}: no such parameter")
    return graph
