"""Tracing and lowering cost of the examples and of large models on `meta`.

For each model: traced node count, nodes after pruning, trace+lower time, prune time,
parameter count, and for the small examples the interpreter's max error against eager.
Writes benchmarks/results/lowering.{json,md}.

    python benchmarks/lowering.py
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import time
import warnings

import torch

from autopar.compiler.interpret import max_abs_error
from autopar.frontends.tracing import trace
from autopar.passes.prune import prune

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(__file__).resolve().parent / "results"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(label, build, mode="export", check=True):
    t0 = time.perf_counter()
    model, inputs = build()
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = trace(model, inputs, mode=mode, name=label)
    t2 = time.perf_counter()
    p = prune(g)
    t3 = time.perf_counter()
    row = {"model": label, "front_end": mode, "params": sum(v.numel for v in p.params if v.kind == "param"),
           "traced_nodes": len(g.nodes), "pruned_nodes": len(p.nodes),
           "build_s": round(t1 - t0, 3), "trace_lower_s": round(t2 - t1, 3), "prune_s": round(t3 - t2, 3)}
    if check:
        row["max_abs_err"] = max_abs_error(model, p, inputs)[0]
    return row


def main():
    torch.manual_seed(0)
    rows = []
    for name in ["mlp", "gpt", "llama", "lora", "bert"]:
        rows.append(measure(name, load(name).build))
    for name in ["mlp", "bert"]:
        rows.append(measure(name, load(name).build, mode="fx"))
    gpt, llama = load("gpt"), load("llama")
    for preset in ["1.7b", "18.4b", "100b"]:
        rows.append(measure(f"gpt-{preset} (meta)", lambda: gpt.build_meta(preset), check=False))
    rows.append(measure("llama-8b seq 2048 (meta)", lambda: llama.build_meta("8b", seq=2048), check=False))
    cols = ["model", "front_end", "params", "traced_nodes", "pruned_nodes", "trace_lower_s",
            "prune_s", "max_abs_err"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c, '-'):,}" if isinstance(r.get(c), int) else str(r.get(c, "-"))
                                       for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "lowering.json").write_text(json.dumps(rows, indent=2) + "\n")
    (OUT / "lowering.md").write_text("# Tracing and lowering (2-core CPU machine)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
