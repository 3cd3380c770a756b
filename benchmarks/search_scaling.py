"""How the sharding search scales with depth: GPT-shaped models (hidden 4096, 32 heads,
seq 2048, vocab 51200) of 2..96 layers, traced on the meta device, planned on A100 meshes
of 8 and 64 devices. Tracing is timed apart; "plan" is everything after it (cost tables,
merging, linking, CP-SAT, the cost report).

    python benchmarks/search_scaling.py [--layers 2 12 96] [--quick]

Targets (2-core machine): 96 layers on 64 devices plans in under 10 s after tracing; the
search for 96 layers takes at most 2x the time for 12.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

from autopar.compiler.cluster import load_profile
from autopar.compiler.trace import trace
from autopar.passes.prune import prune
from autopar.passes.shard import PlanInfeasible, search, search_devices

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def load_gpt():
    spec = importlib.util.spec_from_file_location("autopar_bench_gpt", ROOT / "examples" / "gpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24, 48, 96])
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 64])
    args = ap.parse_args()
    gpt = load_gpt()
    prof = load_profile("a100-80g")
    rows = []
    for layers in args.layers:
        for n in args.devices:
            model, inputs = gpt.build_meta("7.5b", batch=n, n_layer=layers)
            t0 = time.perf_counter()
            graph = prune(trace(model, inputs, name=f"gpt-{layers}l"))
            t_trace = time.perf_counter() - t0
            mesh = {"dp": n // 8, "tp": 8}
            row = {"layers": layers, "devices": n, "nodes": len(graph.nodes), "trace_s": t_trace,
                   "batch": n}
            t0 = time.perf_counter()
            try:
                plan = search(graph, mesh, prof)
                s = plan.solver
                row.update(mesh=f"dp={mesh['dp']},tp=8", status=s["status"],
                           variables_before=s["variables_before"],
                           variables_after_merging=s["variables_after_merging"],
                           variables_after_linking=s["variables_after_linking"],
                           variables_after_dominance=s["variables_after_dominance"],
                           solve_s=s["solve_time"], step_time=plan.cost["step_time"], zero=plan.zero)
            except PlanInfeasible as e:
                row.update(mesh=f"dp={mesh['dp']},tp=8", status="infeasible",
                           least_memory=getattr(e, "least_memory", None))
            row["plan_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                best, cands = search_devices(graph, n, prof)
                row["devices_winner"] = next(r["mesh"] for r in cands if r.get("winner"))
                row["devices_solve_s"] = sum(r.get("solve_time", 0) for r in cands)
            except PlanInfeasible:
                row["devices_winner"] = "infeasible"
            row["devices_plan_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{layers:3d} layers {n:3d} devices: {row['nodes']:5d} nodes, trace {t_trace:5.1f} s | "
                  f"{row['mesh']}: {row['status']}, vars {row.get('variables_before', '-')} -> "
                  f"{row.get('variables_after_merging', '-')} -> {row.get('variables_after_linking', '-')} -> "
                  f"{row.get('variables_after_dominance', '-')}, solve {row.get('solve_s', 0):.2f} s, "
                  f"plan {row['plan_s']:.2f} s | all {n}-device shapes: {row['devices_plan_s']:.2f} s "
                  f"(winner {row['devices_winner']})", flush=True)
    by = {(r["layers"], r["devices"]): r for r in rows}
    checks = []
    if (96, 64) in by:
        r = by[(96, 64)]
        checks.append(f"96 layers on 64 devices (dp=8,tp=8), plan after tracing: {r['plan_s']:.2f} s "
                      f"(target < 10 s: {'met' if r['plan_s'] < 10 else 'NOT met'}); all four 64-device "
                      f"mesh shapes: {r['devices_plan_s']:.2f} s")
    for n in args.devices:
        if (96, n) in by and (12, n) in by:
            a, b = by[(12, n)]["plan_s"], by[(96, n)]["plan_s"]
            checks.append(f"{n} devices: plan 96 layers / 12 layers = {b / a:.2f}x "
                          f"(target <= 2x: {'met' if b <= 2 * a else 'NOT met'})")
    for c in checks:
        print(c)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "search_scaling.json").write_text(json.dumps({"rows": rows, "checks": checks}, indent=2) + "\n")
    md = ["# Sharding search scaling (GPT, hidden 4096, seq 2048, A100 profile, this 2-core machine)", "",
          "| layers | devices | nodes | trace s | mesh | status | vars before | merged | linked | after dominance | solve s | plan s | all shapes s | winner |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layers']} | {r['devices']} | {r['nodes']} | {r['trace_s']:.1f} | {r['mesh']} | {r['status']} | "
                  f"{r.get('variables_before', '-')} | {r.get('variables_after_merging', '-')} | "
                  f"{r.get('variables_after_linking', '-')} | {r.get('variables_after_dominance', '-')} | "
                  f"{r.get('solve_s', 0):.2f} | {r['plan_s']:.2f} | {r['devices_plan_s']:.2f} | {r['devices_winner']} |")
    md += [""] + [f"- {c}" for c in checks]
    (RESULTS / "search_scaling.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
