"""Save and load times of one sharded training state: autopar's checkpoints against
torch.distributed.checkpoint (dcp.save / dcp.load), side by side in one run.

The state is a GPT-like stack (n_layer blocks of attention and MLP weights, d_model
wide) on a dp=2,tp=2 mesh of 4 CPU ranks (gloo): weights split over tp Megatron-style
(column/row), replicated over dp; the AdamW moments in ZeRO-1 chunks over dp. DCP gets
the same shards as DTensors (a ZeRO chunk of a tp shard as a (tp, padded block) tensor
sharded on both mesh dims). Each repetition runs the four operations in alternating
order (ABBA), each between two barriers, timed on rank 0; both writers fsync.

Loads: "same plan" reads everything back on dp=2,tp=2; "reshard" reads the weights on
tp=4 (each rank a quarter of every weight). Loads read from the page cache.

Step time during an asynchronous save ("step time" part): the generated program of the small
GPT of benchmarks/vs_pytorch.py (4 layers x 256, vocab 2048, batch 8 x 64) on dp=2 with
ZeRO-1 (both ranks write: the weights from rank 0, each rank its AdamW chunks), trained
three times: without checkpoints, saving every --every steps asynchronously, and saving
synchronously. A step "during a save" is the first step after one was issued, while the
background thread writes; its cost to the loop is that step plus the blocking part of the
save (the host copy of the state), compared with a normal step of the run without saves.

    python benchmarks/checkpoint.py [--layers 8 --width 512 --reps 5]
    python benchmarks/checkpoint.py --part step-time [--steps 41 --every 8]
    python benchmarks/checkpoint.py --report     # rewrite the .md from the .json
Writes benchmarks/results/checkpoint.{json,md} (a part run alone keeps the other's results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"


def shapes(layers: int, width: int) -> dict:
    """name -> (global shape, tp dim of the Megatron split)."""
    out = {"wte.weight": ((8 * width, width), 0)}
    for i in range(layers):
        p = f"h.{i}."
        out[p + "attn.c_attn.weight"] = ((3 * width, width), 0)      # column parallel
        out[p + "attn.c_proj.weight"] = ((width, width), 1)          # row parallel
        out[p + "mlp.c_fc.weight"] = ((4 * width, width), 0)
        out[p + "mlp.c_proj.weight"] = ((width, 4 * width), 1)
    return out


def worker(args) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from autopar.backends import runtime as rt
    from autopar.backends.runtime.checkpoint import ShardSpec, zero_chunk

    rt.one_thread()
    mesh = rt.init_mesh({"dp": 2, "tp": 2})
    dmesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dmesh4 = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    mesh4 = rt.init_mesh({"tp": 4})
    tp, dp = mesh.coord("tp"), mesh.coord("dp")
    g = torch.Generator().manual_seed(tp)              # replicas over dp hold the same weights
    g_opt = torch.Generator().manual_seed(100 + mesh.rank)
    ours, theirs, want_same, want_re, dcp_re = {}, {}, {}, {}, {}
    for name, (shape, d) in shapes(args.layers, args.width).items():
        lay = ("R", f"S({d})")
        local = torch.randn(*[s // 2 if i == d else s for i, s in enumerate(shape)], generator=g)
        ours[name] = (local, ShardSpec(shape, lay))
        want_same[name] = ShardSpec(shape, lay)
        want_re[name] = ShardSpec(shape, (f"S({d})",))
        theirs[name] = DTensor.from_local(local, dmesh, [Replicate(), Shard(d)], run_check=False)
        loc4 = [s // 4 if i == d else s for i, s in enumerate(shape)]
        dcp_re[name] = DTensor.from_local(torch.empty(loc4), dmesh4, [Shard(d)], run_check=False)
        block = local.numel()
        off, size = zero_chunk(block, 2, dp)
        for key in ("exp_avg", "exp_avg_sq"):
            chunk = torch.randn(size, generator=g_opt)
            ours[f"{name}.{key}"] = (chunk, ShardSpec(shape, ("F", f"S({d})")))
            want_same[f"{name}.{key}"] = ShardSpec(shape, ("F", f"S({d})"))
            theirs[f"{name}.{key}"] = DTensor.from_local(chunk.view(1, size), dmesh, [Shard(1), Shard(0)],
                                                         run_check=False)
    state_bytes = sum(t.numel() * t.element_size() for t, _ in ours.values())
    total = torch.tensor([float(state_bytes)])
    dist.all_reduce(total)
    root = Path(args.dir)

    def timed(fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def fresh(p: Path):
        dist.barrier()
        if mesh.rank == 0:
            shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def load_ours(want, m):
        return lambda: rt.load_checkpoint(root / "ours", m, want, strict=False)

    def load_dcp(sd):
        return lambda: dcp.load(sd, checkpoint_id=str(root / "dcp"))

    same_buf = {k: DTensor.from_local(torch.empty_like(v.to_local()), dmesh, v.placements, run_check=False)
                for k, v in theirs.items()}
    ops = {
        "save": (lambda: rt.save_checkpoint(root / "ours", mesh, 1, ours),
                 lambda: dcp.save(theirs, checkpoint_id=str(root / "dcp"))),
        "async save (blocking part)": (None, None),
        "load, same plan": (load_ours(want_same, mesh), load_dcp(same_buf)),
        "load, reshard to tp=4 (weights)": (load_ours(want_re, mesh4), load_dcp(dcp_re)),
    }
    times = {k: ([], []) for k in ops}
    for rep in range(args.reps + 1):                  # rep 0 warms up, not counted
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for which in order:
            fresh(root / ("ours" if which == 0 else "dcp"))
            t = timed(ops["save"][which])
            if rep:
                times["save"][which].append(t)
        for op in ("load, same plan", "load, reshard to tp=4 (weights)"):
            for which in order:
                t = timed(ops[op][which])
                if rep:
                    times[op][which].append(t)
        for which in order:                          # blocking part of an async save
            fresh(root / ("ours_async" if which == 0 else "dcp_async"))
            dist.barrier()
            t0 = time.perf_counter()
            if which == 0:
                h = rt.save_checkpoint(root / "ours_async", mesh, 1, ours, async_=True)
                t = time.perf_counter() - t0
                h.wait()
            else:
                fut = dcp.async_save(theirs, checkpoint_id=str(root / "dcp_async"))
                t = time.perf_counter() - t0
                getattr(fut, "upload_completion", fut).result()
            dist.barrier()
            if rep:
                times["async save (blocking part)"][which].append(t)
    # check once that what we load is what was saved (same plan; the chunks have no padding)
    got = rt.load_checkpoint(root / "ours", mesh, want_same, strict=False)
    assert all(torch.equal(got.tensors[k], t) for k, (t, _) in ours.items())
    sizes = {}
    for name in ("ours", "dcp"):
        sizes[name] = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
    if mesh.rank == 0:
        res = {"layers": args.layers, "width": args.width, "reps": args.reps,
               "state_bytes_all_ranks": int(total.item()), "disk_bytes": sizes,
               "torch": torch.__version__, "cpus": os.cpu_count(), "platform": platform.platform(),
               "times_s": {k: {"autopar": v[0], "dcp": v[1]} for k, v in times.items()}}
        Path(args.result).write_text(json.dumps(res, indent=1))
    dist.barrier()
    mesh4.shutdown()
    mesh.shutdown()


def step_time(args) -> dict:
    """Launch the small GPT's program three times (no saves, async saves, sync saves) and
    compare the step times; see the module docstring."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_pytorch import build

    from autopar.backends.launch import launch
    from autopar.pipeline import build_program
    model, inputs = build()
    plan = Path(tempfile.mkdtemp(prefix="ckpt-step-")) / "dp2.plan"
    plan.write_text('mesh dp=2\nzero 1 over dp\nlayout input "idx", input "targets" { dp: S(0) }\n')
    prog = build_program(model, inputs, plan=str(plan), name="gpt", steps=args.steps)
    tmp = plan.parent
    prog.write(tmp)
    runs = {"none": [], "async": ["--async"], "sync": ["--no-async"]}
    stats = {}
    for label, extra in runs.items():
        ck = ["--checkpoint", str(tmp / f"ck-{label}"), "--every", str(args.every), "--keep", "2"] + extra \
            if extra else []
        res = launch(prog.files["program"], prog.world, "torch",
                     ["--steps", str(args.steps), "--stats", str(tmp / label), "--save", str(tmp / "shards")] + ck,
                     600, tmp / f"logs-{label}", out=open(os.devnull, "w"))
        if not res.ok:
            raise SystemExit(res.message)
        stats[label] = [json.loads((tmp / f"{label}.rank{r}.json").read_text()) for r in range(prog.world)]
    warm = args.every                                   # the first save comes after these
    shards = sum(f.stat().st_size for f in (tmp / "ck-async" / f"step-{args.steps}").iterdir()
                 if f.suffix == ".safetensors")

    def slowest(label, i):                               # the step ends when the slowest rank's does
        return max(s["times"][i] for s in stats[label])
    normal = [slowest("none", i) for i in range(warm, args.steps)]
    out = {"model": "GPT n_layer=4 n_embd=256 n_head=4 vocab=2048, batch 8 x 64", "mesh": "dp=2, ZeRO-1",
           "steps": args.steps, "every": args.every, "checkpoint_bytes": shards,
           "normal_step_s": statistics.median(normal), "normal_steps_s": normal}
    for label in ("async", "sync"):
        saves = [sv for sv in stats[label][0]["checkpoint"]["saves"] if sv["step"] < args.steps]
        after = [slowest(label, sv["step"]) for sv in saves]          # the step right after the save
        blocking = [max(s["checkpoint"]["saves"][k]["blocking_s"] for s in stats[label])
                    for k in range(len(saves))]
        write = [max(s["checkpoint"]["saves"][k]["write_s"] for s in stats[label]) for k in range(len(saves))]
        others = [slowest(label, i) for i in range(warm, args.steps) if i not in {sv["step"] for sv in saves}]
        out[label] = {"saves": len(saves), "step_after_save_s": after, "blocking_s": blocking, "write_s": write,
                      "other_steps_median_s": statistics.median(others)}
        out[label]["ratio"] = statistics.median(a + b for a, b in zip(after, blocking)) / out["normal_step_s"]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def step_report(st: dict) -> list[str]:
    n = st["normal_step_s"] * 1e3
    lines = ["", "## Step time during an asynchronous save", "",
             f"{st['model']}; {st['mesh']} (2 CPU ranks, gloo); a save every {st['every']} of {st['steps']} "
             f"steps, {st['checkpoint_bytes'] / 2 ** 20:.1f} MiB of shards each; medians over the saves. "
             f"Normal step (no saves): {n:.1f} ms.", "",
             "| save | step during the save ms | + blocking part ms | = cost to the loop ms | ratio to a normal step "
             "| background write ms | other steps ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label in ("async", "sync"):
        r = st[label]
        a, b = statistics.median(r["step_after_save_s"]) * 1e3, statistics.median(r["blocking_s"]) * 1e3
        w = statistics.median(r["write_s"]) * 1e3 if label == "async" else 0.0
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {statistics.median(x + y for x, y in zip(r['step_after_save_s'], r['blocking_s'])) * 1e3:.1f} "
                     f"| {r['ratio']:.2f} | {w:.1f} | {r['other_steps_median_s'] * 1e3:.1f} |")
    lines += ["", "A synchronous save blocks for the whole write (its \"step during the save\" runs after it); "
              "an asynchronous one blocks for the host copy only and writes while the next steps run. "
              "Target: cost to the loop <= 1.2x a normal step."]
    return lines


def report(res: dict) -> str:
    if "times_s" not in res:                           # the step-time part alone
        return "\n".join(["# Checkpoints: step time during an asynchronous save", *step_report(res["step_time"])]) + "\n"
    mib = res["state_bytes_all_ranks"] / 2 ** 20
    lines = ["# Checkpoint save / load: autopar vs torch.distributed.checkpoint", "",
             f"GPT-like state, {res['layers']} layers x width {res['width']}: weights split over tp "
             f"(Megatron column/row), AdamW moments in ZeRO-1 chunks over dp; dp=2,tp=2, 4 CPU ranks "
             f"(gloo), OMP_NUM_THREADS=1; {mib:.0f} MiB of shards in all (replicated weights written "
             f"once: {res['disk_bytes']['ours'] / 2 ** 20:.0f} MiB on disk for autopar, "
             f"{res['disk_bytes']['dcp'] / 2 ** 20:.0f} MiB for DCP). Median of {res['reps']} "
             f"alternating repetitions after one warm-up; torch {res['torch']}; {res['cpus']} CPUs.", "",
             "| operation | autopar s | DCP s | ratio | autopar min-max | DCP min-max |",
             "|---|---:|---:|---:|---:|---:|"]
    for op, t in res["times_s"].items():
        a, d = statistics.median(t["autopar"]), statistics.median(t["dcp"])
        lines.append(f"| {op} | {a:.3f} | {d:.3f} | {a / d:.2f} | {min(t['autopar']):.3f}-{max(t['autopar']):.3f} "
                     f"| {min(t['dcp']):.3f}-{max(t['dcp']):.3f} |")
    lines += ["", "Ratio = autopar / DCP time (lower is better for autopar). Both writers fsync; loads read "
              "from the page cache. \"reshard\" loads only the weights, each rank a quarter of every "
              "weight on a tp=4 mesh. Timings on a shared 2-core machine are noisy."]
    if "step_time" in res:
        lines += step_report(res["step_time"])
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only rewrite checkpoint.md from checkpoint.json")
    ap.add_argument("--part", choices=["all", "save-load", "step-time"], default="all")
    ap.add_argument("--steps", type=int, default=41, help="step-time part: training steps")
    ap.add_argument("--every", type=int, default=8, help="step-time part: save every N steps")
    args = ap.parse_args()
    if args.report:
        text = report(json.loads((OUT / "checkpoint.json").read_text()))
        (OUT / "checkpoint.md").write_text(text)
        print(text)
        return 0
    if args.worker:
        worker(args)
        return 0
    from autopar.backends.launch import launch
    old = json.loads((OUT / "checkpoint.json").read_text()) if (OUT / "checkpoint.json").exists() else {}
    if args.part == "step-time":
        data = {k: v for k, v in old.items() if k != "step_time"}
        data["step_time"] = step_time(args)
        OUT.mkdir(exist_ok=True)
        (OUT / "checkpoint.json").write_text(json.dumps(data, indent=1) + "\n")
        text = report(data)
        (OUT / "checkpoint.md").write_text(text)
        print(text)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    try:
        result = tmp / "result.json"
        wargs = ["--worker", "--layers", str(args.layers), "--width", str(args.width), "--reps", str(args.reps),
                 "--dir", str(Path(args.dir) if args.dir else tmp / "ck"), "--result", str(result)]
        res = launch(Path(__file__).resolve(), world=4, backend="torch", args=wargs, timeout=3000,
                     log_dir=tmp / "logs")
        if not res.ok:
            print(res.message, file=sys.stderr)
            return 1
        data = json.loads(result.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.part == "all":
        data["step_time"] = step_time(args)
    elif "step_time" in old:
        data["step_time"] = old["step_time"]
    OUT.mkdir(exist_ok=True)
    (OUT / "checkpoint.json").write_text(json.dumps(data, indent=1) + "\n")
    text = report(data)
    (OUT / "checkpoint.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
