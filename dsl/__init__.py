"""The plan DSL: constraints for the sharding search, written like a whiteboard plan.

    mesh dp=2, tp=4
    memory 80GB
    zero 1 over dp
    layout "transformer.h.*.attn.c_attn.weight" { tp: S(0), dp: R }
    layout output of "transformer.h.*.mlp.c_fc" { tp: S(2) }
    recompute "transformer.h.*"

Public API:

    >>> planfile = load_plan("examples/plans/megatron_gpt.plan")     # doctest: +SKIP
    >>> spec = resolve(planfile, graph)                                # PlanSpec
    >>> plan = search(graph, spec.mesh, profile, memory_limit=spec.memory_limit,
    ...               zero=spec.zero, pins=spec.pins)                    # doctest: +SKIP
    >>> text = write_plan(plan, graph)              # a plan file reproducing `plan`
    >>> plan = compile_plan("x.plan", graph)        # load + resolve + search, in one call

`grammar` lives in `plan.lark`; `ast` the syntax tree; `check` the semantic checks;
`errors` the error classes (all `PlanFileError`) and the catalogue of bad examples.
"""
from __future__ import annotations

from autopar.dsl.ast import PlanFile
from autopar.dsl.check import PlanSpec, resolve
from autopar.dsl.emit import write_plan
from autopar.dsl.errors import PlanFileError
from autopar.dsl.parser import load_plan, parse_plan
from autopar.dsl.solve import compile_plan, search_with

__all__ = ["PlanFile", "PlanSpec", "PlanFileError", "load_plan", "parse_plan", "resolve", "write_plan",
           "compile_plan", "search_with"]
