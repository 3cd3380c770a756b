"""A plan file to a solved `Plan`: load, check against the graph, search with its pins.

    >>> plan = compile_plan("examples/plans/megatron_gpt.plan", graph)    # doctest: +SKIP

`autopar.pipeline.make_plan` calls `search_with` for a plan file, so `compile(...,
plan="x.plan")` and `autopar plan/emit/run --plan x.plan` take plan files.
"""
from __future__ import annotations

from autopar.compiler.errors import InputError

from autopar.compiler.cluster import DeviceProfile
from autopar.compiler.ir import Graph
from autopar.compiler.plan import Plan
from autopar.dsl.check import PlanSpec, resolve
from autopar.dsl.parser import load_plan


def compile_plan(path: str, graph: Graph, mesh: dict[str, int] | None = None,
                 device: str | DeviceProfile | None = None, memory: float | None = None,
                 **search_kw) -> Plan:
    """Search the best plan the file allows. The file's mesh / device / memory win over the
    arguments, which fill in what the file leaves out (`mesh` must agree with the file's:
    `MeshMismatch` otherwise). `search_kw` go to `search_with`."""
    from autopar.compiler.cluster import builtin_profiles
    spec = resolve(load_plan(path), graph, mesh=mesh, devices=builtin_profiles())
    return search_with(spec, graph, device=device, memory=memory, **search_kw)


def search_with(spec: PlanSpec, graph: Graph, device: str | DeviceProfile | None = None,
                memory: float | None = None, **search_kw) -> Plan:
    """`passes.shard.search` under the spec's mesh, limits, objective, pins and recompute
    regions. A file with `recompute` lines gets exactly those regions (the search adds and
    removes none); a file without lets the search choose recompute as it does with no file. `search_kw` go to the search (time_limit, deterministic, ...); a zero stage,
    dp axis or memory limit there only fills in what the file leaves out, pins and
    recompute regions there are added to the file's.

        >>> plan = search_with(spec, graph, zero=1, deterministic=True)   # doctest: +SKIP
    """
    from autopar.compiler.cost import overlap_settings
    from autopar.passes.shard import search
    kw = dict(memory_limit=spec.memory_limit if spec.memory_limit is not None else memory,
              zero=spec.zero, pins=list(spec.pins), recompute=list(spec.recompute_modules),
              dp_axis=spec.dp_axis, objective=spec.objective,
              # the schedule the file sets is the one the cost model ranks plans by (what it
              # leaves out -- the bucket size, async TP -- the search may choose)
              overlap=dict(spec.overlap))
    for key, value in search_kw.items():
        if key in ("pins", "recompute"):
            kw[key] += list(value)
        elif key == "overlap":
            # the file's settings win; False (the additive model) keeps them off
            kw[key] = {**overlap_settings(value), **spec.overlap}
        elif key not in ("zero", "dp_axis", "memory_limit") or kw[key] is None:
            kw[key] = value
    if "pp" in spec.mesh:        # a pipeline: the search over the other axes, stages cut after
        # (at the file's stage pins, the other stages balanced around them)
        from autopar.compiler.stages import pipeline_plan
        from autopar.compiler.cluster import DeviceProfile, load_profile
        profile = spec.device or device or "cpu"
        profile = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
        pos = list(spec.mesh).index("pp")
        for p in kw["pins"]:
            if p.layout[pos] not in (None, "R"):
                raise InputError(f"{p.origin or p.value}: a layout over pp ({p.layout[pos]}) -- every "
                                 "value is whole on each pipeline stage; leave pp out of the layout")
        kw["pins"] = [type(p)(p.value, tuple(p.layout[:pos]) + tuple(p.layout[pos + 1:]), p.origin)
                      for p in kw["pins"]]
        plan = pipeline_plan(graph, spec.mesh, lambda g, m, **more: search(g, m, profile, **{
            **kw, **more, "pins": kw["pins"] + list(more.get("pins", []))}),
                             profile, schedule=spec.schedule, ranges=spec.stage_ranges(),
                             memory_limit=kw["memory_limit"], microbatches=spec.microbatches)
    else:
        plan = search(graph, spec.mesh, spec.device or device or "cpu", **kw)
    plan.constraints = list(spec.constraints)
    # settings the search does not read: the program's checkpoints; the schedule it priced
    plan.checkpoint = dict(spec.checkpoint)
    # the search's plan holds the schedule it priced, with what it chose (bucket size, async TP)
    plan.overlap = {**overlap_settings(kw["overlap"]), **(plan.overlap or {}), **spec.overlap}
    if spec.microbatches is not None:
        plan.microbatches = spec.microbatches
    return plan
