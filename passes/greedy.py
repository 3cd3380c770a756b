"""A plan without the solver: a greedy fill, node by node, around layouts a caller forces.

Tests and benchmarks use it to build plans the search would not choose (Megatron tensor
parallelism with sequence splits, ZeRO-3 on a tiny model) and check that they still train
with parity.

    >>> plan = greedy_plan(graph, {"dp": 2}, seeds={"x": ("d0",)})      # doctest: +SKIP
"""
from __future__ import annotations

from math import prod

from autopar.compiler import sharding
from autopar.compiler.gradients import grad_info
from autopar.compiler.ir import Graph
from autopar.compiler.ops import node_anno, node_flops
from autopar.compiler.plan import Plan


def greedy_plan(graph: Graph, mesh: dict[str, int], seeds: dict | None = None,
                flop_weight: float = 0.05, name: str | None = None, outputs: dict | None = None,
                free_params: bool = False) -> Plan:
    """A quick plan without the solver: nodes in order, each picking the strategy with the
    least resharding bytes (+ `flop_weight` bytes per local FLOP); ties go to the strategy
    that splits more. Sources take the layout their first consumer wants unless `seeds`
    fixes them (`seeds` maps producer keys -- node or source names -- to strategies).
    `outputs` maps producer keys to a wanted output layout (None per axis: any);
    `free_params` leaves parameter resharding out of the cost (data parallelism first).

        >>> plan = greedy_plan(g, {"dp": 2}, seeds={"x": ("d0",)})       # doctest: +SKIP
    """
    mesh = dict(mesh)
    seeds = {k: tuple(v) for k, v in (seeds or {}).items()}
    needs = grad_info(graph).needs_grad
    strategies: dict[str, tuple] = {}
    layouts: dict[str, tuple] = {}
    rep = tuple(None for _ in mesh)
    for v in (*graph.inputs, *graph.params):
        if v.name in seeds:
            strategies[v.name] = seeds[v.name]
            layouts[v.name] = sharding.output_layout(sharding.source_annotation(v.shape), seeds[v.name], 0)
    for node in graph.nodes:
        key = sharding.producer_key(node)
        anno = node_anno(node)
        ins = [v.shape for v in node.inputs]
        outs = [v.shape for v in node.outputs]
        cands = [seeds[key]] if key in seeds else sharding.enumerate_strategies(anno, ins, outs, mesh)
        if outputs and key in outputs:
            want = tuple(outputs[key])
            cands = [s for s in cands if all(w is None or w == p for w, p in
                                             zip(want, sharding.output_layout(anno, s, 0)))]
            if not cands:
                raise ValueError(f"no strategy of %{key} ({node.op}, {anno}) gives output layout {want}")
        flops = node_flops(node)
        best, best_cost = None, None
        for s in cands:
            splits = sharding.split_axes(s)
            cost = 0.0
            for i, v in enumerate(node.inputs):
                if v.name not in layouts or (free_params and v.kind == "param"):
                    continue
                dst = sharding.input_layout(anno, s, i)
                try:
                    cols = sharding.reshard(layouts[v.name], dst, v.shape, v.itemsize, mesh, splits,
                                            v.name in needs)
                except ValueError:
                    cost = float("inf")
                    break
                cost += sum(c.bytes for c in cols)
            ways = prod(n for lab, n in zip(s, mesh.values()) if lab is not None)
            cost += flop_weight * flops / ways
            rank = (cost, -ways)
            if best_cost is None or rank < best_cost:
                best, best_cost = s, rank
        strategies[key] = best
        for i, v in enumerate(node.inputs):
            if v.name not in layouts and v.kind in ("input", "param", "buffer"):
                lay = sharding.input_layout(anno, best, i)
                strategies[v.name] = tuple(None if p == "R" else f"d{sharding.shard_dim(p)}" for p in lay)
                layouts[v.name] = lay
        for j, v in enumerate(node.outputs):
            layouts[v.name] = sharding.output_layout(anno, best, j)
    for v in (*graph.inputs, *graph.params):
        strategies.setdefault(v.name, rep)
    full = sharding.derive_layouts(graph, mesh, strategies)
    return Plan(model=name or graph.name, mesh=mesh,
                strategies={k: list(v) for k, v in strategies.items()},
                layouts={k: list(v) for k, v in full.items()},
                dp_axis="dp" if "dp" in mesh else None,
                solver={"method": "greedy"})


__all__ = ["greedy_plan"]
