"""Async TP measured: the generated sequence-parallel program with its gathers and
reduce_scatters as collective matmuls, against the same plan with the plain collectives.

    python benchmarks/async_tp.py [--rounds 3] [--steps 30] [--warmup 5]

Same model as benchmarks/vs_pytorch.py (GPT 4 x 256, vocab 2048, 8 x 64 tokens, AdamW), on
tp=2 over 2 local CPU ranks (gloo), the layout of Megatron-LM's sequence parallelism
(tests/plan_helpers.SEQUENCE_PARALLEL). The two programs run alternately, round by round;
reported: each round's median step time after warm-up, the ratio async / plain, and both
programs' losses (the same sums, so they agree to rounding). PyTorch's own async TP
(torch.distributed._symmetric_memory) runs on CUDA only, so on this machine the peer is the
plain program. Results go to benchmarks/results/async_tp.{json,md}.
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plan_helpers import SEQUENCE_PARALLEL, forced_plan
    from vs_pytorch import build

    from autopar.backends.launch import launch
    from autopar.pipeline import build_program, prepared_graph
    model, inputs = build()
    graph = prepared_graph(model, inputs, "gpt")
    runs = {True: [], False: []}
    losses = {}
    with tempfile.TemporaryDirectory(prefix="autopar-async-tp-") as tmp:
        progs = {}
        for on in (True, False):
            plan = forced_plan(graph, {"tp": WORLD}, SEQUENCE_PARALLEL)
            plan.overlap["async_tp"] = on
            prog = build_program(model, inputs, plan.mesh, plan=plan, name="gpt", graph=graph, steps=args.steps)
            assert bool(prog.sharded.overlap.async_tp) == on
            d = Path(tmp) / ("async" if on else "plain")
            prog.write(d)
            progs[on] = (prog, d)
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):    # alternate who goes first
                prog, d = progs[on]
                res = launch(prog.files["program"], WORLD, "torch",
                             ["--steps", str(args.steps), "--save", str(d / "shards"), "--stats", str(d / f"r{r}")],
                             600, d / "logs", out=open(os.devnull, "w"))
                assert res.ok, res.message
                stats = [json.loads((d / f"r{r}.rank{k}.json").read_text()) for k in range(WORLD)]
                runs[on].append(max(statistics.median(s["times"][args.warmup:]) for s in stats) * 1e3)
                losses[on] = stats[0]["losses"]
                print(f"round {r}: {'async TP' if on else 'plain SP'} {runs[on][-1]:.2f} ms", flush=True)
    ratios = [a / b for a, b in zip(runs[True], runs[False])]
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
    out = {"mesh": {"tp": WORLD}, "steps": args.steps, "warmup": args.warmup,
           "async_step_ms": statistics.median(runs[True]), "plain_step_ms": statistics.median(runs[False]),
           "time_ratio": statistics.median(ratios), "round_ratios": ratios, "max_loss_rel_diff": gap}
    print(f"async TP {out['async_step_ms']:.2f} ms, plain {out['plain_step_ms']:.2f} ms: "
          f"{out['time_ratio']:.3f}x (rounds {', '.join(f'{x:.3f}' for x in ratios)}); losses differ by {gap:.2g}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "async_tp.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "async_tp.md").write_text(
        "# Async TP, measured (`python benchmarks/async_tp.py`)\n\n"
        f"GPT 4 x 256 (vocab 2048, 8 x 64 tokens), tp={WORLD} sequence parallel, 2 gloo ranks on CPU, "
        f"{args.rounds} alternating rounds, median step after {args.warmup} warm-up steps of {args.steps}.\n\n"
        "| program | step (ms) |\n|---|---|\n"
        f"| collective matmuls (async TP) | {out['async_step_ms']:.2f} |\n"
        f"| plain all_gather / reduce_scatter | {out['plain_step_ms']:.2f} |\n\n"
        f"Ratio {out['time_ratio']:.3f}x (rounds {', '.join(f'{x:.3f}' for x in ratios)}); "
        f"largest relative loss difference {gap:.2g}.\n")


if __name__ == "__main__":
    main()
