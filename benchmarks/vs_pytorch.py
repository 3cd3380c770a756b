"""autopar's generated programs against PyTorch's own parallel APIs, same model, same layouts.

    python benchmarks/vs_pytorch.py [--steps 12] [--warmup 3]

Three pairs, each on 2 local CPU ranks over gloo (this machine has 2 cores), one after the
other in one run:

    data parallel   autopar plan: batch split on dp, gradients all-reduced in buckets
                    asynchronously in backward (passes/overlap.py)
                    vs torch DistributedDataParallel
    tensor parallel autopar plan: MLP c_fc column-parallel, c_proj row-parallel (the rest
                    replicated) vs DTensor parallelize_module(ColwiseParallel, RowwiseParallel)
    ZeRO-3          autopar plan: parameters dp-sharded, all_gather before use
                    vs FSDP2 fully_shard per block and at the root

The model is a small GPT (examples/gpt.py, 4 layers, 256 wide, vocab 2048, 8 x 64 tokens:
"GPT small" scaled so 2 ranks on 2 cores finish in seconds) trained with fused AdamW
(both sides). Reported:
median step time after warm-up, the ratio autopar / PyTorch, peak resident memory per rank
(ru_maxrss over the training steps, includes the ~0.3 GB of an imported torch; the
generated program's final save of its shards, which PyTorch's side does not do, comes
after it), the peak tensor memory per rank of one step after warm-up (the tensors alive
when the step begins plus the most it allocates on top, backends/runtime/timeline.py's
MemoryProbe on both sides: what a plan's memory prediction counts, without the interpreter
and the C allocator's slack that RSS adds), and both runs' losses (they should agree). Results go to benchmarks/results/vs_pytorch.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORLD = 2


def load_gpt():
    spec = importlib.util.spec_from_file_location("autopar_bench_gpt", ROOT / "examples" / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build():
    gpt = load_gpt()
    cfg = gpt.GPTConfig(block_size=64, vocab_size=2048, n_layer=4, n_head=4, n_embd=256)
    return gpt.build(cfg, batch=8, seq=64)


# ---- the PyTorch side (runs inside each rank) ------------------------------------------------

def torch_worker(mode: str, init: str, steps: int, stats: str, lr: float, timeline: str | None = None) -> None:
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, _ = build()
    from autopar.backends import runtime as rt
    state, (idx, targets) = rt.load_init(init)
    model.load_state_dict(state, strict=False)
    if mode in ("ddp", "fsdp"):
        idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    elif mode == "tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            parallelize_module(block.mlp, mesh, {"c_fc": ColwiseParallel(), "c_proj": RowwiseParallel()})
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    # fused, as autopar's programs step; one fused call cannot mix DTensor and plain tensor
    # parameters (tp leaves the norms and embeddings plain), so each kind is its own group
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())
    groups = [g for g in ([p for p in params if isinstance(p, DTensor)],
                          [p for p in params if not isinstance(p, DTensor)]) if g]
    opt = torch.optim.AdamW([{"params": g} for g in groups], lr=lr, fused=True)
    losses, times = [], []
    from torch.profiler import ProfilerActivity, profile

    from autopar.backends.runtime.timeline import MemoryProbe
    probe, prof, memory = MemoryProbe(torch.device("cpu")), None, None
    for step in range(steps):
        if timeline and step == steps - 1:          # the last step's tensor memory, as autopar's Timeline
            probe.begin()
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            prof.start()
        t0 = time.perf_counter()
        loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.stop()
            os.makedirs(timeline, exist_ok=True)
            trace = os.path.join(timeline, f"rank{rank}.trace.json")
            prof.export_chrome_trace(trace)
            memory = probe.peak(trace)
            prof = None
        value = loss.detach().clone()
        if mode in ("ddp", "fsdp"):
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    with open(f"{stats}.rank{rank}.json", "w") as f:
        json.dump({"losses": losses, "times": times, "memory": memory,
                   "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
    dist.barrier()           # both ranks done with every collective before gloo is torn down
    dist.destroy_process_group()


def run_job(*args, **kwargs) -> None:
    """One launch of 2 ranks; a job that fails is run once more, saying so (gloo's teardown
    has aborted a rank after its results were written, 'terminate called without an active
    exception', in one launch of a 7-round run); a second failure stops the benchmark."""
    from autopar.backends.launch import launch
    res = launch(*args, **kwargs)
    if not res.ok:
        print(f"  a job failed, running it once more: {res.message.splitlines()[0]}", flush=True)
        res = launch(*args, **kwargs)
    assert res.ok, res.message


# ---- plans with the same layouts ------------------------------------------------------------------

def plans(graph):
    sys.path.insert(0, str(ROOT / "tests"))
    from plan_helpers import forced_plan

    from autopar.passes.greedy import greedy_plan
    # DDP's layout: every activation split on the batch, the position embedding (no batch
    # dim) replicated -- not split on its width, which the greedy fill would choose
    ddp_like = [("transformer.wpe", "embedding", {"dp": "R"})]
    dp = forced_plan(graph, {"dp": WORLD}, ddp_like)
    zero3 = forced_plan(graph, {"dp": WORLD}, ddp_like, zero3=True)
    # tensor parallel MLPs, everything else replicated over tp
    outputs = {}
    for n in graph.nodes:
        m = n.meta.module
        if m.endswith("mlp.c_fc") or m.endswith("mlp.gelu"):
            outputs[n.outputs[0].name] = ("S(2)",)
        elif m.endswith("mlp.c_proj"):
            outputs[n.outputs[0].name] = ("P",)
        else:
            outputs[n.outputs[0].name] = ("R",)
    tp = greedy_plan(graph, {"tp": WORLD}, flop_weight=0.0, outputs=outputs, free_params=True)
    return {"data parallel": (dp, "ddp"), "tensor parallel": (tp, "tp"), "ZeRO-3": (zero3, "fsdp")}


def summarize(stats: list[dict], warmup: int) -> dict:
    times = [statistics.median(s["times"][warmup:]) for s in stats]
    return {"step_ms": max(times) * 1e3, "peak_rss_mib": max(s["max_rss_kib"] for s in stats) / 1024,
            "losses": stats[0]["losses"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", choices=["ddp", "tp", "fsdp"], action="append",
                   help="run only these pairs (repeatable; results are then not written)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both programs per layout")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--init", help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    p.add_argument("--timeline", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch_worker(args.worker, args.init, args.steps, args.stats, args.lr, args.timeline)
        return

    import torch

    from autopar.pipeline import build_program
    from autopar.frontends.tracing import trace
    from autopar.passes.prune import prune
    model, inputs = build()
    graph = prune(trace(model, inputs, name="gpt"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="autopar-bench-") as tmp:
        tmp = Path(tmp)
        for label, (plan, mode) in plans(graph).items():
            if args.only and mode not in args.only:
                continue
            prog = build_program(model, inputs, plan.mesh, plan=plan, name="gpt", graph=graph, steps=args.steps)
            d = tmp / mode
            prog.write(d)
            common = ["--steps", str(args.steps), "--lr", repr(args.lr)]
            ours_runs, theirs_runs = [], []
            # alternate the two programs round by round: a noisy machine slows both alike
            for r in range(args.rounds):
                run_job(prog.files["program"], WORLD, "torch",
                        common + ["--save", str(d / "shards"), "--stats", str(d / f"ap{r}")], 600,
                        d / "logs", out=open(os.devnull, "w"))
                ours_runs.append(summarize([json.loads((d / f"ap{r}.rank{k}.json").read_text())
                                            for k in range(WORLD)], args.warmup))
                run_job(Path(__file__), WORLD, "torch",
                        common + ["--worker", mode, "--init", str(prog.files["init"]),
                                  "--stats", str(d / f"pt{r}")], 600, d / "logs-pt", out=open(os.devnull, "w"))
                theirs_runs.append(summarize([json.loads((d / f"pt{r}.rank{k}.json").read_text())
                                              for k in range(WORLD)], args.warmup))
            # one more short run each, its last step profiled for tensor memory (not timed)
            mem_args = ["--steps", str(max(args.warmup + 1, 2)), "--lr", repr(args.lr)]
            run_job(prog.files["program"], WORLD, "torch",
                    mem_args + ["--save", str(d / "shards"), "--timeline", str(d / "tl-ap")], 600,
                    d / "logs", out=open(os.devnull, "w"))
            ours_mem = max(json.loads((d / "tl-ap" / f"rank{k}.overlap.json").read_text())["memory"]["peak"]
                           for k in range(WORLD))
            run_job(Path(__file__), WORLD, "torch",
                    mem_args + ["--worker", mode, "--init", str(prog.files["init"]),
                                "--stats", str(d / "pt-mem"), "--timeline", str(d / "tl-pt")], 600,
                    d / "logs-pt", out=open(os.devnull, "w"))
            theirs_mem = max(json.loads((d / f"pt-mem.rank{k}.json").read_text())["memory"]["peak"]
                             for k in range(WORLD))
            ratios = [a["step_ms"] / b["step_ms"] for a, b in zip(ours_runs, theirs_runs)]
            ours, theirs = ours_runs[0], theirs_runs[0]
            ours = {**ours, "step_ms": statistics.median(x["step_ms"] for x in ours_runs),
                    "peak_rss_mib": max(x["peak_rss_mib"] for x in ours_runs)}
            theirs = {**theirs, "step_ms": statistics.median(x["step_ms"] for x in theirs_runs),
                      "peak_rss_mib": max(x["peak_rss_mib"] for x in theirs_runs)}
            loss_gap = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
            rows.append({"layout": label, "pytorch_api": {"ddp": "DistributedDataParallel",
                                                         "tp": "DTensor Colwise/RowwiseParallel",
                                                         "fsdp": "FSDP2 fully_shard"}[mode],
                         "autopar_step_ms": ours["step_ms"], "pytorch_step_ms": theirs["step_ms"],
                         "time_ratio": statistics.median(ratios), "round_ratios": ratios,
                         "autopar_peak_rss_mib": ours["peak_rss_mib"], "pytorch_peak_rss_mib": theirs["peak_rss_mib"],
                         "autopar_peak_tensor_mib": ours_mem / 2**20, "pytorch_peak_tensor_mib": theirs_mem / 2**20,
                         "max_loss_rel_diff": loss_gap,
                         "autopar_losses": ours["losses"], "pytorch_losses": theirs["losses"]})
            print(f"{label:<16} autopar {ours['step_ms']:8.1f} ms   {rows[-1]['pytorch_api']:<34} "
                  f"{theirs['step_ms']:8.1f} ms   ratio {rows[-1]['time_ratio']:.2f} "
                  f"(rounds {', '.join(f'{x:.2f}' for x in ratios)})   "
                  f"rss {ours['peak_rss_mib']:.0f} / {theirs['peak_rss_mib']:.0f} MiB   "
                  f"tensors {ours_mem / 2**20:.1f} / {theirs_mem / 2**20:.1f} MiB   loss gap {loss_gap:.1e}",
                  flush=True)
    meta = {"model": "GPT (examples/gpt.py) n_layer=4 n_embd=256 n_head=4 vocab=2048, batch 8 x 64 tokens",
            "ranks": WORLD, "backend": "gloo on CPU, OMP_NUM_THREADS=1", "optimizer": "AdamW (fused, both sides)",
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
            "cpus": os.cpu_count()}
    if args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vs_pytorch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# autopar vs PyTorch parallel APIs", "",
             f"{meta['model']}; {WORLD} ranks, {meta['backend']}; fused AdamW; median step after "
             f"{args.warmup} warm-up steps of {args.steps}, {args.rounds} alternating rounds (ratio: "
             f"median of the rounds' ratios); torch {meta['torch']}; {meta['cpus']} CPUs.", "",
             "| layout | PyTorch API | autopar ms/step | PyTorch ms/step | ratio | autopar peak tensors MiB "
             "| PyTorch peak tensors MiB | autopar peak RSS MiB | PyTorch peak RSS MiB | max loss rel. diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['pytorch_api']} | {r['autopar_step_ms']:.1f} | {r['pytorch_step_ms']:.1f} "
                     f"| {r['time_ratio']:.2f} | {r['autopar_peak_tensor_mib']:.1f} | {r['pytorch_peak_tensor_mib']:.1f} "
                     f"| {r['autopar_peak_rss_mib']:.0f} | {r['pytorch_peak_rss_mib']:.0f} "
                     f"| {r['max_loss_rel_diff']:.1e} |")
    lines += ["", "Ratio = autopar / PyTorch step time (lower is better for autopar). Timings on a shared",
              "2-core machine are noisy; the loss column checks that both run the same computation.",
              "Peak tensors: the tensors alive when a step after warm-up begins plus the most that step",
              "allocates on top (the same probe on both sides); peak RSS adds torch itself and the C",
              "allocator's slack, which moves by 10-20 MiB from run to run."]
    (RESULTS / "vs_pytorch.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'vs_pytorch.json'} and {RESULTS / 'vs_pytorch.md'}")


if __name__ == "__main__":
    main()
