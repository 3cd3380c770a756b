"""The passes between tracing and the search, in order. Every entry point (CLI, compile(),
plan files) prepares a traced graph with `prepare`, so all of them plan the same IR.

    >>> graph = prepare(trace(model, example_inputs))     # doctest: +SKIP
"""
from __future__ import annotations

from autopar.compiler.ir import Graph
from autopar.passes.manager import run_passes
from autopar.passes.prune import prune
from autopar.passes.unfuse import split_fused_projections

PREPARE = [
    prune,                      # no-ops, CSE, dead code; notes the frozen-parameter analysis
    split_fused_projections,    # fused q/k/v projections become pieces that shard on their own
]


def prepare(graph: Graph) -> Graph:
    return run_passes(graph, PREPARE)
