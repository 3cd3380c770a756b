"""`autopar plan`: search a model's plan and explain it -- solver statistics, a table per
module (parameter layouts, collectives with bytes and time), totals (compute,
communication per axis, memory per device) and, for `--devices N`, the mesh shapes side by
side.

    $ autopar plan examples/gpt.py:build --mesh dp=2,tp=2 --device h100
    $ autopar plan examples/gpt.py:build --devices 8 --json
    $ autopar plan examples/gpt.py:build --plan examples/plans/megatron_gpt.plan
    $ autopar plan examples/gpt.py:build --mesh dp=2,tp=2 --emit-plan gpt.plan

`--plan FILE` searches under a plan file's constraints (autopar.dsl); what the file says
wins over the flags, which fill in what it leaves out, and the explanation lists the
file's statements and marks the parameters they pin. `--emit-plan` writes the plan found
as a plan file that reproduces it when given back to `--plan`.

`explain(plan, graph)` renders the same text for a plan made elsewhere (compile()).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

from autopar.compiler import sharding
from autopar.compiler.cluster import (Cluster, DeviceProfile, format_bytes, format_time, load_profile,
                                      parse_bytes)
from autopar.compiler.cost import CostModel, CostReport
from autopar.compiler.errors import InputError
from autopar.compiler.plan import Plan



def format_rate(tflops: float) -> str:
    """Achieved FLOP/s per device in a unit that shows digits (a CPU runs at GFLOP/s)."""
    for unit, scale in (("TFLOP/s", 1.0), ("GFLOP/s", 1e-3), ("MFLOP/s", 1e-6)):
        if tflops >= scale:
            return f"{tflops / scale:.1f} {unit}"
    return f"{tflops * 1e12:.0f} FLOP/s"

def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="path/to/file.py:function returning (model, example_inputs), or an .onnx file")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="example inputs of an .onnx SPEC, by graph input name (default: made from the input types)")
    where = p.add_mutually_exclusive_group()       # one of them, or --plan naming a mesh
    where.add_argument("--mesh", help="mesh axes and sizes, e.g. dp=2,tp=4 (with --plan: must "
                                      "agree with the file's mesh, or name one the file leaves out)")
    where.add_argument("--devices", type=int, metavar="N",
                       help="device count: every dp x tp shape (tp within a node), dp x ep where the model "
                            "has experts, and pp x dp x tp where it has repeated blocks, is searched and compared")
    p.add_argument("--plan", metavar="FILE.plan",
                   help="search under this plan file's constraints (its mesh, device, memory, "
                        "ZeRO stage, layouts, recompute win over the flags)")
    p.add_argument("--device", default="cpu",
                   help="device profile: a100-80g, h100, h200, mi250x, cpu (measured here, cached) "
                        "or a .json/.toml profile file (default: cpu)")
    p.add_argument("--memory", help="memory limit per device, e.g. 80GB or 24GiB (default: the device's)")
    p.add_argument("--batch", type=int,
                   help="batch size: passed as batch=N to the SPEC function (it must take a batch argument)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="fix the ZeRO stage (default: searched)")
    from autopar.compiler.stages import schedule_arg
    p.add_argument("--schedule", type=schedule_arg, default=None, metavar="{gpipe,1f1b,interleaved[:V]}",
                   help="pipeline schedule the plan is priced and cut for, with a pp axis or --devices (default 1f1b)")
    p.add_argument("--time-limit", type=float, default=10.0, help="solver time limit in seconds per mesh (default 10)")
    p.add_argument("--deterministic", action="store_true", help="one solver worker, fixed seed: same plan every run")
    p.add_argument("--trace", choices=["export", "fx"], default="export", help="front end (default export)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    p.add_argument("-o", "--output", metavar="PLAN.json", help="save the plan as JSON")
    p.add_argument("--timeline", metavar="FILE.json",
                   help="write the predicted step as a Chrome/Perfetto trace (one track per stream)")
    p.add_argument("--emit-plan", metavar="OUT.plan",
                   help="write the plan as a plan file (read back with --plan, it gives the same plan)")


# ---- the explanation -------------------------------------------------------------------------

def module_rows(graph, plan: Plan, report: CostReport, model: CostModel,
                pinned: Iterable[str] = ()) -> list[dict]:
    """One row per module: its parameters' layouts and the collectives of its nodes.
    Instances of a repeated block with identical rows collapse into one (`h.*`, count).
    Parameters in `pinned` (values a plan file constrains) are marked with a `*`."""
    from autopar.compiler.patterns import block_of
    pinned = set(pinned)
    mesh = dict(plan.mesh)
    rows: dict[str, dict] = {}
    for m in model.members:
        if m.kind == "input":
            continue
        mod = m.module or "(root)"
        row = rows.setdefault(mod, {"module": mod, "params": {}, "collectives": {}})
        if m.kind in ("param", "buffer"):
            short = m.key[len(m.module) + 1:] if m.module else m.key
            row["params"][short] = (sharding.format_layout(mesh, tuple(plan.layouts[m.key]))
                                    + ("*" if m.key in pinned else ""))
        for col, t in report.nodes[m.key].collectives:
            k = f"{col.kind}({col.axis}) {col.phase}"
            agg = row["collectives"].setdefault(k, {"bytes": 0, "time": 0.0, "count": 0})
            agg["bytes"] += int(col.bytes)
            agg["time"] += t
            agg["count"] += 1
    out: dict[tuple, dict] = {}
    for mod, row in rows.items():
        b = block_of(mod)
        if b is not None:
            pattern = b[0] + ".*" + mod[len(b[1]):]
            content = json.dumps([row["params"], row["collectives"]], sort_keys=True)
            key = (pattern, content)
        else:
            pattern, key = mod, (mod, "")
        if key in out:
            out[key]["count"] += 1
            out[key]["module"] = pattern
        else:
            out[key] = dict(row, count=1)
    return list(out.values())


def plan_summary(graph, plan: Plan, profile: DeviceProfile | None = None,
                 pinned: Iterable[str] = ()) -> dict:
    """The numbers `autopar plan` prints, as one JSON-able dict. `pinned`: the values a
    plan file constrains (their parameters are marked in the module table)."""
    profile = profile or load_profile(plan.device)
    model = CostModel(graph, Cluster(dict(plan.mesh), profile), precision=plan.cost.get("precision"),
                      recompute=plan.recompute, dp_axis=plan.dp_axis, overlap=plan.overlap)
    report = model.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)
    out = {
        "model": plan.model, "mesh": sharding.format_mesh(plan.mesh), "device": plan.device,
        "devices": Cluster(dict(plan.mesh), profile).devices, "zero": plan.zero,
        "dp_axis": plan.dp_axis,
        "solver": {k: v for k, v in plan.solver.items() if k != "mesh_candidates"},
        "cost": plan.cost,
        "constraints": list(plan.constraints),
        "modules": module_rows(graph, plan, report, model, pinned),
        "mesh_candidates": plan.solver.get("mesh_candidates"),
        "schedule": schedule_summary(report.schedule),
        "experts": expert_rows(graph, plan),
    }
    return out


# what a split of a moe_experts op means, by the label its strategy splits on an axis
EXPERT_SPLITS = {"t": "by tokens (every expert on each rank)",
                 "i": "tensor-parallel experts (each expert's intermediate split, partial sums)",
                 "x": "expert-parallel ({per} of {E} experts per rank, rows sent with all_to_all)"}


def expert_rows(graph, plan: Plan) -> list[dict]:
    """Each mixture-of-experts layer and how each mesh axis splits it (repeated blocks
    folded like the module table): what `plan` prints under "experts"."""
    from autopar.compiler.patterns import fold_modules
    axes = list(plan.mesh)
    by_split: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.op != "moe_experts":
            continue
        E = n.inputs[3].shape[0]
        labels = plan.strategies.get(n.outputs[0].name) or (None,) * len(axes)
        how = []
        for a, lab in zip(axes, labels):
            if lab in EXPERT_SPLITS and plan.mesh[a] > 1:
                how.append(f"{a}: " + EXPERT_SPLITS[lab].format(per=E // plan.mesh[a], E=E))
        key = "; ".join(how) or "whole on every rank"
        by_split.setdefault(key, []).append(n.meta.module or "(root)")
    return [{"modules": fold_modules(mods, graph), "layers": len(mods), "split": split}
            for split, mods in by_split.items()]


def plan_report(graph, plan: Plan, profile: DeviceProfile | None = None) -> CostReport:
    """The cost model's breakdown of `plan`, with its schedule (`report.schedule`)."""
    profile = profile or load_profile(plan.device)
    model = CostModel(graph, Cluster(dict(plan.mesh), profile), precision=plan.cost.get("precision"),
                      recompute=plan.recompute, dp_axis=plan.dp_axis, overlap=plan.overlap)
    return model.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero)


def schedule_summary(sched) -> dict:
    """The predicted schedule in numbers: step time, exposed and hidden communication per
    axis, each gradient bucket (parameters, bytes, launch point, what it hides behind) and
    the collectives that hide behind compute."""
    def behind(e):
        return list(e.behind) if e.behind else None
    comm = [e for e in sched.events if e.stream != "compute"]
    hiding = {}
    for e in comm:
        if e.hidden > 0 and not e.name.startswith("bucket "):
            k = e.name.split(" ", 1)[0] + f" {e.phase}"
            agg = hiding.setdefault(k, {"count": 0, "time": 0.0, "hidden": 0.0, "behind": behind(e)})
            agg["count"] += 1
            agg["time"] += e.dur
            agg["hidden"] += e.hidden
    return {
        "overlap": sched.overlap, "makespan": sched.makespan, "compute": sched.compute,
        "exposed": dict(sched.exposed), "hidden": dict(sched.hidden), "prefetch": sched.prefetch,
        "gathered_blocks": sched.gathered_blocks, "collective_matmuls": sched.collective_matmuls,
        "buckets": [{"index": b.index, "kind": b.kind, "axes": list(b.axes), "params": len(b.params),
                     "first": b.params[0], "last": b.params[-1], "bytes": b.nbytes,
                     "ready_after": b.ready, "launch": b.launch,
                     "time": sum(e.dur for e in b.events), "hidden": sum(e.hidden for e in b.events),
                     "behind": behind(b.events[0]) if b.events else None} for b in sched.buckets],
        "hiding": hiding,
    }


def explain(plan: Plan, graph, profile: DeviceProfile | None = None, pinned: Iterable[str] = ()) -> str:
    """A plan in words: the plan file's constraints, solver statistics, per-module table,
    totals, mesh candidates.

        >>> print(explain(plan, graph))                      # doctest: +SKIP
    """
    return render(plan_summary(graph, plan, profile, pinned))


def render(s: dict) -> str:
    out = []
    sv, c = s["solver"], s["cost"]
    out.append(f"plan for {s['model']} on {s['mesh']} ({s['devices']} x {s['device']}), "
               f"ZeRO-{s['zero']}" + (f" over {s['dp_axis']}" if s["dp_axis"] else "")
               + f", {c.get('precision', '')} precision")
    if s.get("constraints"):
        out.append("")
        marked = any(p.endswith("*") for r in s["modules"] for p in r["params"].values())
        out.append("constraints from the plan file (the search chose everything else"
                   + ("; * marks pinned parameters below" if marked else "") + "):")
        out.extend(f"  {line}" for line in s["constraints"])
    if sv:
        out.append("")
        out.append("solver:")
        out.append(f"  strategy variables: {sv.get('variables_before')} for {sv.get('members')} sources and nodes"
                   f" -> {sv.get('variables_after_merging')} after follow-merging ({sv.get('groups_after_merging')} groups)"
                   f" -> {sv.get('variables_after_linking')} after block linking ({sv.get('classes_after_linking')} classes)"
                   f" -> {sv.get('variables_after_dominance')} after dominance")
        out.append(f"  model: {sv.get('bools')} choice booleans, {sv.get('pair_bools')} pair booleans, "
                   f"{sv.get('tables')} table constraints, {sv.get('constraints')} constraints")
        levels = ", ".join(f"ZeRO-{z}: {v['status']}" + (f" {format_time(v['step_time'])}" if v.get("step_time") else "")
                           for z, v in (sv.get("zero_levels") or {}).items())
        out.append(f"  status {sv.get('status')}, solve {sv.get('solve_time', 0):.2f} s, "
                   f"wall {sv.get('wall_time', 0):.2f} s ({levels})")
    rc_lines = render_recompute(sv.get("recompute_search"), c)
    if rc_lines:
        out.append("")
        out.extend(rc_lines)
    out.append("")
    out.append("per module (identical repeated blocks shown once):")
    width = max([len(r["module"]) + 6 for r in s["modules"]] + [20])
    for r in s["modules"]:
        name = r["module"] + (f" (x{r['count']})" if r["count"] > 1 else "")
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items()) or "-"
        out.append(f"  {name:<{width}} {params}")
        for k, agg in r["collectives"].items():
            out.append(f"  {'':<{width}}   {k}: {format_bytes(agg['bytes'])} {format_time(agg['time'])}"
                       + (f" (x{r['count']} blocks)" if r["count"] > 1 else ""))
    for r in s.get("experts") or ():
        out.append("")
        out.append(f"experts ({r['layers']} layer{'s' * (r['layers'] > 1)}: {', '.join(r['modules'])}):")
        out.extend(f"  {part}" for part in r["split"].split("; "))
    out.append("")
    comp = c["compute"]
    out.append("totals per training step:")
    out.append(f"  step time      {format_time(c['step_time'])}  ({format_rate(c['tflops_per_device'])} per device)")
    out.append(f"  compute        {format_time(c['compute_time'])}  (forward {format_time(comp['forward'])}, "
               f"backward {format_time(comp['backward'])}, recompute {format_time(comp['recompute'])}, "
               f"optimizer step {format_time(comp.get('optimizer', 0.0))})")
    per_axis = ", ".join(f"{a} {format_time(t)} ({c['links'][a]['kind']})" for a, t in c["communication"].items())
    out.append(f"  communication  {format_time(c['comm_time'])}  ({per_axis})")
    m = c["memory"]
    lim = c.get("memory_limit")
    out.append(f"  memory/device  {format_bytes(m['total'])}" + (f" of {format_bytes(lim)}" if lim else "")
               + f"  (params {format_bytes(m['params'])}, grads {format_bytes(m['grads'])}, "
               f"optimizer {format_bytes(m['optimizer'])}, activations {format_bytes(m['activations'])})")
    if c["bytes"]:
        out.append("  bytes per rank " + ", ".join(f"{k} {format_bytes(v)}" for k, v in c["bytes"].items()))
    if c.get("pipeline"):
        from autopar.compiler.stages import pipeline_lines
        out.extend(pipeline_lines(c["pipeline"]))
    if s.get("schedule"):
        out.extend(render_schedule(s["schedule"]))
    cands = s.get("mesh_candidates")
    if cands:
        out.append("")
        out.append(f"mesh shapes of {s['devices']} devices:")
        w = max(14, *(len(r["mesh"]) for r in cands))
        out.append(f"  {'mesh':<{w}} {'status':<11} {'step time':>11} {'compute':>11} {'comm':>11} "
                   f"{'memory':>11} {'zero':>4} {'FLOP/s':>14}")
        for r in cands:
            if r["status"] in ("infeasible", "skipped"):
                least = f"needs {format_bytes(r['least_memory'])}" if r.get("least_memory") else r.get("reason", "")[:90]
                if r.get("least_memory_recompute"):
                    least += f" with recompute of {', '.join(r['least_memory_recompute'])}"
                out.append(f"  {r['mesh']:<{w}} {r['status']:<11} {least}")
                continue
            out.append(f"  {r['mesh']:<{w}} {r['status']:<11} {format_time(r['step_time']):>11} "
                       f"{format_time(r['compute']):>11} {format_time(r['communication']):>11} "
                       f"{format_bytes(r['memory']):>11} {r['zero']:>4} {format_rate(r['tflops_per_device']):>14}"
                       + ("  <- winner" if r.get("winner") else "")
                       + (f"  {r['schedule']} x{r['microbatches']} microbatches, bubble {r['bubble']:.0%}"
                          if r.get("schedule") else "")
                       + (f"  recompute {', '.join(r['recompute'])}" if r.get("recompute") else ""))
        if any(r["status"] == "screened" for r in cands):
            out.append("  (screened: priced with the strategies of a searched shape of the same tp size, "
                       "not searched itself; pipelines: compute and comm of the slowest stage, before the bubble)")
    return "\n".join(out) + "\n"


def render_recompute(rs: dict | None, cost: dict) -> list[str]:
    """Why the plan recomputes what it does (Plan.solver["recompute_search"]): the user's
    regions, or what the search tried, why, and the memory and step time with and without."""
    if not rs:
        return []
    chosen = rs.get("chosen") or []
    if rs.get("mode") == "given":
        return [f"recompute (from the plan): {', '.join(chosen)} -- kept as written, not searched"]
    if rs.get("mode") != "searched":
        return []
    tried = rs.get("tried") or []
    base = tried[0] if tried else {}
    if len(tried) <= 1:
        return [f"recompute: none; not tried ({rs.get('tried_because', '')})"]

    def outcome(t: dict) -> str:
        if t["status"] == "fits":
            return f"{format_bytes(t['memory'])}, step {format_time(t['step_time'])}"
        if t.get("least_memory"):
            return f"no plan fits (the least any plan needs: {format_bytes(t['least_memory'])})"
        if t["status"] == "skipped":
            return f"not searched: {t.get('reason', '')}"
        return t["status"]
    lim = rs.get("limit")
    out = [f"recompute (searched, because {rs.get('tried_because', '')}; limit {format_bytes(lim)}):"
           if lim else "recompute (searched):"]
    out.append(f"  without recompute: {outcome(base)}")
    for t in tried[1:]:
        mark = "  <- chosen" if t["recompute"] == chosen else ""
        est = f"; saves ~{format_bytes(t['saves_estimate'])} unsplit" if t.get("saves_estimate") else ""
        out.append(f"  recompute {', '.join(t['recompute'])} ({t['modules']} modules{est}): {outcome(t)}{mark}")
    if chosen:
        with_rc = next((t for t in tried[1:] if t["recompute"] == chosen), None)
        why = ("it is the only choice that fits" if base.get("status") != "fits"
               else "it lets a faster plan fit than any without it")
        line = f"  chosen: recompute {', '.join(chosen)}, because {why}"
        rt = (cost.get("compute") or {}).get("recompute")
        if rt:
            line += f"; the forward run again in backward costs {format_time(rt)} per step"
        if with_rc and base.get("status") == "fits":
            line += (f"; memory {format_bytes(base['memory'])} -> {format_bytes(with_rc['memory'])}, "
                     f"step {format_time(base['step_time'])} -> {format_time(with_rc['step_time'])}")
        out.append(line)
    else:
        out.append("  chosen: no recompute (the plans with recompute are slower)")
    return out


def render_schedule(sc: dict) -> list[str]:
    out = ["", "schedule (overlap " + ("on" if sc["overlap"] else "off: every collective synchronous") + "):"]
    out.append(f"  predicted step {format_time(sc['makespan'])}, compute stream busy {format_time(sc['compute'])}")
    for a in sc["exposed"]:
        e, h = sc["exposed"][a], sc["hidden"][a]
        if e or h:
            frac = h / (e + h) if e + h else 0.0
            out.append(f"  {a}: exposed {format_time(e)}, hidden {format_time(h)} ({frac:.0%} hidden)")
    if sc.get("gathered_blocks"):
        out.append(f"  ZeRO-3: weights gathered {sc['prefetch']} block(s) ahead, "
                   f"{sc['gathered_blocks']} block(s) gathered at once, gathered again in backward")
    if sc.get("collective_matmuls"):
        out.append(f"  async TP: {sc['collective_matmuls']} sequence-parallel gathers / reduce_scatters run as "
                   "collective matmuls (ring steps beside the linears)")
    for b in sc["buckets"]:
        what = f"{b['params']} gradients ({b['first']} ... {b['last']})" if b["params"] > 2 else \
            (f"{b['first']}, {b['last']}" if b["params"] == 2 else b["first"])
        hid = b["hidden"] / b["time"] if b["time"] else 0.0
        line = (f"  bucket {b['index']}: {b['kind']} over {', '.join(b['axes'])}, {format_bytes(b['bytes'])}, {what}; "
                f"launched at {format_time(b['launch'])} after the backward of %{b['ready_after']}, "
                f"{format_time(b['time'])}, {hid:.0%} hidden")
        if b["behind"]:
            line += f" behind {b['behind'][0]}" + (f" .. {b['behind'][1]}" if b["behind"][1] != b["behind"][0] else "")
        out.append(line)
    for k, agg in sc.get("hiding", {}).items():
        out.append(f"  {k} (x{agg['count']}): {format_time(agg['hidden'])} of {format_time(agg['time'])} hidden"
                   + (f", e.g. behind {agg['behind'][0]}" if agg.get("behind") else ""))
    return out


def plan_main(args) -> int:
    from autopar.compiler.cluster import builtin_profiles
    from autopar.pipeline import load_model, make_plan, prepared_graph
    from autopar.run import check_flags

    check_flags(args, "plan")
    if not (args.mesh or args.devices or args.plan):
        raise InputError("give the mesh (--mesh dp=2,tp=4), a device count (--devices 8) or a "
                         "plan file that names a mesh (--plan FILE.plan)")
    if args.plan and not args.plan.endswith(".json"):
        from autopar.dsl import load_plan
        load_plan(args.plan)                        # syntax errors before the slow trace
    profile = load_profile(args.device)
    limit = parse_bytes(args.memory) if args.memory else None
    model, inputs, name = load_model(args.spec, args.batch, inputs=args.inputs)
    graph = prepared_graph(model, inputs, name, mode=args.trace)
    plan, pinned = make_plan(graph, args.mesh, args.devices, args.plan, profile, limit, zero=args.zero,
                             time_limit=args.time_limit, deterministic=args.deterministic,
                             schedule=args.schedule)
    if plan.device != profile.name and plan.device in builtin_profiles():   # the file named the device
        profile = load_profile(plan.device)
    summary = plan_summary(graph, plan, profile, pinned)
    if getattr(args, "timeline", None):
        from autopar.compiler.schedule import trace
        report = plan_report(graph, plan, profile)
        with open(args.timeline, "w") as f:
            json.dump(trace(report.schedule, f"{plan.model} on {summary['mesh']} (predicted)"), f)
    if args.json:
        print(json.dumps(summary, indent=2, default=_json_default))
    else:
        sys.stdout.write(render(summary))
        from autopar.pipeline import idle_axis_lines
        for line in idle_axis_lines(plan):
            print(line)
    if args.output:
        plan.save(args.output)
        if not args.json:
            print(f"plan saved to {args.output}")
    if getattr(args, "timeline", None) and not args.json:
        print(f"predicted timeline written to {args.timeline} (open in ui.perfetto.dev or chrome://tracing)")
    if args.emit_plan:
        write_plan_file(args.emit_plan, plan, graph)
        if not args.json:
            print(f"plan file written to {args.emit_plan} "
                  f"(autopar plan {args.spec} --plan {args.emit_plan} reproduces it)")
    return 0


def write_plan_file(path: str, plan: Plan, graph) -> None:
    """`--emit-plan`: the plan as a plan file that `--plan` turns back into this plan. An
    optimal plan is pinned at module boundaries (the search finds the rest again); one the
    search stopped short of proving optimal is pinned everywhere, or the search, given a
    second chance, would find a different (better) plan."""
    from autopar.dsl import write_plan
    status = plan.solver.get("status")
    text = write_plan(plan, graph, activations="modules" if status == "OPTIMAL" else "all")
    if status != "OPTIMAL":
        title, rest = text.split("\n", 1)
        text = (f"{title}\n# the search stopped at its time limit (status {status}), so every value is "
                "pinned, not only module outputs\n# (a longer --time-limit may give a shorter file)\n" + rest)
    with open(path, "w") as f:
        f.write(text)


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


__all__ = ["add_plan_args", "plan_main", "explain", "plan_summary", "render", "module_rows",
           "schedule_summary", "render_schedule", "plan_report", "render_recompute"]
