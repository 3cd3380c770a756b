"""Does the plan the search picks for `--mesh dp=2` beat replication when it runs?

    python benchmarks/dp_vs_replication.py [--steps 12] [--warmup 3] [--rounds 3]

The small GPT of the quick start (examples/gpt.py:build) on 2 local CPU ranks over gloo, three
programs emitted the way `autopar run` emits them (symbolic sizes, the cpu profile, the
overlap schedule): the plan `--mesh dp=2` searches, data parallelism with DDP's layout (the
batch split, gradients in asynchronous buckets), and full replication (both ranks compute the
whole batch, nothing is communicated). They run in alternating rounds; the table gives the
median step of each, the ratio to replication, and the search's predicted step for its own
plan (for the two fixed plans, the cost model's price of them). Results go to benchmarks/results/dp_vs_replication.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORLD = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from plan_helpers import DDP, forced_plan

    from autopar.backends.launch import launch
    from autopar.compiler import sharding
    from autopar.passes.greedy import greedy_plan
    from autopar.pipeline import build_program, load_model, prepared_graph

    model, inputs, name = load_model(str(ROOT / "examples" / "gpt.py") + ":build")
    graph = prepared_graph(model, inputs, name, symbolic=True)
    mesh = {"dp": WORLD}
    searched = build_program(model, inputs, "dp=2", name=name, graph=graph, steps=args.steps)
    programs = {
        "searched": searched,
        "data parallel": build_program(model, inputs, "dp=2", plan=forced_plan(graph, mesh, DDP), name=name,
                                       graph=graph, steps=args.steps),
        "replicated": build_program(model, inputs, "dp=2", plan=greedy_plan(
                                        graph, mesh, flop_weight=0.0, outputs={n.outputs[0].name: ("R",) for n in graph.nodes}),
                                    name=name, graph=graph, steps=args.steps),
    }
    # the search picked data parallelism when it splits the inputs' batch over dp
    picked = ("data parallel" if any(searched.plan.layouts[v.name][0].startswith("S(") for v in graph.inputs)
              else "replicated")
    runs: dict[str, list[float]] = {k: [] for k in programs}
    losses = {}
    with tempfile.TemporaryDirectory(prefix="autopar-bench-") as tmp:
        for label, prog in programs.items():
            prog.write(Path(tmp) / label.replace(" ", "_"))
        for r in range(args.rounds):                    # alternate: noise hits every program alike
            for label, prog in programs.items():
                d = Path(tmp) / label.replace(" ", "_")
                res = launch(prog.files["program"], WORLD, "torch",
                             ["--steps", str(args.steps), "--save", str(d / "shards"), "--stats", str(d / f"s{r}")],
                             600, d / "logs", out=open(os.devnull, "w"))
                assert res.ok, res.message
                stats = [json.loads((d / f"s{r}.rank{k}.json").read_text()) for k in range(WORLD)]
                runs[label].append(max(statistics.median(s["times"][args.warmup:]) for s in stats) * 1e3)
                losses[label] = stats[0]["losses"]
    step = {k: statistics.median(v) for k, v in runs.items()}
    from autopar.compiler.cluster import Cluster, load_profile
    from autopar.compiler.cost import CostModel

    def predicted(plan) -> float:
        """The plan's step as the search prices it (the fixed plans carry no cost: price them)."""
        if plan.cost.get("step_time"):
            return plan.cost["step_time"]
        cm = CostModel(graph, Cluster(dict(plan.mesh), load_profile("cpu")), overlap=plan.overlap)
        return cm.evaluate({k: tuple(v) for k, v in plan.strategies.items()}, plan.zero).step_time
    rows = []
    for label, prog in programs.items():
        o = prog.sharded.overlap
        rows.append({"program": label, "step_ms": step[label], "rounds_ms": runs[label],
                     "vs_replicated": step[label] / step["replicated"],
                     "predicted_ms": predicted(prog.plan) * 1e3,
                     "buckets": len(o.buckets) if o else 0, "losses": losses[label]})
        print(f"{label:<14} {step[label]:8.1f} ms  ({', '.join(f'{x:.1f}' for x in runs[label])})  "
              f"x{rows[-1]['vs_replicated']:.2f} of replication  predicted {rows[-1]['predicted_ms']:.2f} ms  "
              f"{rows[-1]['buckets']} gradient buckets", flush=True)
    print(f"the search picked: {picked} ({sharding.format_mesh(searched.plan.mesh)}, "
          f"predicted {searched.plan.cost.get('step_time', 0) * 1e3:.2f} ms)")
    meta = {"model": "examples/gpt.py:build (2 layers, 64 wide, batch 4 x 32)", "ranks": WORLD,
            "backend": "gloo on CPU, OMP_NUM_THREADS=1", "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds, "torch": torch.__version__, "cpus": os.cpu_count(), "picked": picked}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dp_vs_replication.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# The searched plan for --mesh dp=2 vs data parallelism vs replication", "",
             f"{meta['model']}; {WORLD} ranks, {meta['backend']}; AdamW; median step after {args.warmup} "
             f"warm-up steps of {args.steps}, median of {args.rounds} alternating rounds; torch {meta['torch']}.",
             f"The search picked **{picked}**.", "",
             "| program | ms/step | rounds | vs replication | predicted ms | gradient buckets |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['program']} | {r['step_ms']:.1f} | {', '.join(f'{x:.1f}' for x in r['rounds_ms'])} "
                     f"| {r['vs_replicated']:.2f} | {r['predicted_ms']:.2f} | {r['buckets']} |")
    (RESULTS / "dp_vs_replication.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'dp_vs_replication.json'} and {RESULTS / 'dp_vs_replication.md'}")


if __name__ == "__main__":
    main()
